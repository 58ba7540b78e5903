"""Exploratory GPU probe: flaxcnn's full train step with each layer kind's formulation mixed.

``conv_impl`` picks one formulation for every layer; this probe swaps the layer functions of
``flaxcnn.models.layers`` to time mixtures too (``dw_unrolled``: depthwise as shifted
multiply-adds, the rest cuDNN; ``pw_matmul``: 1x1 convs as matmuls, the rest cuDNN), beside
``lax``, ``unrolled`` and torchvision, to decide what ``conv_impl='auto'`` picks on a GPU.
Results: ``experiments/benchmarks/h200.md``.

    PYTHONPATH=. python experiments/benchmarks/gpu_probe.py flax lax,unrolled 256 224
    PYTHONPATH=. python experiments/benchmarks/gpu_probe.py torch compile 256 224
"""
import json
import sys
import time

sys.path.insert(0, "experiments/benchmarks")


def timed(run, wait, warmup=5, steps=20):
    from flaxcnn import bench

    median, best = bench.time_calls(run, warmup, steps, wait=wait)
    return median, best, bench.time_back_to_back(run, steps, wait=wait)


def flax(variants, b, s):
    import jax

    from flaxcnn import bench
    from flaxcnn.models import layers

    dw, pw = layers.depthwise_conv, layers.pointwise_conv
    for variant in variants:
        layers.depthwise_conv, layers.pointwise_conv = dw, pw
        impl = variant
        if variant == "dw_unrolled":  # depthwise unrolled, the rest lax
            impl = "lax"
            layers.depthwise_conv = lambda x, k, st, p, conv_impl=None: dw(x, k, st, p, "unrolled")
        if variant == "pw_matmul":  # 1x1 as matmul, the rest lax
            impl = "lax"
            layers.pointwise_conv = lambda x, k, conv_impl="auto": pw(x, k, "unrolled")
        t0 = time.perf_counter()
        step = bench.build_step("full", b, s, conv_impl=impl, dtype="bfloat16",
                                batch_on_device=True)
        median, best, pipe = timed(step.run, jax.block_until_ready)
        cost = step.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print(json.dumps({"side": f"flaxcnn {variant}", "batch": b, "size": s, "ms": median,
                          "ms_min": best, "ms_back_to_back": pipe, "compile_s": step.compile_s,
                          "total_s": time.perf_counter() - t0,
                          "bytes": cost.get("bytes accessed"),
                          "device": jax.devices()[0].device_kind}), flush=True)
        del step


def torch_side(modes, b, s):
    import compare_torch
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    for mode in modes:
        t0 = time.perf_counter()
        step = compare_torch.torch_step(b, s, mode == "compile", device)
        step()
        sync(None)
        median, best, pipe = timed(step, sync)
        print(json.dumps({"side": f"torch {mode}", "batch": b, "size": s, "ms": median,
                          "ms_min": best, "ms_back_to_back": pipe,
                          "total_s": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    side, variants, b, s = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
    (flax if side == "flax" else torch_side)(variants, b, s)
