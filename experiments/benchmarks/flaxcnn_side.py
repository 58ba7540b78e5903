"""The flaxcnn side of ``compare_keras.py``: the product's own steps, in a process of their own.

Started by ``compare_keras.py`` before the Keras processes, with flaxcnn's own best settings
(``cli.tune_glibc_malloc``, as its CLIs; XLA:CPU's default thread pool). It writes the plan
(the model's Keras name, size and fine-tuning layer, from the backbone contract) that the
Keras side then follows, and the timed rows:

  inference, head, head_cached, finetune   ``flaxcnn.bench.build_step`` rows: the steps ``fit``
                                           runs, the batch sent from the host every call
  input+augment, input                     ``data.train_batches`` with and without its
                                           augmentation (flip + rotation in tf.data), per
                                           batch, from the decoded-image cache (epochs >= 1)

    python flaxcnn_side.py --out rows.jsonl --image-size 160 --rows inference,finetune

Rows are appended to ``--out`` as JSON lines; errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import process_report

STEP_ROWS = ("inference", "head", "head_cached", "finetune")
INPUT_ROWS = ("input+augment", "input")
PROG = "flaxcnn_side.py"


def plan(model: str | None, options: dict[str, Any], image_size: int | None,
         fine_tune_at: str | None) -> dict[str, Any]:  # fmt: skip
    """What both sides run, from the backbone contract (``ValueError``: one line)."""
    from flaxcnn import models

    backbone = models.get_backbone(model or models.DEFAULT_MODEL)
    options = backbone.check_options(options)
    fine_tune_at = fine_tune_at or backbone.default_fine_tune_at
    layer = backbone.fine_tune_layer(fine_tune_at, **options)
    return {"kind": "plan", "model": backbone.name, "keras_name": backbone.keras_name,
            "options": options, "image_size": image_size or backbone.default_input_size,
            "fine_tune_at": fine_tune_at, "fine_tune_layer": layer,
            "fine_tune_index": backbone.layer_names(False, **options).index(layer),
            "preprocessing": backbone.preprocessing}  # fmt: skip


def trainable_backbone_params(the_plan: dict[str, Any]) -> int:
    """Backbone parameters the fine-tuning phase trains (its freeze rules, on shapes only)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from flaxcnn import optim, phases
    from flaxcnn.config import TrainConfig
    from flaxcnn.models import build_model

    config = TrainConfig(model=the_plan["model"], model_options=the_plan["options"],
                         weights=None, image_size=the_plan["image_size"],
                         fine_tune_at=the_plan["fine_tune_at"]).resolved()  # fmt: skip
    net = build_model(config.model_config(2))
    size = config.image_size
    params = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    labels = traverse_util.flatten_dict(
        optim.path_labels(params["params"], phases.plan(config)[-1].rules))
    shapes = traverse_util.flatten_dict(params["params"])
    return sum(math.prod(shapes[key].shape) for key, label in labels.items()
               if key[0] == "backbone" and label != optim.FROZEN)  # fmt: skip


def time_calls(call: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """Milliseconds of ``steps`` calls after ``warmup``, each waited for."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append((time.perf_counter() - start) * 1e3)
    return times


def step_row(row: str, the_plan: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from flaxcnn import bench

    step = bench.build_step(row, args.batch_size, the_plan["image_size"],
                            model=the_plan["model"], options=the_plan["options"],
                            conv_impl=args.conv_impl,
                            fine_tune_at=the_plan["fine_tune_at"])  # fmt: skip
    times = [t / step.steps_per_run for t in time_calls(step.run, args.warmup, args.steps)]
    result = {"row": row, "ms": times, "compile_s": step.compile_s, "note": step.note,
              "steps_per_call": step.steps_per_run}  # fmt: skip
    if row == "finetune":
        result.update(trainable_backbone_params=trainable_backbone_params(the_plan),
                      fine_tune_index=the_plan["fine_tune_index"],
                      fine_tune_layer=the_plan["fine_tune_layer"])  # fmt: skip
    return result


def input_rows(the_plan: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-batch milliseconds of ``data.train_batches`` with and without augmentation."""
    from flaxcnn import data

    dataset = data.open_dataset(args.data, download=False)
    common = dict(batch_size=args.batch_size, image_size=the_plan["image_size"],
                  preprocessing=the_plan["preprocessing"], seed=0)  # fmt: skip
    start = time.perf_counter()
    for _ in data.train_batches(dataset, **common, augment=False, epoch=0):
        pass  # decodes and caches every image once, as fit's first epoch does
    cold_s = time.perf_counter() - start
    rows = []
    for row in INPUT_ROWS:
        times, epoch = [], 1
        while len(times) < args.steps:
            start = time.perf_counter()  # the epoch's pipeline start-up counts on its first batch
            for _ in data.train_batches(dataset, **common, augment=row == "input+augment",
                                        epoch=epoch):  # fmt: skip
                now = time.perf_counter()
                times.append((now - start) * 1e3)
                start = now
                if len(times) == args.steps:
                    break
            epoch += 1
        note = (f"{dataset.split_sizes['train']} train images; decoding and caching them "
                f"took {cold_s:.1f} s (epoch 0)")  # fmt: skip
        rows.append({"row": row, "ms": times, "compile_s": None, "note": note,
                     "steps_per_call": 1})  # fmt: skip
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--model", help="a registered model (default: the registry's)")
    parser.add_argument("--options", type=json.loads, default={}, help="JSON: family options")
    parser.add_argument("--image-size", type=int, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fine-tune-at", help="default: the model's")
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--rows", default=",".join(STEP_ROWS + INPUT_ROWS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", help="image folder for the input rows")
    parser.add_argument("--plan-only", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from flaxcnn import cli, models

    tuned = not args.plan_only and cli.tune_glibc_malloc()  # before JAX starts its threads
    start = process_report.describe_process("flaxcnn", ("jax", "flaxcnn", "tensorflow"))
    try:
        the_plan = plan(args.model, args.options, args.image_size, args.fine_tune_at)
    except (models.UnknownModelError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    process_report.append_row(args.out, {**the_plan, "round": args.round})
    if args.plan_only:
        return 0
    from flaxcnn import bench

    for line in bench.describe_machine(args.conv_impl, tuned):
        print(f"{PROG}: {line}", file=sys.stderr, flush=True)
    common = {"side": "flaxcnn", "round": args.round, "pid": os.getpid(),
              "model": the_plan["model"], "image_size": the_plan["image_size"],
              "batch_size": args.batch_size}  # fmt: skip
    wanted = [r for r in args.rows.split(",") if r]
    results = []
    if args.data and any(r in wanted for r in INPUT_ROWS):  # first: a bad folder fails fast
        from flaxcnn import data

        try:
            results += input_rows(the_plan, args)
        except data.DataError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    results += [step_row(r, the_plan, args) for r in STEP_ROWS if r in wanted]
    for result in results:
        ms = result["ms"]
        row = {**common, "kind": "step", **result, "ms_median": statistics.median(ms),
               "ms_min": min(ms)}  # fmt: skip
        process_report.append_row(args.out, row)
        print(f"{PROG}: {row['row']} median {row['ms_median']:.2f} ms, min "
              f"{row['ms_min']:.2f} ms", file=sys.stderr, flush=True)  # fmt: skip
    facts = process_report.describe_process("flaxcnn", ("jax", "flaxcnn", "tensorflow"))
    facts.update(kind="process", round=args.round, started=start["time"],
                 settings=start["settings"],  # as started (TensorFlow adds its own)
                 load_average_start=start["load_average"],
                 malloc_tuned=tuned, conv_impl=args.conv_impl)  # fmt: skip
    process_report.append_row(args.out, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
