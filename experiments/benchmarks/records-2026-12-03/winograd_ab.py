"""Winograd F(2x2, 3x3) on and off in the product's steps (``flaxcnn.bench.build_step``), both
compiled in one process and timed alternating, every round in the opposite order ("off":
``layers.WINOGRAD_MIN_TILES`` above any batch's tile count, so every conv is the primitive).

    python winograd_ab.py resnet50,resnet50_v2 inference,finetune ROUNDS > winograd_ab.txt
"""

import os
import statistics
import sys
import time

from flaxcnn.cli import tune_glibc_malloc

tune_glibc_malloc()  # as the CLIs run, before JAX starts its threads

import jax  # noqa: E402

from flaxcnn import bench  # noqa: E402
from flaxcnn.models import layers  # noqa: E402

SETTINGS = {"off": 2**62, "on": layers.WINOGRAD_MIN_TILES}
models, rows, rounds = sys.argv[1].split(","), sys.argv[2].split(","), int(sys.argv[3])
print("load average at start:", os.getloadavg(), flush=True)
for model in models:
    for row in rows:
        steps = {}
        for name, tiles in SETTINGS.items():
            layers.WINOGRAD_MIN_TILES = tiles  # read when the step is traced
            steps[name] = bench.build_step(row, 32, model=model)
            jax.block_until_ready(steps[name].run())
        names, times = list(SETTINGS), {name: [] for name in SETTINGS}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                for _ in range(2):
                    start = time.perf_counter()
                    jax.block_until_ready(steps[name].run())
                    times[name].append(1e3 * (time.perf_counter() - start))
        off = statistics.median(times["off"])
        for name in names:
            median = statistics.median(times[name])
            print(f"{model:12s} {row:10s} Winograd {name:3s} median {median:7.1f} ms, "
                  f"min {min(times[name]):7.1f} ms, {median / off:.2f}x of off", flush=True)
print("load average at end:", os.getloadavg())
