"""The head-recipe grid and the flip TTA of the head, measured on cached features.

    python experiments/head_search/study.py /tmp/cvd_224.npz [--probe]

Reads a file written by ``cache_features.py``, trains the grid of heads as the head phase's
search does (``flaxcnn.head_search.train_heads``: the phase's own step, schedule, data order
and dropout keys), and prints one line per grid point: train loss of the last epoch and the
validation loss/accuracy without and with the mirrored validation images (``--tta flip``).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from flaxcnn import head_search, phases, sharding
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model


def probe(cached) -> None:
    """A converged L2 logistic regression on the same features (C picked on validation, as
    experiments/linear_probe/probe.py), without and with the mirrored validation features."""
    from scipy.special import log_softmax
    from sklearn.linear_model import LogisticRegression

    y = cached["validation_label"]
    for c in (0.01, 0.1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=5000).fit(cached["train_features"],
                                                         cached["train_label"])  # fmt: skip
        plain = clf.decision_function(cached["validation_features"])
        mirrored = clf.decision_function(cached["validation_mirrored_features"])
        row = []
        for logits in (plain, (plain + mirrored) / 2):
            if logits.ndim == 1:  # two classes: one logit
                logits = np.stack([np.zeros_like(logits), logits], 1)
            loss = -log_softmax(logits, 1)[np.arange(len(y)), y].mean()
            row += [f"{(logits.argmax(1) == y).mean():.4f}", f"{loss:.4f}"]
        print(f"probe C={c:g}: val acc {row[0]} loss {row[1]}; flip: acc {row[2]} loss {row[3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features")
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        default=head_search.LEARNING_RATES)  # fmt: skip
    parser.add_argument("--weight-decays", type=float, nargs="+",
                        default=head_search.WEIGHT_DECAYS)  # fmt: skip
    parser.add_argument("--epochs", type=int, default=phases.HEAD_EPOCHS_CACHED)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", action="store_true",
                        help="also a converged L2 logistic-regression probe (scikit-learn)")
    args = parser.parse_args()
    cached = np.load(args.features)
    classes = len(cached["class_names"])
    config = TrainConfig()
    model = build_model(config.model_config(classes))
    rng = jax.random.PRNGKey(args.seed)
    head = model.init(jax.random.fold_in(rng, 1), cached["train_features"][:1],
                      method=model.classify_features)["params"]  # fmt: skip
    apply_fn = lambda v, x, **kw: model.apply(v, x, method=model.classify_features, **kw)
    steps_per_epoch = len(cached["train_label"]) // args.batch_size
    phase = phases.Phase("head", args.epochs, 0.0, (), None, True, False)
    schedule = lambda rate: phases.learning_rate_schedule(rate, phase, config.lr_schedule,
                                                          steps_per_epoch)  # fmt: skip
    recipes = [head_search.Recipe(lr, wd) for lr in args.learning_rates
               for wd in args.weight_decays]  # fmt: skip
    train_cache = {"features": cached["train_features"], "label": cached["train_label"]}
    views = np.stack([cached["validation_features"], cached["validation_mirrored_features"]], 1)
    mesh = sharding.make_mesh()
    runs = {}
    for name, features in (("plain", cached["validation_features"]), ("flip", views)):
        runs[name] = head_search.train_heads(
            apply_fn, head, jax.random.fold_in(rng, 2), train_cache,
            {"features": features, "label": cached["validation_label"]}, recipes,
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, schedule=schedule,
            class_weights=None, mesh=mesh)  # fmt: skip
    print(f"{len(recipes)} heads x {args.epochs} epochs: {runs['plain'].seconds:.1f} s "
          f"(compilation included); {args.features}")
    print("| learning rate | weight decay | train loss | val loss | val acc | val loss, flip | "
          "val acc, flip |")
    print("|---|---|---|---|---|---|---|")
    for i, recipe in enumerate(recipes):
        a, b = runs["plain"].results[i], runs["flip"].results[i]
        mark = lambda run, i=i: " **picked**" if run.best == i else ""
        print(f"| {recipe.learning_rate:g} | {recipe.weight_decay:g} | "
              f"{a['train_loss']:.4f} | {a['val_loss']:.4f}"
              f"{mark(runs['plain'])} | {a['val_accuracy']:.4f} | {b['val_loss']:.4f}"
              f"{mark(runs['flip'])} | {b['val_accuracy']:.4f} |")
    if args.probe:
        probe(cached)
    same = all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(runs["plain"].heads), jax.tree.leaves(runs["flip"].heads), strict=True))
    print("heads identical with and without flip views:", same)


if __name__ == "__main__":
    main()
