"""The rows of ``compare_keras.py``: recorded to ``--jsonl`` as they arrive, then summarised
as Markdown tables (each side's rows, the cases side by side, the processes, the whole runs).

Standard library only, like the coordinator that imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

FLAVOURS = {"keras3": "Keras 3", "tf_keras": "tf_keras"}
CASES = ("inference", "head", "head+augment", "head_cached", "finetune", "finetune+augment")
FLAXCNN_ROWS = {"inference": ("inference",), "head": ("head",),
                "head+augment": ("head", "input+augment"), "head_cached": ("head_cached",),
                "finetune": ("finetune",),
                "finetune+augment": ("finetune", "input+augment")}  # fmt: skip


class Recorder:
    """Every row of the run, appended to ``--jsonl`` as it arrives."""

    def __init__(self, path: str | None) -> None:
        self.path, self.rows = path, []

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows += rows
        if self.path:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]


def _stats(rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(median, min) ms of the rows' pooled steps (all rounds)."""
    ms = [t for r in rows for t in r["ms"]]
    return (statistics.median(ms), min(ms)) if ms else None


def case_stats(recorder: Recorder, side: str, case: str) -> tuple[float, float] | None:
    """(median, min) ms of a case; flaxcnn's +augment cases add its pipeline's per batch."""
    if side != "flaxcnn":
        return _stats(recorder.find(kind="step", side=side, case=case))
    parts = [_stats(recorder.find(kind="step", side=side, row=r)) for r in FLAXCNN_ROWS[case]]
    if not parts or None in parts:
        return None
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _rate(batch: int, ms: float) -> str:
    return f"{batch / ms * 1e3:.1f}"


def _cell(batch: int, stats: tuple[float, float] | None) -> str:
    return "-" if stats is None else f"{_rate(batch, stats[0])} ({_rate(batch, stats[1])})"


def _ratio(flax: tuple[float, float] | None, keras: tuple[float, float] | None) -> str:
    """flaxcnn's speed over Keras's: Keras's milliseconds over flaxcnn's (median, fastest)."""
    if flax is None or keras is None:
        return "-"
    return f"{keras[0] / flax[0]:.2f}x ({keras[1] / flax[1]:.2f}x)"


ROW_ORDER = (*CASES, "input", "input+augment")
SPREAD_WARNING = 1.2  # a median this far above the minimum says the steps were disturbed


def side_table(args: argparse.Namespace, recorder: Recorder, plan: dict[str, Any]) -> list:
    """Each side's own rows: img/s, median and minimum ms, first call."""
    lines = [f"\n## {plan['keras_name']} {plan['options'] or ''}: batch {args.batch_size}, "
             f"{plan['image_size']}x{plan['image_size']}, {args.warmup} warm-up + {args.steps} "
             f"timed steps per row and round, {args.rounds} round(s); fine-tuning from "
             f"{plan['fine_tune_layer']} (Keras layer {plan['fine_tune_index']})", "",
             "| side | case | img/s (median) | ms/step (median) | ms/step (min) | timed steps "
             "| first call s | note |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    spread = []
    for side in ["flaxcnn", *args.flavours]:
        key = "row" if side == "flaxcnn" else "case"
        names = {r[key] for r in recorder.find(kind="step", side=side)}
        for name in sorted(names, key=ROW_ORDER.index):
            rows = recorder.find(kind="step", side=side, **{key: name})
            median, best = _stats(rows)
            first = max(r.get("compile_s") or r.get("first_call_s") or 0.0 for r in rows)
            note = "ms/batch; " + rows[-1]["note"] if name.startswith("input") else ""
            if name.startswith("finetune"):
                r = rows[-1]
                note = (f"{r['trainable_backbone_params']:,} trainable backbone params, from "
                        f"{r['fine_tune_layer']} (layer {r['fine_tune_index']})")  # fmt: skip
            rate, steps = _rate(args.batch_size, median), sum(len(r["ms"]) for r in rows)
            first_s = f"{first:.1f}" if first else "-"
            lines.append(f"| {FLAVOURS.get(side, side)} | {name} | {rate} | {median:.2f} | "
                         f"{best:.2f} | {steps} | {first_s} | {note} |")  # fmt: skip
            if median > SPREAD_WARNING * best:
                spread.append(f"{FLAVOURS.get(side, side)} {name} {median / best:.2f}x")
    if spread:
        lines.append(f"\nmedian over {SPREAD_WARNING}x the minimum (a busy machine: see the "
                     f"load averages below): {', '.join(spread)}")  # fmt: skip
    return lines


def ratio_table(args: argparse.Namespace, recorder: Recorder) -> list[str]:
    """The cases side by side, and flaxcnn's speed over each Keras flavour."""
    names = [FLAVOURS[f] for f in args.flavours]
    lines = ["", "img/s of the median step (of the fastest step); flaxcnn / Keras: its speed "
             "over Keras's from the median steps (from the fastest steps)", "",
             "| case | flaxcnn img/s | " + " | ".join(f"{k} img/s" for k in names) + " | "
             + " | ".join(f"flaxcnn / {k}" for k in names) + " |",
             "|---|---:|" + "---:|" * (2 * len(names))]  # fmt: skip
    for case in args.cases:
        flax = case_stats(recorder, "flaxcnn", case)
        keras = [case_stats(recorder, f, case) for f in args.flavours]
        cells = [_cell(args.batch_size, k) for k in keras] + [_ratio(flax, k) for k in keras]
        lines.append(f"| {case} | {_cell(args.batch_size, flax)} | " + " | ".join(cells) + " |")
    flax_ft = recorder.find(kind="step", side="flaxcnn", row="finetune")
    for flavour in args.flavours:
        keras_ft = [r for r in recorder.find(kind="step", side=flavour)
                    if r["case"].startswith("finetune")]  # fmt: skip
        if flax_ft and keras_ft:
            ours, theirs = (r[-1]["trainable_backbone_params"] for r in (flax_ft, keras_ft))
            verdict = "equal" if ours == theirs else "DIFFERENT: the steps do unequal work"
            lines.append(f"trainable backbone parameters when fine-tuning: flaxcnn {ours:,}, "
                         f"{FLAVOURS[flavour]} {theirs:,} ({verdict})")  # fmt: skip
    augmented = any(case.endswith("+augment") for case in args.cases)
    if augmented and not recorder.find(kind="step", side="flaxcnn", row="input+augment"):
        lines.append("(no --data folder: flaxcnn's +augment cases need its input pipeline)")
    return lines


def process_table(recorder: Recorder) -> list[str]:
    """Each process's facts: pid, cores, malloc arenas, jax present, load, its settings."""
    lines = ["", "| process | pid | cores | malloc arenas | jax / flaxcnn imported | jaxlib "
             "loaded | load start -> end | settings it was started with |",
             "|---|---:|---:|---:|---|---|---|---|"]  # fmt: skip
    for r in recorder.find(kind="process"):
        imported = "/".join("yes" if r["imported"].get(p) else "no" for p in ("jax", "flaxcnn"))
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        lines.append(f"| {FLAVOURS.get(r['side'], r['side'])} (round {r['round']}) | {r['pid']} "
                     f"| {r['cores']} | {r['malloc_arenas']} | {imported} | "
                     f"{'yes' if r['jaxlib_mapped'] else 'no'} | {r['load_average_start']} -> "
                     f"{r['load_average']} | {settings} |")  # fmt: skip
    return lines


def full_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[str]:
    """The whole runs side by side (flaxcnn's first) and each flaxcnn run's wall time over
    each Keras run's."""
    percent = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines = ["", f"## whole runs on {args.data}", "",
             "| whole run | image size | wall s (whole process) | val accuracy after head "
             "| final | best epoch |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    name = lambda r: (f"flaxcnn transfer ({' '.join(['defaults', *r['flags']])})"
                      if r["side"] == "flaxcnn" else f"{FLAVOURS[r['side']]} recipe")  # fmt: skip
    for r in results:
        lines.append(f"| {name(r)} | {r['image_size']} | {r['wall_s']:.0f} | "
                     f"{percent(r['val_accuracy_after_head'])} | "
                     f"{percent(r['final_val_accuracy'])} | {percent(r['best_val_accuracy'])} |")
    ours = [r for r in results if r["side"] == "flaxcnn"]
    for r in results[len(ours):]:
        for flax in ours:
            lines.append(f"wall time {name(flax)} / {FLAVOURS[r['side']]}: "
                         f"{flax['wall_s'] / r['wall_s']:.2f}x")  # fmt: skip
    lines.append("flaxcnn's workdirs: " + ", ".join(r["workdir"] for r in ours))
    return lines
