"""Which YNNPACK fusions an inference step should keep: the product's evaluation step
(``flaxcnn.bench.build_step('inference', 32)``) compiled with each setting of
``xla_cpu_experimental_ynn_fusion_type``, timed in one process, alternating, every round in
the opposite order.

    python inference_options_ab.py resnet50,mobilenet_v3_large ROUNDS > inference_options_ab.txt
"""

import os
import statistics
import sys
import time

from flaxcnn.cli import tune_glibc_malloc

tune_glibc_malloc()  # as the CLIs run, before JAX starts its threads

import jax  # noqa: E402

from flaxcnn import bench, compiler  # noqa: E402

SETTINGS = {
    "dots+reductions": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "reductions": "LIBRARY_FUSION_TYPE_REDUCE",
    "none": "",
}
models, rounds = sys.argv[1].split(","), int(sys.argv[2])
print("load average at start:", os.getloadavg())
for model in models:
    steps = {}
    for name, value in SETTINGS.items():
        compiler.CPU_INFERENCE_OPTIONS = {compiler.YNN_FUSION_OPTION: value}
        steps[name] = bench.build_step("inference", 32, model=model)
        jax.block_until_ready(steps[name].run())
    names, times = list(SETTINGS), {name: [] for name in SETTINGS}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(2):
                start = time.perf_counter()
                jax.block_until_ready(steps[name].run())
                times[name].append(1e3 * (time.perf_counter() - start))
    base = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"{model:20s} {name:16s} median {median:7.1f} ms, min {min(times[name]):7.1f} ms, "
              f"{median / base:.2f}x of dots+reductions", flush=True)
print("load average at end:", os.getloadavg())
