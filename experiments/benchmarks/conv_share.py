"""Where ResNet50's CPU time goes: its convolutions alone, XLA against TensorFlow.

    python experiments/benchmarks/conv_share.py [--batch-size 32] [--image-size 224]

A whole network is too coarse to say where XLA:CPU loses time to oneDNN, so this times
ResNet50's convolutions one shape at a time, forward only, each framework in a process of its
own (TensorFlow's defaults: oneDNN, a thread per core; XLA:CPU as flaxcnn runs it:
``flaxcnn.models.layers.conv`` and ``pointwise_conv`` at ``conv_impl='auto'``, compiled by
``flaxcnn.compiler.jit``, glibc malloc tuned as the CLI tunes it), twice per shape: the
convolution alone, and with the epilogue every ResNet conv has (bias, here the folded
BatchNorm, then ReLU). Each shape's median milliseconds are multiplied by how often ResNet50
V1 uses it; ``--jsonl`` keeps the per-shape rows, which show which convolutions make the
difference. Timed alone, a shape also pays for reading its input from memory that a fused
network would not, so the totals bound the network's convolution time from above rather
than equal it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (input side at 224, kernel, stride, in, out, uses in ResNet50 V1). Keras puts a V1 block's
# stride on its first 1x1 conv and on the shortcut; flaxcnn subsamples first, so those run
# as stride-1 1x1 convs on the subsampled map (the input side given is after subsampling).
SHAPES = (
    (230, 7, 2, 3, 64, 1),  # conv1 (padded input)
    (56, 1, 1, 64, 64, 1), (56, 3, 1, 64, 64, 3), (56, 1, 1, 64, 256, 4), (56, 1, 1, 256, 64, 2),
    (28, 1, 1, 256, 128, 1), (28, 1, 1, 256, 512, 1), (28, 3, 1, 128, 128, 4),
    (28, 1, 1, 128, 512, 4), (28, 1, 1, 512, 128, 3),
    (14, 1, 1, 512, 256, 1), (14, 1, 1, 512, 1024, 1), (14, 3, 1, 256, 256, 6),
    (14, 1, 1, 256, 1024, 6), (14, 1, 1, 1024, 256, 5),
    (7, 1, 1, 1024, 512, 1), (7, 1, 1, 1024, 2048, 1), (7, 3, 1, 512, 512, 3),
    (7, 1, 1, 512, 2048, 3), (7, 1, 1, 2048, 512, 2),
)  # fmt: skip


def _side(side: str, batch: int, scale: float, steps: int) -> list[dict]:
    import numpy as np

    rows = []
    for side_in, k, stride, cin, cout, uses in SHAPES:
        hw = max(k, round(side_in * scale))
        x = np.random.default_rng(0).uniform(-1, 1, (batch, hw, hw, cin)).astype(np.float32)
        w = np.random.default_rng(1).normal(0, 0.05, (k, k, cin, cout)).astype(np.float32)
        b = np.zeros((cout,), np.float32)
        if side == "xla":
            import jax
            import jax.numpy as jnp

            from flaxcnn import compiler
            from flaxcnn.models import layers

            def conv(x, w, k=k, stride=stride):
                if k == 1:
                    return layers.pointwise_conv(x, w[0, 0], "auto")
                return layers.conv(x, w, (stride, stride), ((0, 0), (0, 0)), "auto")

            relu = lambda x, w, b, c=conv: jnp.maximum(c(x, w) + b, 0)
            fns = {"conv": compiler.jit(conv), "conv+bias+relu": compiler.jit(relu)}
            x, w, b = jax.device_put((x, w, b))  # on the device once, as TF's constants
            args = {"conv": (x, w), "conv+bias+relu": (x, w, b)}
            wait = lambda y: y.block_until_ready()
        else:
            import tensorflow as tf

            conv = lambda x, w, stride=stride: tf.nn.conv2d(x, w, stride, "VALID")
            fns = {"conv": tf.function(conv),
                   "conv+bias+relu": tf.function(lambda x, w, b, c=conv: tf.nn.relu(c(x, w) + b))}
            x, w, b = tf.constant(x), tf.constant(w), tf.constant(b)
            args = {"conv": (x, w), "conv+bias+relu": (x, w, b)}
            wait = lambda y: y.numpy()
        for case, fn in fns.items():
            for _ in range(2):
                wait(fn(*args[case]))
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                wait(fn(*args[case]))
                times.append(1e3 * (time.perf_counter() - start))
            rows.append({"side": side, "case": case, "shape": [hw, k, stride, cin, cout],
                         "uses": uses, "ms_median": statistics.median(times),
                         "ms_min": min(times)})  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--worker", choices=("xla", "tf"))
    p.add_argument("--jsonl")
    args = p.parse_args(argv)
    scale = args.image_size / 224
    if args.worker:
        if args.worker == "xla":
            from flaxcnn.cli import tune_glibc_malloc

            tune_glibc_malloc()  # before JAX's threads, as the CLI and flaxcnn.bench do
        print(json.dumps(_side(args.worker, args.batch_size, scale, args.steps)))
        return 0
    print(f"load average at start: {os.getloadavg()}", flush=True)
    totals = {}
    for side in ("xla", "tf", "tf", "xla"):  # interleaved: each side twice, in turn
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        if side == "tf":  # TensorFlow's own defaults: nothing of flaxcnn's process setup
            env = {k: v for k, v in env.items() if not k.startswith(("XLA_", "JAX_"))}
        done = subprocess.run([sys.executable, __file__, "--worker", side, "--batch-size",
                               str(args.batch_size), "--image-size", str(args.image_size),
                               "--steps", str(args.steps)], env=env, capture_output=True,
                              text=True, check=True)  # fmt: skip
        rows = json.loads(done.stdout.splitlines()[-1])
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        for case in {r["case"] for r in rows}:
            totals.setdefault((side, case), []).append(
                sum(r["ms_median"] * r["uses"] for r in rows if r["case"] == case))
    print(f"load average at end: {os.getloadavg()}")
    print(f"\nResNet50's convolutions, forward, batch {args.batch_size}, {args.image_size} px: "
          "ms per network pass (sum over shapes x uses; best of the two processes per side)\n")
    print("| case | XLA:CPU (flaxcnn) ms | TensorFlow (oneDNN) ms | TF / XLA (speed of XLA) |")
    print("|---|---:|---:|---:|")
    for case in ("conv", "conv+bias+relu"):
        xla, tf = min(totals[("xla", case)]), min(totals[("tf", case)])
        print(f"| {case} | {xla:.0f} | {tf:.0f} | {tf / xla:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
