"""Winograd F(2x2, 3x3) off and on in the product's steps (``flaxcnn.bench.build_step``), timed
interleaved in one process (``step_ab``); "off": ``layers.WINOGRAD_MIN_TILES`` above any
batch's tile count, so every conv is the primitive.

    python winograd_ab.py resnet50,resnet50_v2 inference,finetune ROUNDS > winograd_ab.txt
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import step_ab  # before JAX starts: it applies the CLIs' malloc tuning

from flaxcnn import bench
from flaxcnn.models import layers

TILES = {"off": 2**62, "on": layers.WINOGRAD_MIN_TILES}


def build(model, row):
    def step(name):
        layers.WINOGRAD_MIN_TILES = TILES[name]  # read when the step is traced
        return bench.build_step(row, 32, model=model)

    return step


models, rows, rounds = sys.argv[1].split(","), sys.argv[2].split(","), int(sys.argv[3])
print("load average at start:", os.getloadavg(), flush=True)
for model in models:
    for row in rows:
        step_ab.report(f"{model:12s} {row:10s} Winograd",
                       step_ab.interleaved(build(model, row), list(TILES), rounds))
print("load average at end:", os.getloadavg())
