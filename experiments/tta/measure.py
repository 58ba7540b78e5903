"""Validation accuracy and loss of a run's checkpoints without and with flip TTA.

    python experiments/tta/measure.py WORKDIR [--data DIR] [--split validation]

Every resumable checkpoint the run kept (``checkpoints/<step>``, one per epoch with
``--keep-checkpoints`` large enough) and its best one are restored and evaluated on the split
by the product's own evaluation (``train.make_eval_step``) with ``tta='none'`` and ``'flip'``:
the same weights, so the difference is the test-time augmentation alone.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from flaxcnn import checkpoints, data, sharding, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--data", default=None, help="default: the run's --data")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    steps = [args.workdir / checkpoints.LATEST_DIR / str(s)
             for s in checkpoints.complete_steps(args.workdir / checkpoints.LATEST_DIR)]
    best = args.workdir / checkpoints.BEST_DIR
    steps += [best / str(s) for s in checkpoints.complete_steps(best)]
    mesh = sharding.make_mesh()
    dataset = None
    print("| checkpoint | epoch | phase | acc | acc, flip | loss | loss, flip |")
    print("|---|---|---|---|---|---|---|")
    for step_dir in steps:
        model, variables, metadata = checkpoints.restore(step_dir)
        if dataset is None:
            dataset = data.open_dataset(args.data or metadata["data"], download=False,
                                        split_seed=metadata["config"]["seed"])  # fmt: skip
        pipeline = dict(batch_size=args.batch_size, image_size=metadata["image_size"],
                        preprocessing=metadata["preprocessing"])  # fmt: skip
        result = {}
        for mode in ("none", "flip"):
            step = train.make_eval_step(model.apply, mesh, tta=mode)
            steps_fn = train.StepFns(train=None, evaluate=step, train_scan=None)
            result[mode] = train.evaluate(steps_fn, sharding.replicate(variables, mesh),
                                          data.eval_batches(dataset, args.split, **pipeline),
                                          mesh)  # fmt: skip
        phase = metadata["history"][-1]["phase"] if metadata.get("history") else "?"
        print(f"| {step_dir.parent.name}/{step_dir.name} | {metadata['epoch']} | {phase} | "
              f"{result['none']['accuracy']:.4f} | {result['flip']['accuracy']:.4f} | "
              f"{result['none']['loss']:.4f} | {result['flip']['loss']:.4f} |", flush=True)
        with open(args.workdir / "tta_measurement.jsonl", "a") as f:
            f.write(json.dumps({"step_dir": str(step_dir), **result}) + "\n")


if __name__ == "__main__":
    main()
