"""Which YNNPACK fusions an inference step should keep: the product's evaluation step
(``flaxcnn.bench.build_step('inference', 32)``) compiled with each setting of
``xla_cpu_experimental_ynn_fusion_type``, timed interleaved in one process (``step_ab``).

    python inference_options_ab.py resnet50,mobilenet_v3_large ROUNDS > inference_options_ab.txt
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import step_ab  # before JAX starts: it applies the CLIs' malloc tuning

from flaxcnn import bench, compiler

SETTINGS = {
    "dots+reductions": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "reductions": "LIBRARY_FUSION_TYPE_REDUCE",
    "none": "",
}


def build(model):
    def step(name):
        compiler.CPU_INFERENCE_OPTIONS = {compiler.YNN_FUSION_OPTION: SETTINGS[name]}
        return bench.build_step("inference", 32, model=model)

    return step


models, rounds = sys.argv[1].split(","), int(sys.argv[2])
print("load average at start:", os.getloadavg())
for model in models:
    step_ab.report(f"{model:20s}", step_ab.interleaved(build(model), list(SETTINGS), rounds))
print("load average at end:", os.getloadavg())
