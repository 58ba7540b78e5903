"""Inference latency and throughput of an exported classifier in each runtime, against XLA.

    python experiments/benchmarks/export_latency.py --jsonl export_latency.jsonl
    python experiments/benchmarks/export_latency.py --sizes 160 --batches 1 --steps 20
    python experiments/benchmarks/export_latency.py --smoke        # checks the machinery only

For each ``--sizes`` (default 160 and 224) this script makes a checkpoint of the default model
(the ImageNet backbone, ``$FLAXCNN_WEIGHTS`` or the cache, and a new 2-class head: its values
do not change the timing), exports it with ``python -m flaxcnn.export`` to every format, and
times, for each ``--batches`` (default 1: single-image latency, and 32: throughput):

  xla          flaxcnn's own ``jax.jit`` of restore()'s model (``conv_impl='auto'``), on pixels
               in [0, 255] with the preprocessing inside, as the artifacts take them
  tflite       the .tflite file in LiteRT's interpreter (XNNPACK), ``--threads`` threads
  saved_model  the SavedModel's serving_default signature through ``tf.saved_model.load``
               (TensorFlow's own thread pools)
  stablehlo    ``jax.export.deserialize(...).call`` of the StableHLO artifact (XLA again)

Each runtime runs in a process of its own, one after the other, never at the same time:
``--warmup`` untimed calls, then ``--steps`` timed calls, each waited for; the minimum and the
median per call (``flaxcnn.bench.time_calls``). The input batch is fixed (seeded noise) and
already in host memory. The 1-, 5- and 15-minute load averages are printed before each
process: numbers from a machine that others are using are not a record.

This script only coordinates (it imports neither jax nor TensorFlow); ``--worker`` runs one
runtime and prints one JSON row.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Sequence

RUNTIMES = ("xla", "tflite", "saved_model", "stablehlo")
ARTIFACTS = {"tflite": "model.tflite", "saved_model": "saved_model",
             "stablehlo": "model.stablehlo"}  # fmt: skip


def _load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done


# ---------------------------------------------------------------------------- workers


def make_checkpoint(directory: pathlib.Path, size: int, smoke: bool) -> None:
    """The default model with the ImageNet backbone and a new 2-class head, saved as a run's
    inference checkpoint (what ``restore`` and the exporter read)."""
    from flaxcnn import checkpoints, models, pretrained

    backbone = models.get_backbone(models.DEFAULT_MODEL)
    options = {"alpha": 0.35} if smoke and "alpha" in backbone.options else {}
    model, variables = pretrained.create(backbone.name, weights=None if smoke else "imagenet",
                                         input_size=size, num_classes=2, **options)  # fmt: skip
    config = {"arch": "transfer", "num_classes": 2, "dropout_rate": model.dropout_rate,
              "freeze_backbone_batch_norm": model.freeze_backbone_batch_norm,
              "backbone": backbone.model_config(include_top=False, pooling="avg", **options)}
    metadata = {"model": config, "image_size": [size, size],
                "preprocessing": backbone.preprocessing, "class_names": ["a", "b"]}  # fmt: skip
    checkpoints.save_variables(directory, variables, metadata)


def time_runtime(runtime: str, path: pathlib.Path, size: int, batch: int, warmup: int,
                 steps: int, threads: int) -> dict:  # fmt: skip
    """One runtime's minimum and median milliseconds per call on a fixed batch."""
    import numpy as np

    from flaxcnn import bench, export_check

    pixels = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    if runtime == "xla":
        import jax

        from flaxcnn import checkpoints, export

        model, variables, metadata = checkpoints.restore(path)
        apply = jax.jit(export.pixels_to_logits(model, metadata["preprocessing"]))
        run, wait = (lambda: apply(variables, pixels)), jax.block_until_ready
    else:
        artifact = export_check.load(path, num_threads=threads)
        run, wait = (lambda: artifact(pixels)), (lambda result: result)  # returns numpy
    median, minimum = bench.time_calls(run, warmup, steps, wait=wait)
    return {"runtime": runtime, "size": size, "batch": batch, "median_ms": median,
            "min_ms": minimum, "images_per_s": batch * 1e3 / median, "steps": steps,
            "threads": threads if runtime == "tflite" else None, "pid": os.getpid()}  # fmt: skip


# ---------------------------------------------------------------------------- coordinator


def _table(rows: Sequence[dict]) -> str:
    lines = ["| size | batch | runtime | median ms | min ms | images/s | vs xla (median) | "
             "load average before |", "|---:|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
    xla = {(r["size"], r["batch"]): r["median_ms"] for r in rows if r["runtime"] == "xla"}
    for r in rows:
        base = xla.get((r["size"], r["batch"]))
        ratio = f"{base / r['median_ms']:.2f}x" if base else "-"
        lines.append(f"| {r['size']} | {r['batch']} | {r['runtime']} | {r['median_ms']:.2f} | "
                     f"{r['min_ms']:.2f} | {r['images_per_s']:.1f} | {ratio} | "
                     f"{r['load_average']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="160,224", help="image sizes (comma-separated)")
    parser.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="of " + ", ".join(RUNTIMES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="TF Lite interpreter threads (default: every core)")
    parser.add_argument("--workdir", default=None, help="keep checkpoints and artifacts here")
    parser.add_argument("--jsonl", default=None, help="append every row to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, 2 steps: "
                        "checks the machinery, not speed")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [32] if args.smoke else [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        batches, args.warmup, args.steps = [1, 4], 1, 2
    if args.worker == "checkpoint":
        make_checkpoint(pathlib.Path(args.path), sizes[0], args.smoke)
        return 0
    if args.worker:
        print(json.dumps(time_runtime(args.worker, pathlib.Path(args.path), sizes[0], batches[0],
                                      args.warmup, args.steps, args.threads)))  # fmt: skip
        return 0

    print(f"{os.cpu_count()} cores; load average (1, 5, 15 min) {_load_average()}", flush=True)
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="export-latency-"))
    script, rows = str(pathlib.Path(__file__).resolve()), []
    smoke = ["--smoke"] if args.smoke else []
    for size in sizes:
        folder = root / str(size)
        checkpoint = folder / "checkpoint"
        if not checkpoint.exists():
            _python(script, "--worker", "checkpoint", "--path", str(checkpoint), "--sizes",
                    str(size), *smoke)  # fmt: skip
        for format, name in ARTIFACTS.items():
            if not (folder / name).exists():
                _python("-m", "flaxcnn.export", str(checkpoint), "--format", format, "--output",
                        str(folder / name))  # fmt: skip
        for batch in batches:
            for runtime in args.runtimes.split(","):
                path = checkpoint if runtime == "xla" else folder / ARTIFACTS[runtime]
                load = _load_average()
                done = _python(script, "--worker", runtime, "--path", str(path), "--sizes",
                               str(size), "--batches", str(batch), "--warmup",
                               str(args.warmup), "--steps", str(args.steps), "--threads",
                               str(args.threads))  # fmt: skip
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average": load}
                rows.append(row)
                print(f"{size} px, batch {batch}, {runtime}: median {row['median_ms']:.2f} ms, "
                      f"min {row['min_ms']:.2f} ms ({row['images_per_s']:.1f} images/s); load "
                      f"average before {load}", flush=True)  # fmt: skip
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\nload average (1, 5, 15 min) at the end {_load_average()}; artifacts in {root}\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
