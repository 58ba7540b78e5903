"""``layers.conv``'s Winograd F(2x2, 3x3) forward against the convolution primitive, one 3x3
stride-1 'SAME' shape at a time, both jitted with flaxcnn's inference options, in one process,
alternating (the shapes behind ``layers.WINOGRAD_MIN_CHANNELS`` and ``WINOGRAD_MIN_TILES``;
the threshold is lifted here so that every shape runs both ways).

    python winograd_shapes.py > winograd_shapes.txt
"""

import os
import statistics
import time

from flaxcnn.cli import tune_glibc_malloc

tune_glibc_malloc()  # as the CLIs run, before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flaxcnn import compiler  # noqa: E402
from flaxcnn.models import layers  # noqa: E402

PADS = ((1, 1), (1, 1))
SHAPES = [  # (batch, side, channels): ResNet50's 3x3 convs at 224 px first, then others
    (32, 56, 64), (32, 28, 128), (32, 14, 256), (32, 7, 512),
    (32, 28, 64), (32, 14, 128), (32, 40, 128), (32, 20, 256), (32, 10, 512), (32, 8, 512),
    (32, 28, 256), (32, 14, 512), (8, 14, 256), (1, 14, 256),
]  # fmt: skip
layers.WINOGRAD_MIN_TILES = layers.WINOGRAD_MIN_CHANNELS = 1
print("load average at start:", os.getloadavg(), flush=True)
for n, side, c in SHAPES:
    keys = jax.random.split(jax.random.PRNGKey(0))
    x = jax.nn.relu(jax.random.normal(keys[0], (n, side, side, c)))
    kernel = jax.random.normal(keys[1], (3, 3, c, c)) * (2 / (9 * c)) ** 0.5
    fns = {impl: compiler.jit(lambda a, k, impl=impl: layers.conv(a, k, (1, 1), PADS, impl))
           for impl in ("lax", "unrolled")}  # fmt: skip
    out = {impl: fn(x, kernel) for impl, fn in fns.items()}
    err = float(jnp.max(jnp.abs(out["unrolled"] - out["lax"])) / jnp.max(jnp.abs(out["lax"])))
    winograd = side % 2 == 0
    times = {impl: [] for impl in fns}
    for r in range(7):
        for impl in fns if r % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fns[impl](x, kernel))
            times[impl].append(1e3 * (time.perf_counter() - start))
    conv, wino = (statistics.median(times[i]) for i in ("lax", "unrolled"))
    tiles = n * (side // 2) ** 2
    print(f"{n:2d}x{side:2d}x{side:2d}x{c:3d} ({tiles:5d} tiles): conv {conv:6.2f} ms, "
          f"{'Winograd' if winograd else 'conv (odd side)'} {wino:6.2f} ms, "
          f"{wino / conv:.2f}x; max difference {err:.1e} of the output's scale", flush=True)
print("load average at end:", os.getloadavg())
