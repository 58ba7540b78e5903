"""Which fine-tuning weights score best at the last epoch: raw, EMA, or an epoch average?

One process: (1) the default head phase exactly as the CLI runs it (``fit`` with
``finetune_epochs=0``); (2) the default fine-tuning phase (same optimiser, schedule, data order
and augmentation as ``fit``), while keeping exponential moving averages of the parameters
(per-step decays given by ``--ema``) and a uniform average of the end-of-epoch weights from
``--average-from`` on. Every set of weights is evaluated on the validation split at each epoch
end, so all variants come from the same trajectory. Prints one JSON line per epoch and a
final summary line.

    python experiments/finetune_study/study.py --data ../shared/data/cats_vs_dogs \
        --weights W.h5 --seed 1 --ema 0.99 0.995
"""

from __future__ import annotations

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-learning-rate", type=float, default=None)
    parser.add_argument("--finetune-head-learning-rate", type=float, default=None)
    parser.add_argument("--lr-schedule", default=None)
    parser.add_argument("--ema", type=float, nargs="*", default=[0.99, 0.995])
    parser.add_argument("--average-from", type=int, default=6, help="1-based fine-tune epoch")
    args = parser.parse_args()

    from flaxcnn import data, phases, sharding, train
    from flaxcnn.config import TrainConfig
    from flaxcnn.run import fit

    changes = {k: v for k, v in (("finetune_learning_rate", args.finetune_learning_rate),
                                 ("finetune_head_learning_rate",
                                  args.finetune_head_learning_rate),
                                 ("lr_schedule", args.lr_schedule)) if v is not None}
    config = TrainConfig(data=args.data, download=False, weights=args.weights, seed=args.seed,
                         image_size=160, **changes).resolved()
    with tempfile.TemporaryDirectory() as workdir:
        head = fit(config.replace(finetune_epochs=0), workdir)
    model, variables = head.model, head.state.variables
    print(json.dumps({"head_val_accuracy": head.summary["epochs"][-1]["val_accuracy"]}))

    dataset = data.open_dataset(args.data, download=False, split_seed=config.seed)
    mesh = sharding.make_mesh()
    hw = (config.image_size, config.image_size)
    common = dict(batch_size=config.batch_size, image_size=hw,
                  preprocessing=config.backbone.preprocessing)
    steps_per_epoch = data.num_batches(dataset, "train", config.batch_size, drop_remainder=True)
    phase = phases.plan(config)[1]
    setup = phases.setup(phase, variables["params"], model, mesh, config, steps_per_epoch)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
    state = sharding.replicate(setup.initial_state(variables, rng, int(head.state.step)), mesh)
    steps = setup.steps
    ema_update = jax.jit(lambda avg, new, d: jax.tree.map(lambda a, n: d * a + (1 - d) * n,
                                                          avg, new))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the train step donates state.params
    emas = {d: copy(state.params) for d in args.ema}
    epoch_sum, epoch_count = None, 0

    def accuracy(params) -> float:
        v = {"params": params, "batch_stats": state.batch_stats}
        return train.evaluate(steps, v, data.eval_batches(dataset, "validation", **common),
                              mesh)["accuracy"]

    row = {}
    for epoch in range(phase.epochs):
        batches = data.train_batches(dataset, **common, augment=True, seed=config.seed,
                                     epoch=head.summary["epochs"][-1]["epoch"] + epoch + 1)
        for batch in batches:
            state, _ = steps.train(state, sharding.to_global(batch, mesh))
            emas = {d: ema_update(p, state.params, d) for d, p in emas.items()}
        if epoch + 1 >= args.average_from:
            epoch_sum = copy(state.params) if epoch_sum is None else jax.tree.map(
                jnp.add, epoch_sum, state.params)
            epoch_count += 1
        row = {"epoch_in_phase": epoch + 1, "raw": accuracy(state.params)}
        if epoch_count:  # the averages are evaluated from --average-from on (9 s each)
            row.update({f"ema{d}": accuracy(p) for d, p in emas.items()})
            row[f"avg{args.average_from}+"] = accuracy(
                jax.tree.map(lambda s, n=epoch_count: s / n, epoch_sum))
        print(json.dumps(row), flush=True)
    print(json.dumps({"final": row, "seed": config.seed,
                      "finetune_learning_rate": config.finetune_learning_rate,
                      "lr_schedule": config.lr_schedule}))


if __name__ == "__main__":
    main()
