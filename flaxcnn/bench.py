"""Throughput of the product's own jitted steps: ``python -m flaxcnn.bench``.

Every row times the function training or evaluation really runs: the phase's steps from
``flaxcnn.phases`` (its freeze rules, optimizer and jitted step) over
``models.build_model(config.model_config(...))``, the batch sent through
``sharding.to_global`` as ``run_epoch`` does. ``--model`` picks any registered backbone.
Compile time is measured apart (``lower().compile()``); a row's time is the median (and
minimum) of several steps after warm-up, each waited for with ``block_until_ready``.

Rows (``--rows``):
  inference    the eval step (backbone + head forward, metrics): bounds feature caching
  head_cached  the default head phase: the head alone on cached backbone features, one epoch
               (62 steps: 2,000 images at batch 32) per ``lax.scan`` call, as ``fit`` runs it
  head         a head-only step on images (backbone frozen: forward only)
  finetune     fine-tuning from Keras layer ``--fine-tune-at`` (default: the model's)
  full         every backbone parameter trainable (norms still in inference mode)
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
    model: str = ""

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
    compiled: Any = None  # the XLA executable(s), for cost and HLO inspection
    steps_per_run: int = 1  # train steps that one ``run()`` performs
    image_size: int = 0  # the input side (the model's default when none was asked for)


def build_step(
    row: str,
    batch_size: int,
    image_size: int | None = None,
    *,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    conv_impl: str = "auto",
    fine_tune_at: str | None = None,
    dtype: str = "float32",
    batch_on_device: bool = False,
) -> Step:
    """Builds, compiles and binds the step of one model row (see the module docstring).

    The step is the product's own: a phase of ``flaxcnn.phases.plan`` for a config of the
    row, made concrete by ``phases.setup`` (labels, frozen tree, optimizer, jitted steps).
    ``dtype`` is the computation dtype (parameters stay float32). ``batch_on_device``
    places the batch once instead of sending it from the host every step as ``run_epoch``
    does (for comparisons with frameworks timed on device-resident inputs).
    """
    import jax
    import jax.numpy as jnp

    from flaxcnn import metrics, phases, sharding, train
    from flaxcnn.config import TrainConfig
    from flaxcnn.models import DEFAULT_MODEL, build_model, random_variables

    simple = row == "simple_cnn"
    config = TrainConfig(
        model="simple_cnn" if simple else (model or DEFAULT_MODEL),
        model_options={} if simple else dict(options or {}),
        weights=None,
        image_size=SIMPLE_CNN_SIZE if simple else image_size,
        batch_size=batch_size,
        conv_impl=conv_impl,
        # "full": from the first layer with weights, i.e. every parameter trains.
        fine_tune_at="1" if row == "full" else fine_tune_at,
        feature_cache="off" if row == "head" else "auto",
        dtype=dtype,
    ).resolved()
    size = config.image_size
    phase = phases.plan(config)[0 if row in ("head_cached", "head", "simple_cnn") else -1]
    num_classes = 10 if simple else NUM_CLASSES
    net = build_model(config.model_config(num_classes), dtype=config.compute_dtype,
                      conv_impl=conv_impl)  # fmt: skip
    variables = jax.tree.map(jnp.asarray, random_variables(net, (1, size, size, 3)))
    mesh = sharding.make_mesh()
    setup = phases.setup(phase, variables["params"], net, mesh, config, CACHED_EPOCH_STEPS)
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
        feed = feeder(batch)
        start = time.perf_counter()
        compiled = setup.steps.evaluate.lower(variables, feed()).compile()
        compile_s = time.perf_counter() - start
        run = lambda: compiled(variables, feed())
        return Step(run, compile_s, compiled=compiled, image_size=size)

    note = f"{config.model} at {size}x{size}, {num_classes} classes" if simple else ""
    if phase.cached_features:
        features = jax.eval_shape(lambda v, x: net.apply(v, x, method=net.features),
                                  variables, batch["image"][:1]).shape[-1]  # fmt: skip
        batch = {"features": rng.uniform(0, 6, (batch_size, features)).astype(np.float32),
                 "label": labels_batch}  # fmt: skip
        note = f"{features} cached features per image"
    state = setup.initial_state(variables, jax.random.PRNGKey(2))
    holder = [state]  # the step donates its state: thread it through
    start = time.perf_counter()
    if phase.cached_features:  # as train.run_epoch_in_memory runs it
        stacked = {k: np.stack([v] * CACHED_EPOCH_STEPS) for k, v in batch.items()}
        feed = feeder(stacked, stacked=True)
        step_fn, extra = setup.steps.train_scan, (metrics.zero_sums(),)
    else:
        feed, step_fn, extra = feeder(batch), setup.steps.train, ()
    if isinstance(step_fn, train.AfterFrozenStages):  # fine-tuning above frozen stages
        compiled = step_fn.compile(state, feed(), *extra)
        note = "frozen stages compiled apart"
    else:
        compiled = step_fn.lower(state, feed(), *extra).compile()
    compile_s = time.perf_counter() - start

    def run():
        holder[0], sums = compiled(holder[0], feed(), *extra)
        return holder[0], sums

    steps_per_run = CACHED_EPOCH_STEPS if phase.cached_features else 1
    return Step(run, compile_s, note, compiled, steps_per_run, size)


def bench_model(
    row: str,
    batch_size: int,
    image_size: int | None,
    *,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    conv_impl: str,
    fine_tune_at: str | None,
    warmup: int,
    steps: int,
    dtype: str = "float32",
) -> Result:
    """Compiles and times one model row (``model``: default the registry's default)."""
    from flaxcnn.models import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    step = build_step(row, batch_size, image_size, model=model, options=options,
                      conv_impl=conv_impl, fine_tune_at=fine_tune_at, dtype=dtype)  # fmt: skip
    median, best = (t / step.steps_per_run for t in time_calls(step.run, warmup, steps))
    name = "simple_cnn" if row == "simple_cnn" else model
    size = SIMPLE_CNN_SIZE if row == "simple_cnn" else step.image_size
    return Result(row, batch_size, size, median, best, step.compile_s, step.note, name)


def bench_input(data: str, batch_size: int, image_size: int, max_batches: int) -> Result:
    """Times ``data.train_batches`` with augmentation: a cold epoch 0, then epoch 1."""
    from flaxcnn import data as data_lib

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


def backward_ops_by_layer(
    hlo: str, layer_names: Sequence[str]
) -> tuple[collections.Counter, set[str]]:
    """Counts the dots, convolutions and reductions of optimised HLO text per (pass, kind)
    and names the layers (of ``layer_names``, or ``head``) that have backward ops.

    Autodiff names a backward op ``transpose(jvp(...))`` in its metadata, and the op's name
    stack holds the Flax module path (``.../backbone/block_11_depthwise/...``), so a layer
    that appears here is differentiated in the compiled step: frozen layers never should.
    """
    names = sorted({*layer_names, "head"}, key=len, reverse=True)  # longest match first
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
            path = op_name + "/"
            found = [(path.rfind(f"/{n}/"), n) for n in names if f"/{n}/" in path]
            layers.add(max(found)[1] if found else "(other)")
    return counts, layers


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| model | row | batch | size | img/s | ms/step (median) | ms/step (min) | compile s "
        "| note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    number = lambda x, fmt: "-" if np.isnan(x) else format(x, fmt)
    for r in results:
        rate = number(r.images_per_s, ".1f") if not np.isnan(r.ms_median) else "-"
        lines.append(
            f"| {r.model or '-'} | {r.row} | {r.batch_size} | {r.image_size} | {rate} "
            f"| {number(r.ms_median, '.1f')} "
            f"| {number(r.ms_min, '.1f')} | {number(r.compile_s, '.1f')} | {r.note} |"
        )
    return "\n".join(lines)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 32,128")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from flaxcnn import models
    from flaxcnn.cli import OneLineParser, add_model_flags

    parser = OneLineParser(
        prog="python -m flaxcnn.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=models.DEFAULT_MODEL,
                        help="comma list of registered models (or Keras names): "
                        + ", ".join(models.list_models())
                        + f" (default: {models.DEFAULT_MODEL})")  # fmt: skip
    add_model_flags(parser)
    parser.add_argument("--rows", help=f"comma list of {', '.join(ROWS)} (default: every "
                        "model row, and input when --data is given)")  # fmt: skip
    parser.add_argument("--batch-sizes", default=[32, 128], type=_positive_ints,
                        help="comma list (default: 32,128)")  # fmt: skip
    parser.add_argument("--image-sizes", type=_positive_ints,
                        help="comma list (default: each model's own size)")  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 32, 160x160, fewer steps (overrides sizes and --steps)",
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps per row (default: 7)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps after compiling (default: 2)")  # fmt: skip
    parser.add_argument("--conv-impl", default="auto", choices=("auto", "lax", "unrolled"),
                        help="convolution formulation (default: auto)")  # fmt: skip
    parser.add_argument("--fine-tune-at", help="Keras layer index or name (default: the "
                        "model's)")  # fmt: skip
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="computation dtype of the model rows (parameters stay float32)")
    parser.add_argument("--data", help="image folder for the input row")
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc malloc as it is (see tune_glibc_malloc)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.image_sizes, args.steps, args.warmup = [32], [160], 5, 1
    if args.rows is None:
        args.rows = [r for r in ROWS if r != "input" or args.data]
    else:
        args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if "input" in args.rows:
        if args.data is None:
            parser.error("the input row times an image folder: pass --data DIR")
        args.data = os.path.abspath(args.data)
        if not os.path.isdir(args.data):
            parser.error(f"--data {args.data} is not a folder")
    try:
        args.models = [models.get_backbone(m).name for m in args.model.split(",") if m]
    except models.UnknownModelError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    from flaxcnn.cli import model_options, tune_glibc_malloc

    tuned = False if args.no_malloc_tuning else tune_glibc_malloc()  # before JAX's threads
    for line in describe_machine(args.conv_impl, tuned):
        print(line, flush=True)
    print(f"computation dtype: {args.dtype} (parameters float32)\n", flush=True)
    print("\n".join(format_table([]).splitlines()), flush=True)  # rows follow as they finish
    results = []
    options = model_options(args)
    for model in args.models:
        for batch_size in args.batch_sizes:
            for image_size in args.image_sizes or [None]:
                for row in args.rows:
                    if row == "simple_cnn" and (model, image_size) != (args.models[0], (
                            args.image_sizes or [None])[0]):  # fmt: skip
                        continue  # not a backbone's row, its size is fixed: once per batch size
                    if row == "input":
                        size = image_size or 224
                        result = bench_input(args.data, batch_size, size, 3 * args.steps)
                    else:
                        result = bench_model(
                            row, batch_size, image_size, model=model, options=options,
                            conv_impl=args.conv_impl, fine_tune_at=args.fine_tune_at,
                            warmup=args.warmup, steps=args.steps, dtype=args.dtype)  # fmt: skip
                    results.append(result)
                    print(format_table([result]).splitlines()[-1], flush=True)
    print(f"\nload average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
