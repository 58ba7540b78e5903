"""Fine-tuning steps with the frozen stages in the differentiated computation ("one") or
compiled apart as an inference computation ("apart", what ``phases.setup`` builds), timed
interleaved in one process (``step_ab``). "one": ``phases.frozen_stage_count`` reports no
frozen stage while the step is built, so ``train.make_steps`` gets no ``frozen_stages``.

    python split_ab.py resnet50,mobilenet_v2 ROUNDS > split_ab.txt
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import step_ab  # before JAX starts: it applies the CLIs' malloc tuning

from flaxcnn import bench, phases

count = phases.frozen_stage_count


def build(model):
    def step(name):
        phases.frozen_stage_count = count if name == "apart" else (lambda phase, config: 0)
        try:
            return bench.build_step("finetune", 32, model=model)
        finally:
            phases.frozen_stage_count = count

    return step


models, rounds = sys.argv[1].split(","), int(sys.argv[2])
print("load average at start:", os.getloadavg(), flush=True)
for model in models:
    step_ab.report(f"{model:20s} finetune", step_ab.interleaved(build(model), ["one", "apart"],
                                                                rounds))  # fmt: skip
print("load average at end:", os.getloadavg())
