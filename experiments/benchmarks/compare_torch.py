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
``--peak-gbps`` and against a measured device-to-device copy (the practical ceiling).

flaxcnn runs with its default ``conv_impl='auto'`` (the baseline of every ratio) and, as extra
rows, each other formulation named by ``--conv-impls``, so one run also checks that ``auto``
picks the faster one on this backend. ``--deadline`` bounds the run on a leased machine: the
rows come in order of importance, each is logged as it finishes (``--jsonl``), and rows not
started in time are listed as skipped. On an H200 each flaxcnn shape compiled in 38-75 s and
each ``torch.compile`` shape in 41-47 s: the full default grid takes about 12 minutes
(``experiments/benchmarks/h200.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
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


def _expired(until: float | None, what: dict) -> bool:
    """Past the deadline: says so as a row (so the table shows what was left out)."""
    if until is not None and time.time() > until:
        print(json.dumps({**what, "skipped": "deadline"}), flush=True)
        return True
    return False


def run_flaxcnn(batch_sizes, image_sizes, warmup, steps, conv_impls, until=None) -> None:
    import jax

    from flaxcnn import bench
    from flaxcnn.models.layers import resolve_conv_impl

    device = jax.devices()[0]
    for impl in conv_impls:
        side = "flaxcnn" if impl == "auto" else f"flaxcnn ({impl})"
        for b in batch_sizes:
            for s in image_sizes:
                if _expired(until, {"side": side, "batch": b, "size": s}):
                    continue
                step = bench.build_step("full", b, s, conv_impl=impl, dtype="bfloat16",
                                        batch_on_device=True)  # fmt: skip
                median, best = bench.time_calls(step.run, warmup, steps)
                back_to_back = bench.time_back_to_back(step.run, steps)
                cost = step.compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                print(json.dumps({
                    "side": side, "batch": b, "size": s, "ms": median, "ms_min": best,
                    "ms_back_to_back": back_to_back, "compile_s": step.compile_s,
                    "bytes": cost.get("bytes accessed"),
                    "flops": cost.get("flops"), "conv_impl": resolve_conv_impl(impl),
                    "device": device.device_kind, "backend": jax.default_backend(),
                    "version": f"jax {jax.__version__}"}), flush=True)


def copy_gbps(torch, device, gib: float = 2.0) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written): the practical ceiling."""
    a = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - start) / 1e9


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
    forward = torch.compile(model, dynamic=False) if compiled else model
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


def run_torch(batch_sizes, image_sizes, warmup, steps, modes, until=None) -> None:
    import torch
    import torchvision

    from flaxcnn import bench

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    version = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if cuda:  # each torch subprocess measures it (a second or two)
        print(json.dumps({"side": "copy", "gbps": copy_gbps(torch, device)}), flush=True)
    for mode in modes:
        side = "torch.compile" if mode == "compile" else "torch eager"
        for b in batch_sizes:
            for s in image_sizes:
                if _expired(until, {"side": side, "batch": b, "size": s}):
                    continue
                step = torch_step(b, s, mode == "compile", device)
                start = time.perf_counter()
                step()  # compiles when compiled
                sync()
                compile_s = time.perf_counter() - start
                median, best = bench.time_calls(step, warmup, steps, wait=lambda _: sync())
                back_to_back = bench.time_back_to_back(step, steps, wait=lambda _: sync())
                print(json.dumps({"side": side, "batch": b, "size": s, "ms": median,
                                  "ms_min": best, "ms_back_to_back": back_to_back,
                                  "compile_s": compile_s, "device": name,
                                  "backend": device.type, "version": version}), flush=True)


def _percent(value: float, ceiling: float | None) -> str:
    return _num(100 * value / ceiling, ".0f") if ceiling else "-"


def _ms(row: dict, key: str) -> float:
    return row.get(key, float("nan"))  # rows logged before a column existed lack it


def _num(value: float, fmt: str, suffix: str = "") -> str:
    return "-" if math.isnan(value) else f"{value:{fmt}}{suffix}"


def table(rows: list[dict], peak: float | None, copy: float | None) -> str:
    """Markdown: each row's step time, flaxcnn's speed-up over it, achieved bandwidth.

    Step times are given two ways: ``synced`` waits for every step (median, minimum in
    brackets); ``back-to-back`` issues the steps without waiting, as a training loop does.
    The speed-ups are against flaxcnn's default (``conv_impl='auto'``) at the same shape and
    timing. The bandwidth divides XLA's byte count (the row's own for flaxcnn rows, the
    default flaxcnn row's for torch) by the row's back-to-back step time.
    """
    timed = [r for r in rows if "ms" in r]
    flax = {(r["batch"], r["size"]): r for r in timed if r["side"] == "flaxcnn"}
    lines = ["| side | batch | size | img/s | ms/step synced (min) | ms/step back-to-back |"
             " compile s | flaxcnn speed-up synced | back-to-back | GB/s (XLA bytes) |"
             " % of peak | % of copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in timed:
        ref = flax.get((r["batch"], r["size"]))
        nbytes = r.get("bytes") or (ref or {}).get("bytes")
        ms = _ms(r, "ms_back_to_back")
        gbps = nbytes / ms / 1e6 if nbytes else float("nan")
        ratios = [_num(_ms(r, key) / _ms(ref, key), ".2f", "x") if ref else "-"
                  for key in ("ms", "ms_back_to_back")]  # fmt: skip
        cells = [r["side"], r["batch"], r["size"], _num(r["batch"] / ms * 1e3, ".0f"),
                 f"{r['ms']:.2f} ({r['ms_min']:.2f})", _num(ms, ".2f"), f"{r['compile_s']:.1f}",
                 *ratios, _num(gbps, ".0f"), _percent(gbps, peak),
                 _percent(gbps, copy)]  # fmt: skip
        lines.append(f"| {' | '.join(map(str, cells))} |")
    skipped = [f"{r['side']} {r['batch']}x{r['size']}" for r in rows if "skipped" in r]
    if skipped:
        lines.append(f"\nNot run (past --deadline): {', '.join(skipped)}")
    return "\n".join(lines)


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in _str_list(text)]


def _side_process(argv: list[str], log: str | None, until: float | None) -> list[dict]:
    """Runs one side's subprocess, echoing and logging its rows as they come.

    A side that crashes or outlives the deadline loses only its unfinished rows.
    """
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    timer = None
    if until is not None:  # a row already started gets 120 s past the deadline
        timer = threading.Timer(max(0.0, until + 120 - time.time()), proc.kill)
        timer.start()
    rows = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            rows.append(json.loads(line))
            if log:
                with open(log, "a") as f:
                    f.write(line)
    if proc.wait() != 0:
        print(f"[{' '.join(argv[-4:])}] exited with {proc.returncode}; its rows so far are kept",
              flush=True)  # fmt: skip
    if timer:
        timer.cancel()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=_int_list, default=[128, 256])
    parser.add_argument("--image-sizes", type=_int_list, default=[160, 224])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--conv-impls", type=_str_list, default=["auto", "unrolled"],
                        help="flaxcnn rows: 'auto' (the default, the baseline of the ratios) "
                             "and any other formulation to compare")  # fmt: skip
    parser.add_argument("--peak-gbps", type=float, help="the card's peak HBM bandwidth")
    parser.add_argument("--deadline", type=float,
                        help="seconds: rows not started by then are skipped (and listed)")
    parser.add_argument("--jsonl", help="also append every row to this file as it comes")
    parser.add_argument("--side", choices=("both", "flaxcnn", "torch"), default="both",
                        help=argparse.SUPPRESS)  # the subprocesses
    parser.add_argument("--torch-modes", type=_str_list, default=["eager", "compile"],
                        help="torch rows: 'eager' and/or 'compile' (torch.compile)")
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)  # absolute deadline
    args = parser.parse_args()
    grid = (args.batch_sizes, args.image_sizes, args.warmup, args.steps)
    if args.side == "flaxcnn":  # a subprocess: its rows go to stdout as JSON lines
        run_flaxcnn(*grid, args.conv_impls, args.until)
        return
    if args.side == "torch":
        run_torch(*grid, args.torch_modes, args.until)
        return
    until = time.time() + args.deadline if args.deadline else None
    # The product's default first, then the rows it is compared with, then flaxcnn's other
    # formulations: a deadline cuts the least important rows.
    sides = [["--side", "flaxcnn", "--conv-impls", "auto"],
             *(["--side", "torch", "--torch-modes", mode]
               for mode in ("eager", "compile") if mode in args.torch_modes),
             *(["--side", "flaxcnn", "--conv-impls", impl]
               for impl in args.conv_impls if impl != "auto")]
    # The grid, spelled out for each side's subprocess (the parent's own flags stay here).
    base = [sys.argv[0], "--batch-sizes", ",".join(map(str, args.batch_sizes)),
            "--image-sizes", ",".join(map(str, args.image_sizes)),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    rows = []
    for side in sides:
        argv = [*base, *side, *(["--until", str(until)] if until else [])]
        rows += _side_process(argv, args.jsonl, until)
    timed = [r for r in rows if "ms" in r]
    if not timed:
        sys.exit("no row was timed: see the errors above")
    device = timed[0]["device"]
    copy = next((r["gbps"] for r in rows if r["side"] == "copy"), None)
    peak = args.peak_gbps or peak_gbps(device)
    versions = sorted({r["version"] for r in timed})
    print(f"\ndevice: {device}; {'; '.join(versions)}; peak HBM (data sheet): "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown (--peak-gbps)'}; measured copy: "
          f"{f'{copy:.0f} GB/s' if copy else '-'}")
    print(table(rows, peak, copy))


if __name__ == "__main__":
    main()
