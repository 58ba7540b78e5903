"""flaxcnn's MobileNetV2 train step against torchvision's, on the same device, in one command.

    PYTHONPATH=. python experiments/benchmarks/compare_torch.py            # GPU: the full grid
    PYTHONPATH=. python experiments/benchmarks/compare_torch.py --batch-sizes 8 \
        --image-sizes 64 --steps 3 --warmup 1                             # CPU smoke run

Both sides train every MobileNetV2 parameter (flaxcnn's ``bench`` row ``full``: the transfer
model with a 2-class head, BatchNorm on running averages as in fine-tuning, AdamW) in bfloat16
compute with float32 parameters, on a batch already on the device, so that only the step is
timed. torchvision runs ``mobilenet_v2(num_classes=2)`` in ``channels_last`` under
``torch.autocast(bfloat16)``, BatchNorm in eval mode, fused AdamW, eager and with
``torch.compile`` (both are rows). Each side runs in its own subprocess, one after the other:
JAX preallocates most of the GPU memory and torch keeps a caching allocator, so sharing one
process would starve whichever came second.

Achieved memory bandwidth: MobileNetV2 is memory-bound, so the honest ceiling is HBM. The
bytes are XLA's own count for flaxcnn's compiled step (``cost_analysis()['bytes accessed']``,
operands and results of every fused kernel); the same byte count is divided by each side's
step time (torch does not report one), against the card's peak from ``PEAK_GBPS`` or
``--peak-gbps``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Peak HBM bandwidth (GB/s) by a substring of the device name (vendor data sheets).
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,  # SXM5
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,  # 40 GB
    "L4": 300.0,
    "T4": 320.0,
}


def peak_gbps(device_name: str) -> float | None:
    return next((v for k, v in PEAK_GBPS.items() if k in device_name), None)


def run_flaxcnn(batch_sizes, image_sizes, warmup, steps) -> list[dict]:
    import jax

    from flaxcnn import bench

    device = jax.devices()[0]
    rows = []
    for b in batch_sizes:
        for s in image_sizes:
            step = bench.build_step("full", b, s, conv_impl="auto", dtype="bfloat16",
                                    batch_on_device=True)  # fmt: skip
            median, best = bench.time_calls(step.run, warmup, steps)
            cost = step.compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            rows.append({"side": "flaxcnn", "batch": b, "size": s, "ms": median, "ms_min": best,
                         "compile_s": step.compile_s, "bytes": cost.get("bytes accessed"),
                         "flops": cost.get("flops"), "device": device.device_kind,
                         "backend": jax.default_backend(), "version": f"jax {jax.__version__}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def torch_step(batch: int, size: int, compiled: bool, device):
    """One torchvision training step on a fixed device-resident batch, as a closure."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=2).to(
        device, memory_format=torch.channels_last)
    model.train()
    for m in model.modules():  # BatchNorm on running averages, as flaxcnn's row
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1,
                            fused=device.type == "cuda")  # fmt: skip
    x = torch.rand(batch, 3, size, size, device=device).mul_(2).sub_(1)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    return step


def run_torch(batch_sizes, image_sizes, warmup, steps, compile_modes) -> list[dict]:
    import torch
    import torchvision

    from flaxcnn import bench

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    rows = []
    for compiled in compile_modes:
        for b in batch_sizes:
            for s in image_sizes:
                step = torch_step(b, s, compiled, device)
                start = time.perf_counter()
                step()  # compiles when compiled
                sync()
                compile_s = time.perf_counter() - start
                median, best = bench.time_calls(step, warmup, steps, wait=lambda _: sync())
                rows.append({"side": "torch.compile" if compiled else "torch eager", "batch": b,
                             "size": s, "ms": median, "ms_min": best, "compile_s": compile_s,
                             "device": name, "backend": device.type,
                             "version": f"torch {torch.__version__}, torchvision "
                                        f"{torchvision.__version__}"})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], peak: float | None) -> str:
    """Markdown: img/s per side, flaxcnn's ratio to each torch row, achieved bandwidth."""
    flax = {(r["batch"], r["size"]): r for r in rows if r["side"] == "flaxcnn"}
    lines = ["| side | batch | size | img/s | ms/step | flaxcnn speed-up | GB/s (XLA bytes) |"
             " % of peak |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ref = flax.get((r["batch"], r["size"]))
        gbps = ref["bytes"] / r["ms"] / 1e6 if ref and ref.get("bytes") else float("nan")
        ratio = r["ms"] / ref["ms"] if ref else float("nan")
        share = f"{100 * gbps / peak:.0f}" if peak else "-"
        lines.append(f"| {r['side']} | {r['batch']} | {r['size']} | "
                     f"{r['batch'] / r['ms'] * 1e3:.0f} | {r['ms']:.2f} | {ratio:.2f}x | "
                     f"{gbps:.0f} | {share} |")  # fmt: skip
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=_int_list, default=[128, 256])
    parser.add_argument("--image-sizes", type=_int_list, default=[160, 224])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--peak-gbps", type=float, help="the card's peak HBM bandwidth")
    parser.add_argument("--side", choices=("both", "flaxcnn", "torch"), default="both",
                        help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args()
    grid = (args.batch_sizes, args.image_sizes, args.warmup, args.steps)
    if args.side == "flaxcnn":  # a subprocess: its rows go to stdout as JSON lines
        run_flaxcnn(*grid)
    elif args.side == "torch":
        run_torch(*grid, [False] if args.no_compile else [False, True])
    else:
        rows = []
        for side in ("flaxcnn", "torch"):
            cmd = [sys.executable, *sys.argv, "--side", side]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"}).stdout
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        device = rows[0]["device"]
        peak = args.peak_gbps or peak_gbps(device)
        print(f"\ndevice: {device}; {rows[0]['version']}; "
              f"{next((r['version'] for r in rows if r['side'] != 'flaxcnn'), '')}; peak HBM: "
              f"{f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbps)'}")
        print(table(rows, peak))


if __name__ == "__main__":
    main()
