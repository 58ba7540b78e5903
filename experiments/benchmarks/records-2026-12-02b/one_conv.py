"""One 3x3 conv (32x56x56x64 -> 64, SAME) under a plain jax.jit, for one_conv.txt.

    XLA_FLAGS=... taskset -c CORES python one_conv.py 56 3 64 64 32 {fwd|grad} lax

``fwd``: conv + ReLU; ``grad``: d/d(x, kernel) of sum(relu(conv)^2). Median and min of 7
calls, ms. (The last argument is kept from the exploration script: only ``lax`` is here.)
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

hw, k, cin, cout, n = (int(a) for a in sys.argv[1:6])
mode = sys.argv[6]
x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, hw, hw, cin)).astype(np.float32))
w = jnp.asarray(np.random.default_rng(1).normal(0, 0.05, (k, k, cin, cout)).astype(np.float32))
p = k // 2


def conv(x, w):
    nhwc = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=nhwc)


if mode == "fwd":
    f = jax.jit(lambda x, w: jnp.maximum(conv(x, w), 0))
else:
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.maximum(conv(x, w), 0) ** 2), argnums=(0, 1)))
out = f(x, w)
jax.block_until_ready(out)
times = []
for _ in range(7):
    start = time.perf_counter()
    jax.block_until_ready(f(x, w))
    times.append(1e3 * (time.perf_counter() - start))
check = float(np.abs(np.asarray(jax.tree.leaves(out)[0])).sum())
print(json.dumps({"impl": "lax", "mode": mode, "med": round(statistics.median(times), 1),
                  "min": round(min(times), 1), "chk": check}))  # fmt: skip
