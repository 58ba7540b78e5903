"""Throughput of the product's own jitted steps: ``python -m flaxcnn.bench``.

Every row times the function training or evaluation really runs: ``train.make_steps`` over
``models.build_model(config.model_config(...))`` with the optimiser and freeze rules of
``flaxcnn.optim``, the batch sent through ``sharding.to_global`` as ``run_epoch`` does.
Compile time is measured apart (``lower().compile()``); a row's time is the median (and
minimum) of several steps after warm-up, each waited for with ``block_until_ready``.

Rows (``--rows``):
  inference    the eval step (backbone + head forward, metrics): bounds feature caching
  head_cached  the default head phase: the head alone on cached backbone features, one epoch
               (62 steps: 2,000 images at batch 32) per ``lax.scan`` call, as ``fit`` runs it
  head         a head-only step on images (backbone frozen: forward only)
  finetune     fine-tuning from Keras layer ``--fine-tune-at`` (default 100)
  full         every MobileNetV2 parameter trainable (BatchNorm still on running averages)
  simple_cnn   SimpleCNN training at its recipe's 32x32 input
  input        ``data.train_batches`` with augmentation alone (decode cached after epoch 0)

Parameters are random (speed does not depend on their values) and made with numpy
(``models.random_variables``), so no ``model.init`` is compiled.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ROWS = ("inference", "head_cached", "head", "finetune", "full", "simple_cnn", "input")
DEFAULT_DATA = os.path.join("..", "shared", "data", "cats_vs_dogs")
SIMPLE_CNN_SIZE = 32  # flaxcnn.experiments.simple_cnn trains CIFAR-10 at 32x32
NUM_CLASSES = 2
CACHED_EPOCH_STEPS = 62  # the shared cats_vs_dogs train split: 2,000 images // batch 32


@dataclasses.dataclass(frozen=True)
class Result:
    """One timed row: ``ms`` are per step (per batch for ``input``)."""

    row: str
    batch_size: int
    image_size: int
    ms_median: float = float("nan")
    ms_min: float = float("nan")
    compile_s: float = float("nan")
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.ms_median * 1e3


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or the platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(conv_impl: str, malloc_tuned: bool) -> list[str]:
    """Lines naming the device, the CPU, versions, the conv formulation and the load."""
    import jax

    from flaxcnn.models.layers import resolve_conv_impl

    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"device: {len(jax.devices())} x {device.device_kind} ({jax.default_backend()} backend); "
        f"host CPU: {cpu_model()}, {cores} usable cores",
        f"jax {jax.__version__}, Python {platform.python_version()}; conv_impl={conv_impl} "
        f"(resolves to {resolve_conv_impl(conv_impl)!r}); glibc malloc tuned: {malloc_tuned}",
        f"load average (1, 5, 15 min) at start: {load}",
    ]


def _block_until_ready(result: Any) -> Any:
    import jax

    return jax.block_until_ready(result)


def time_calls(
    run: Callable[[], Any], warmup: int, steps: int, wait: Callable[[Any], Any] | None = None
) -> tuple[float, float]:
    """Median and minimum milliseconds of ``steps`` calls after ``warmup`` calls.

    ``wait(result)`` blocks until a call's work is done (default ``jax.block_until_ready``;
    other frameworks pass their own, e.g. a CUDA synchronize).
    """
    wait = wait or _block_until_ready
    for _ in range(warmup):
        wait(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        wait(run())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def time_back_to_back(
    run: Callable[[], Any], steps: int, wait: Callable[[Any], Any] | None = None
) -> float:
    """Milliseconds per call of ``steps`` calls issued back to back, waited for once at the end.

    This is a training loop's steady state: the host dispatches the next step while the device
    runs the current one, so per-call dispatch and synchronisation overlap with device work
    (``time_calls`` waits for each call and so adds them to every step).
    """
    wait = wait or _block_until_ready
    wait(run())
    start = time.perf_counter()
    for _ in range(steps):
        result = run()
    wait(result)
    return (time.perf_counter() - start) * 1e3 / steps


@dataclasses.dataclass(frozen=True)
class Step:
    """A compiled product step bound to its inputs: ``run()`` executes one step."""

    run: Callable[[], Any]
    compile_s: float
    note: str = ""
    compiled: Any = None  # the XLA executable, for cost and HLO inspection
    steps_per_run: int = 1  # train steps that one ``run()`` performs


def build_step(
    row: str,
    batch_size: int,
    image_size: int,
    *,
    conv_impl: str,
    fine_tune_at: str = "100",
    dtype: str = "float32",
    batch_on_device: bool = False,
) -> Step:
    """Builds, compiles and binds the step of one model row (see the module docstring).

    ``dtype`` is the computation dtype (parameters stay float32). ``batch_on_device`` places
    the batch once instead of sending it from the host every step as ``run_epoch`` does (for
    comparisons with frameworks timed on device-resident inputs).
    """
    import jax
    import jax.numpy as jnp

    from flaxcnn import metrics, optim, sharding, train
    from flaxcnn.config import TrainConfig
    from flaxcnn.models import build_model, random_variables

    simple = row == "simple_cnn"
    size = SIMPLE_CNN_SIZE if simple else image_size
    config = TrainConfig(
        model="simple_cnn" if simple else "mobilenet_v2",
        weights=None,
        image_size=size,
        batch_size=batch_size,
        conv_impl=conv_impl,
        fine_tune_at=fine_tune_at,
        dtype=dtype,
    )
    num_classes = 10 if simple else NUM_CLASSES
    model = build_model(config.model_config(num_classes), dtype=config.compute_dtype,
                        conv_impl=conv_impl)  # fmt: skip
    variables = jax.tree.map(jnp.asarray, random_variables(model, (1, size, size, 3)))
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(1)
    labels_batch = rng.integers(0, num_classes, batch_size).astype(np.int32)
    batch = {"image": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
             "label": labels_batch}  # fmt: skip

    def feeder(arrays: dict, stacked: bool = False) -> Callable[[], dict]:
        """The step's input: sent from the host per call, or placed once."""
        send = lambda: sharding.to_global(arrays, mesh, stacked=stacked)
        placed = send() if batch_on_device else None
        return (lambda: placed) if batch_on_device else send

    if row == "inference":
        evaluate = train.make_steps(model.apply, None, mesh, update_batch_stats=False).evaluate
        feed = feeder(batch)
        start = time.perf_counter()
        compiled = evaluate.lower(variables, feed()).compile()
        compile_s = time.perf_counter() - start
        run = lambda: compiled(variables, feed())
        return Step(run, compile_s, compiled=compiled)

    rules = {
        "head_cached": optim.transfer_rules(None),
        "head": optim.transfer_rules(None),
        "finetune": optim.transfer_rules(optim.fine_tune_layer(fine_tune_at)),
        "full": optim.ALL_TRAINABLE,
        "simple_cnn": optim.ALL_TRAINABLE,
    }[row]
    apply_fn, input_key, note = model.apply, "image", ""
    if row == "head_cached":
        apply_fn = lambda v, x, **kw: model.apply(v, x, method=model.classify_features, **kw)
        features = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.features),
                                  variables, batch["image"][:1]).shape[-1]  # fmt: skip
        batch = {"features": rng.uniform(0, 6, (batch_size, features)).astype(np.float32),
                 "label": labels_batch}  # fmt: skip
        input_key, note = "features", f"{features} cached features per image"
    if simple:
        note = f"SimpleCNN at {size}x{size}, 10 classes"
    labels = optim.path_labels(variables["params"], rules)
    learning_rate = (config.finetune_learning_rate if row in ("finetune", "full")
                     else config.head_learning_rate)  # fmt: skip
    tx = optim.make_optimizer(learning_rate, labels, weight_decay=config.weight_decay)
    state = train.TrainState.create(variables, tx, jax.random.PRNGKey(2))
    steps_fns = train.make_steps(apply_fn, train.frozen_tree(labels), mesh,
                                 update_batch_stats=simple, input_key=input_key)  # fmt: skip
    holder = [state]  # the step donates its state: thread it through
    start = time.perf_counter()
    if row == "head_cached":  # as train.run_epoch_in_memory runs it
        stacked = {k: np.stack([v] * CACHED_EPOCH_STEPS) for k, v in batch.items()}
        feed = feeder(stacked, stacked=True)
        compiled = steps_fns.train_scan.lower(state, feed(), metrics.zero_sums()).compile()
        run_once = lambda: compiled(holder[0], feed(), metrics.zero_sums())
    else:
        feed = feeder(batch)
        compiled = steps_fns.train.lower(state, feed()).compile()
        run_once = lambda: compiled(holder[0], feed())
    compile_s = time.perf_counter() - start

    def run():
        holder[0], sums = run_once()
        return holder[0], sums

    steps_per_run = CACHED_EPOCH_STEPS if row == "head_cached" else 1
    return Step(run, compile_s, note, compiled, steps_per_run)


def bench_model(
    row: str,
    batch_size: int,
    image_size: int,
    *,
    conv_impl: str,
    fine_tune_at: str,
    warmup: int,
    steps: int,
    dtype: str = "float32",
) -> Result:
    """Compiles and times one model row."""
    step = build_step(row, batch_size, image_size, conv_impl=conv_impl, fine_tune_at=fine_tune_at,
                      dtype=dtype)  # fmt: skip
    median, best = (t / step.steps_per_run for t in time_calls(step.run, warmup, steps))
    size = SIMPLE_CNN_SIZE if row == "simple_cnn" else image_size
    return Result(row, batch_size, size, median, best, step.compile_s, step.note)


def bench_input(data: str, batch_size: int, image_size: int, max_batches: int) -> Result:
    """Times ``data.train_batches`` with augmentation: a cold epoch 0, then epoch 1."""
    from flaxcnn import data as data_lib

    if not os.path.isdir(data):
        return Result("input", batch_size, image_size, note=f"skipped: no folder {data}")
    dataset = data_lib.open_dataset(data, download=False)
    common = dict(batch_size=batch_size, image_size=image_size, preprocessing="tf",
                  augment=True, seed=0)  # fmt: skip
    start = time.perf_counter()
    cold = sum(1 for _ in data_lib.train_batches(dataset, **common, epoch=0))
    cold_ms = (time.perf_counter() - start) * 1e3 / max(cold, 1)
    count, start = 0, None
    for _ in data_lib.train_batches(dataset, **common, epoch=1):
        if start is None:  # the first batch waits for the pipeline to fill
            start = time.perf_counter()
            continue
        count += 1
        if count >= max_batches:
            break
    ms = (time.perf_counter() - start) * 1e3 / max(count, 1)
    note = (f"epoch 1, {count} batches (in-memory decoded cache); "
            f"epoch 0 (decode + cache): {batch_size / cold_ms * 1e3:.0f} img/s")  # fmt: skip
    return Result("input", batch_size, image_size, ms, note=note)


_HLO_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = \S+ (dot|convolution|reduce)\(.*?op_name=\"([^\"]+)\"")
_HLO_LAYER = re.compile(
    r"/(Conv1|bn_Conv1|expanded_conv_[a-z_]+|block_\d+_[a-z]+(?:_BN)?|Conv_1(?:_bn)?|head)[/\"]?"
)


def backward_ops_by_layer(hlo: str) -> tuple[collections.Counter, set[str]]:
    """Counts the dots, convolutions and reductions of optimised HLO text per (pass, kind)
    and names the Keras layers that have backward ops.

    Autodiff names a backward op ``transpose(jvp(...))`` in its metadata, so a layer that
    appears here is differentiated in the compiled step: frozen layers never should.
    """
    counts: collections.Counter = collections.Counter()
    layers = set()
    for line in hlo.splitlines():
        match = _HLO_OP.match(line)
        if not match:
            continue
        kind, op_name = match.groups()  # instructions inside fusions count once each
        backward = "transpose(" in op_name
        counts["backward" if backward else "forward", kind] += 1
        if backward:
            found = _HLO_LAYER.findall(op_name)
            layers.add(found[-1] if found else "(other)")
    return counts, layers


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| row | batch | size | img/s | ms/step (median) | ms/step (min) | compile s | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    number = lambda x, fmt: "-" if np.isnan(x) else format(x, fmt)
    for r in results:
        rate = number(r.images_per_s, ".1f") if not np.isnan(r.ms_median) else "-"
        lines.append(
            f"| {r.row} | {r.batch_size} | {r.image_size} | {rate} | {number(r.ms_median, '.1f')} "
            f"| {number(r.ms_min, '.1f')} | {number(r.compile_s, '.1f')} | {r.note} |"
        )
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {ROWS}")
    parser.add_argument("--batch-sizes", default="32,128", type=_int_list)
    parser.add_argument("--image-sizes", default="160,224", type=_int_list)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 32, 160x160, fewer steps (overrides sizes and --steps)",
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--conv-impl", default="auto", help="auto, lax or unrolled")
    parser.add_argument("--fine-tune-at", default="100", help="Keras layer index or name")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="computation dtype of the model rows (parameters stay float32)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="image folder for the input row")
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc malloc as it is (see tune_glibc_malloc)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.image_sizes, args.steps, args.warmup = [32], [160], 5, 1
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ROWS}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    from flaxcnn.cli import tune_glibc_malloc

    tuned = False if args.no_malloc_tuning else tune_glibc_malloc()  # before JAX's threads
    for line in describe_machine(args.conv_impl, tuned):
        print(line, flush=True)
    print(f"computation dtype: {args.dtype} (parameters float32)", flush=True)
    results = []
    for batch_size in args.batch_sizes:
        for image_size in args.image_sizes:
            for row in args.rows:
                if row == "simple_cnn" and image_size != args.image_sizes[0]:
                    continue  # its size is fixed: once per batch size
                if row == "input":
                    result = bench_input(args.data, batch_size, image_size, 3 * args.steps)
                else:
                    result = bench_model(row, batch_size, image_size, conv_impl=args.conv_impl,
                                         fine_tune_at=args.fine_tune_at, warmup=args.warmup,
                                         steps=args.steps, dtype=args.dtype)  # fmt: skip
                results.append(result)
                print(format_table([result]).splitlines()[-1], flush=True)
    print(f"\nload average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
