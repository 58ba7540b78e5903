"""Per-layer timings of each conv formulation, forward and forward+backward.

    python experiments/benchmarks/layer_micro.py [--skip-lax-grad]

Compares, on MobileNetV2-sized layers at batch 32, 160x160:
  lax        ``lax.conv_general_dilated`` (``feature_group_count=C`` for depthwise)
  slices     the earlier ``'unrolled'``: shifted slices, backward by JAX's autodiff, 1x1
             convs as a ``dot_general`` on the 4-D activation
  unrolled   ``flaxcnn.models.layers`` now: hand-written depthwise backward, 2-D matmuls
The cases take turns (interleaved rounds); times are milliseconds (median, min).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcnn import bench, cli, compiler
from flaxcnn.models import layers


def _slices_depthwise(x, kernel, strides, pads):
    """The earlier formulation: autodiff differentiates the slices (kh*kw padded copies)."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = layers._out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
    return layers._depthwise_taps(xp, kernel, strides, out_hw)


def _slices_pointwise(x, kernel):
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def cases(skip_lax_grad: bool):
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    out = {}
    for name, shape, stride in (
        ("depthwise 3x3 s1 32x40x40x192", (32, 40, 40, 192), 1),
        ("depthwise 3x3 s2 32x80x80x96", (32, 80, 80, 96), 2),
        ("depthwise 3x3 s1 32x10x10x576", (32, 10, 10, 576), 1),
    ):
        x, k = normal(*shape), normal(3, 3, 1, shape[-1])
        pads = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))
        fns = {
            "lax": lambda x, k, s=stride, p=pads: layers.depthwise_conv(x, k, (s, s), p, "lax"),
            "slices": lambda x, k, s=stride, p=pads: _slices_depthwise(x, k, (s, s), p),
            "unrolled": lambda x, k, s=stride, p=pads: layers.depthwise_conv(
                x, k, (s, s), p, "unrolled"
            ),
        }
        out[name] = (fns, (x, k))
    x, w = normal(32, 40, 40, 192), normal(1, 1, 192, 32)
    out["pointwise 192->32 32x40x40"] = (
        {
            "lax": lambda x, w: layers.pointwise_conv(x, w, "lax"),
            "slices": _slices_pointwise,
            "unrolled": lambda x, w: layers.pointwise_conv(x, w, "unrolled"),
        },
        (x, w),
    )
    compiled = {}
    for name, (fns, args) in out.items():
        cot = jnp.asarray(rng.standard_normal(jax.eval_shape(fns["lax"], *args).shape), jnp.float32)
        for impl, fn in fns.items():
            compiled[name, impl, "forward"] = (compiler.jit(fn).lower(*args).compile(), args)
            if skip_lax_grad and impl == "lax" and name.startswith("depthwise"):
                continue  # XLA:CPU's grouped-conv backward takes seconds per call
            grad = lambda *a, fn=fn, cot=cot: jax.vjp(fn, *a)[1](cot)
            compiled[name, impl, "fwd+bwd"] = (
                compiler.jit(grad, differentiated=True).lower(*args).compile(), args)
    return compiled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-lax-grad", action="store_true")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    args = parser.parse_args(argv)
    tuned = False if args.no_malloc_tuning else cli.tune_glibc_malloc()
    for line in bench.describe_machine("auto", tuned):
        print(line)
    compiled = cases(args.skip_lax_grad)
    times = {key: [] for key in compiled}
    for fn, fn_args in compiled.values():
        jax.block_until_ready(fn(*fn_args))
    for _ in range(args.rounds):
        for key, (fn, fn_args) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[key].append((time.perf_counter() - start) * 1e3)
    print("| layer | formulation | forward ms | forward+backward ms |")
    print("|---|---|---:|---:|")
    for name, impl in dict.fromkeys((n, i) for n, i, _ in compiled):
        cells = []
        for what in ("forward", "fwd+bwd"):
            t = times.get((name, impl, what))
            cells.append(f"{statistics.median(t):.1f} ({min(t):.1f})" if t else "-")
        print(f"| {name} | {impl} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
