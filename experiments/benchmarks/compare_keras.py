"""flaxcnn against Keras 3 on TensorFlow and tf_keras, each framework in a process of its own.

    python experiments/benchmarks/compare_keras.py --image-size 160 --jsonl rows.jsonl
    python experiments/benchmarks/compare_keras.py --model resnet50 --jsonl rows.jsonl
    python experiments/benchmarks/compare_keras.py --full --no-steps --jsonl rows.jsonl
    python experiments/benchmarks/compare_keras.py --smoke --full --data TINY_FOLDER

This script only coordinates (it imports neither jax nor TensorFlow). Per round it starts
``flaxcnn_side.py`` (flaxcnn's own settings: its glibc malloc tuning, XLA:CPU's thread pool),
then ``keras_side.py`` once per Keras flavour with a clean environment (no XLA_FLAGS, no malloc
or threading variables, TensorFlow's defaults: oneDNN, a thread per core; jax unimportable),
one after the other, never at the same time, all on the same cores (``--cores``); with
``--rounds`` the order is reversed every other round.

Steps (default): the TensorFlow transfer-learning tutorial's model for ``--model`` (Keras's
application of the registered model: base, ``preprocess_input``, GlobalAveragePooling,
Dropout 0.2, Dense; see keras_side.py) against flaxcnn's product steps (``flaxcnn.bench``),
on a fixed synthetic batch, ``--warmup`` untimed then ``--steps`` timed calls each; the
minimum and the median per step. flaxcnn's step gets the batch from the host every call, as
``fit`` does; Keras's is its ``train_function`` (``test_function``), the step ``fit``
(``evaluate``) calls, on an iterator over the batch. Cases:

  inference          flaxcnn's eval step / Keras's test step (forward, loss, accuracy)
  head               the head trains on images, backbone frozen; no augmentation either side
  head+augment       Keras: RandomFlip + RandomRotation(0.2) in the model. flaxcnn augments in
                     its tf.data pipeline: its figure is the head step plus one batch of
                     ``data.train_batches(augment=True)`` (decoded-image cache -> flip/rotate
                     -> batch), timed apart and added; ``fit`` overlaps the two, so this bounds
                     its cost from above. The pipeline rows (``input``, ``input+augment``)
                     are listed on their own. Needs ``--data``.
  head_cached        flaxcnn's default head phase on cached features (Keras has no such step)
  finetune           from the layer flaxcnn's contract resolves ``--fine-tune-at`` to (default
                     the model's); Keras freezes ``base.layers[:index]`` of that same layer,
                     and the trainable backbone parameter counts of both sides are compared
  finetune+augment   as head+augment, for the fine-tuning step

``--full`` adds the whole runs: the Keras recipe end to end (``image_dataset_from_directory``
of DATA/train and DATA/validation, ``--keras-image-size``, ``--batch-size``, Adam 1e-4 for
``--keras-head-epochs``, then 1e-5 from the fine-tuning layer for ``--keras-finetune-epochs``)
once per flavour, and ``python -m flaxcnn.experiments.transfer --data DATA --no-download
--workdir W --overwrite`` with its defaults plus ``--flaxcnn-args`` (and once more per
``--also-flaxcnn``, in workdirs W-1, W-2, ...); each process's wall time and validation
accuracies side by side.

``--jsonl`` appends every raw row (each step's milliseconds, each process's facts) as it
arrives. ``--smoke`` runs everything on tiny settings: it checks the machinery, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import process_report
from comparison_rows import (
    CASES,
    FLAVOURS,
    FLAXCNN_ROWS,
    Recorder,
    full_table,
    process_table,
    ratio_table,
    side_table,
)

HERE = pathlib.Path(__file__).resolve().parent
SHARED = pathlib.Path(os.environ.get("FLAXCNN_SHARED_DIR", HERE.parents[2] / "shared"))
PROG = "compare_keras.py"
# What reaches the Keras process from this one's environment: nothing that tunes a framework.
KERAS_ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
                  "TMPDIR", "TERM", "VIRTUAL_ENV", "LD_LIBRARY_PATH")  # fmt: skip
SMOKE = {"batch_size": 8, "image_size": 32, "keras_image_size": 32, "warmup": 1, "steps": 3,
         "conv_impl": "lax", "keras_head_epochs": 1, "keras_finetune_epochs": 1}  # fmt: skip
SMOKE_TRANSFER_FLAGS = ["--image-size", "32", "--batch-size", "8", "--conv-impl", "lax",
                        "--head-epochs", "1", "--finetune-epochs", "1"]  # fmt: skip


class CompareError(Exception):
    """One line for the user (exit 2), or a side's exit status when it already spoke."""

    def __init__(self, message: str = "", status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def keras_environment(flavour: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in KERAS_ENV_KEEP if k in os.environ}
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")  # logs only
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU comparison (flaxcnn's side: JAX_PLATFORMS=cpu)
    if flavour == "keras3":
        env["KERAS_BACKEND"] = "tensorflow"
    return env


def flaxcnn_environment() -> dict[str, str]:
    """This process's environment (the user's settings are flaxcnn's to use), on the CPU."""
    return {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def run_side(name: str, command: list[str], env: dict[str, str], recorder: Recorder,
             out: pathlib.Path | None) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """Runs one side to the end; returns the rows it wrote to ``out`` and its wall seconds."""
    if out is not None:
        out.unlink(missing_ok=True)
    print(f"\n[{name}] {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    status = subprocess.run(command, env=env).returncode
    wall = time.perf_counter() - start
    rows = []
    if out is not None and out.exists():
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    recorder.add(rows)
    if status == 2:  # the side printed its one-line error
        raise CompareError(status=2)
    if status:
        raise CompareError(f"the {name} side failed with exit status {status} (output above)")
    return rows, wall


def flaxcnn_command(args: argparse.Namespace, out: pathlib.Path, round_: int,
                    rows: Sequence[str], plan_only: bool = False) -> list[str]:  # fmt: skip
    command = [sys.executable, str(HERE / "flaxcnn_side.py"), "--out", str(out),
               "--round", str(round_), "--options", json.dumps(args.options),
               "--batch-size", str(args.batch_size), "--conv-impl", args.conv_impl,
               "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--rows", ",".join(rows)]  # fmt: skip
    for flag, value in (("--model", args.model), ("--image-size", args.image_size),
                        ("--fine-tune-at", args.fine_tune_at), ("--data", args.input_data)):
        command += [flag, str(value)] if value is not None else []  # fmt: skip
    return command + ["--plan-only"] * plan_only


def keras_command(args: argparse.Namespace, flavour: str, out: pathlib.Path, round_: int,
                  plan: dict[str, Any], image_size: int, mode: list[str]) -> list[str]:  # fmt: skip
    command = [sys.executable, str(HERE / "keras_side.py"), "--flavour", flavour,
               "--out", str(out), "--round", str(round_), "--application", plan["keras_name"],
               "--options", json.dumps(plan["options"]), "--image-size", str(image_size),
               "--batch-size", str(args.batch_size), "--fine-tune-layer",
               plan["fine_tune_layer"], "--weights", args.weights or "none",
               "--finetune-optimizer", args.keras_finetune_optimizer]  # fmt: skip
    return command + ["--jit-compile"] * args.keras_jit_compile + mode


def compare_steps(args: argparse.Namespace, recorder: Recorder, tmp: pathlib.Path) -> dict:
    """Every round, one process per side: flaxcnn, then each Keras flavour, in reverse order
    every other round (so that a drifting load favours no side); returns the plan."""
    flax_rows = sorted({r for case in args.cases for r in FLAXCNN_ROWS[case]})
    if "input+augment" in flax_rows:
        flax_rows.append("input")  # the pipeline without augmentation, for reference
    keras_cases = [c for c in args.cases if c != "head_cached"]
    mode = ["steps", "--cases", ",".join(keras_cases), "--warmup", str(args.warmup),
            "--steps", str(args.steps)]  # fmt: skip
    flax_env = flaxcnn_environment()
    plan = {}
    for round_ in range(args.rounds):
        sides = ["flaxcnn", *(args.flavours if keras_cases else [])]
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            out = tmp / f"{side}.jsonl"
            if side == "flaxcnn":
                command, env = flaxcnn_command(args, out, round_, flax_rows), flax_env
            else:  # round 0 ran flaxcnn first: the plan is known
                command = keras_command(args, side, out, round_, plan, plan["image_size"], mode)
                env = keras_environment(side)
            rows, _ = run_side(side, command, env, recorder, out)
            plan = next((r for r in rows if r["kind"] == "plan"), plan)
    return plan


def flaxcnn_full(args: argparse.Namespace, recorder: Recorder, plan: dict[str, Any],
                 extra: list[str], workdir: str) -> dict[str, Any]:  # fmt: skip
    """One whole flaxcnn run (its defaults plus ``extra``) in its own process; its row."""
    command = [sys.executable, "-m", "flaxcnn.experiments.transfer", "--data", args.data,
               "--no-download", "--workdir", workdir, "--overwrite",
               "--weights", args.weights or "none"]  # fmt: skip
    command += ["--model", plan["model"]] if args.model else []
    command += ["--fine-tune-at", args.fine_tune_at] if args.fine_tune_at else []
    for key, value in args.options.items():
        flag = "--" + key.replace("_", "-")
        command += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [
            flag, str(value)]  # fmt: skip
    command += extra
    _, wall = run_side("flaxcnn transfer", command, flaxcnn_environment(), recorder, None)
    metrics = json.loads((pathlib.Path(workdir) / "metrics.json").read_text())
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    epochs = metrics["epochs"]
    head = [e["val_accuracy"] for e in epochs if e["phase"] == "head"]
    row = {"kind": "full", "side": "flaxcnn", "wall_s": wall, "workdir": workdir,
           "flags": extra, "image_size": config.get("image_size"), "command": command,
           "val_accuracy_after_head": head[-1] if head else None,
           "final_val_accuracy": epochs[-1]["val_accuracy"],
           "best_val_accuracy": metrics["best_val_accuracy"]}  # fmt: skip
    recorder.add([row])
    return row


def compare_full(args: argparse.Namespace, recorder: Recorder, tmp: pathlib.Path,
                 plan: dict[str, Any]) -> list[str]:  # fmt: skip
    """The whole runs, one process each (flaxcnn's configurations first, then each Keras
    flavour); returns the table's lines."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="flaxcnn-compare-")
    configurations = [args.flaxcnn_args, *args.also_flaxcnn]
    results = [flaxcnn_full(args, recorder, plan, extra, workdir if i == 0 else f"{workdir}-{i}")
               for i, extra in enumerate(configurations)]  # fmt: skip
    for flavour in args.flavours:
        mode = ["full", "--data", args.data, "--head-epochs", str(args.keras_head_epochs),
                "--finetune-epochs", str(args.keras_finetune_epochs)]  # fmt: skip
        out = tmp / f"{flavour}-full.jsonl"
        command = keras_command(args, flavour, out, 0, plan, args.keras_image_size, mode)
        rows, wall = run_side(flavour, command, keras_environment(flavour), recorder, out)
        results.append({**next(r for r in rows if r["kind"] == "full"), "wall_s": wall})
        recorder.add([{"kind": "full_wall", "side": flavour, "wall_s": wall}])
    return full_table(args, results)


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. alpha=0.35")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a registered flaxcnn model (default: the registry's)")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a family option for both sides (Keras's keyword), e.g. alpha=0.35")
    p.add_argument("--image-size", type=int, help="steps' input side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fine-tune-at", help="Keras layer index or name (default: the model's)")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    p.add_argument("--flavours", default=",".join(FLAVOURS), help="keras3, tf_keras or both")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (default: 3)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (default: 20)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the processes in turn "
                   "(flaxcnn, Keras 3, tf_keras, then reversed, ...)")  # fmt: skip
    p.add_argument("--conv-impl", default="auto", choices=("auto", "lax", "unrolled"))
    p.add_argument("--cores", type=int, help="run every side on the first N usable cores")
    p.add_argument("--weights", help="Keras .h5 of the base for the Keras side and --full "
                   "(default: $FLAXCNN_WEIGHTS without --model, else random)")  # fmt: skip
    p.add_argument("--data", help="image folder (train/, validation/): flaxcnn's input rows "
                   f"and --full (default: {SHARED / 'data' / 'cats_vs_dogs'})")  # fmt: skip
    p.add_argument("--jsonl", help="append every raw row to this file")
    p.add_argument("--keras-jit-compile", action="store_true",
                   help="Keras with XLA (jit_compile=True; Keras's CPU default is off)")
    p.add_argument("--no-steps", action="store_true", help="skip the step comparison")
    p.add_argument("--full", action="store_true", help="also the whole two-phase runs")
    p.add_argument("--keras-image-size", type=int, default=160, help="the tutorial's 160")
    p.add_argument("--keras-head-epochs", type=int, default=10)
    p.add_argument("--keras-finetune-epochs", type=int, default=10)
    p.add_argument("--keras-finetune-optimizer", choices=("adam", "rmsprop"), default="adam",
                   help="Adam 1e-5 (default) or the older tutorial's RMSprop")
    p.add_argument("--workdir", help="flaxcnn's workdir for --full (default: a new temp dir)")
    p.add_argument("--also-flaxcnn", action="append", default=[], metavar="FLAGS",
                   help="with --full, another whole flaxcnn run with these extra flags (one "
                   "quoted string, e.g. '--image-size 160'); repeatable")
    p.add_argument("--smoke", action="store_true", help="tiny settings: the machinery only")
    p.add_argument("--flaxcnn-args", nargs=argparse.REMAINDER, default=[],
                   help="extra flags for flaxcnn.experiments.transfer (last on the line)")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
        if args.model is None and not args.option:
            args.option = [("alpha", 0.35)]
        args.weights = args.weights or "none"
        args.flaxcnn_args = SMOKE_TRANSFER_FLAGS + args.flaxcnn_args
    args.also_flaxcnn = [(SMOKE_TRANSFER_FLAGS if args.smoke else []) + shlex.split(flags)
                         for flags in args.also_flaxcnn]  # fmt: skip
    args.options = dict(args.option)
    args.cases = [c for c in args.cases.split(",") if c]
    args.flavours = [f for f in args.flavours.split(",") if f]
    for name, values, allowed in (("--cases", args.cases, CASES),
                                  ("--flavours", args.flavours, FLAVOURS)):  # fmt: skip
        if not values or set(values) - set(allowed):
            p.error(f"{name}: choose from {', '.join(allowed)}")
    for name in ("batch_size", "warmup", "steps", "rounds", "keras_image_size",
                 "keras_head_epochs", "keras_finetune_epochs"):  # fmt: skip
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.no_steps and not args.full:
        p.error("--no-steps leaves nothing to run: add --full")
    if args.image_size is not None and args.image_size < 32:
        p.error("--image-size must be at least 32")
    if args.weights is None:
        args.weights = os.environ.get("FLAXCNN_WEIGHTS") if args.model is None else None
    if args.weights and args.weights.lower() == "none":
        args.weights = None
    if args.weights:
        args.weights = os.path.abspath(args.weights)
        if not os.path.isfile(args.weights):
            p.error(f"no weights file {args.weights}: pass --weights PATH or none")
    data = args.data or str(SHARED / "data" / "cats_vs_dogs")
    if (args.data or args.full) and not os.path.isdir(os.path.join(data, "train")):
        p.error(f"--data {data} has no train/ folder: pass an image folder")
    args.data = os.path.abspath(data)
    args.input_data = args.data if os.path.isdir(os.path.join(data, "train")) else None
    if args.cores is not None and not 1 <= args.cores <= process_report.cores():
        p.error(f"--cores {args.cores}: this process may use 1..{process_report.cores()} cores")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cores is not None:  # inherited by every side
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    recorder = Recorder(args.jsonl)
    machine = {"kind": "machine", "cpu": process_report.cpu_model(),
               "cores": process_report.cores(), "load_average": process_report.load_average(),
               "time": time.time(), "argv": sys.argv, "smoke": args.smoke}  # fmt: skip
    recorder.add([machine])
    print(f"{PROG}: {machine['cpu']}, {machine['cores']} usable cores for every side; load "
          f"average (1, 5, 15 min) at start: {machine['load_average']}"
          + ("; SMOKE RUN: tiny settings, the numbers mean nothing" if args.smoke else ""))
    tables = []
    try:
        with tempfile.TemporaryDirectory(prefix="compare-keras-") as tmp:
            plan = {}
            if not args.no_steps:  # printed now: the whole runs can take an hour
                plan = compare_steps(args, recorder, pathlib.Path(tmp))
                print("\n".join(side_table(args, recorder, plan) + ratio_table(args, recorder)),
                      flush=True)  # fmt: skip
            if args.full:
                if not plan:
                    out = pathlib.Path(tmp) / "plan.jsonl"
                    rows, _ = run_side("flaxcnn plan", flaxcnn_command(
                        args, out, 0, [], plan_only=True), flaxcnn_environment(), recorder, out)
                    plan = rows[0]
                tables += compare_full(args, recorder, pathlib.Path(tmp), plan)
    except CompareError as e:
        if str(e):
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the rows so far are in {args.jsonl or '(no --jsonl)'}",
              file=sys.stderr)  # fmt: skip
        return 130
    tables += process_table(recorder)
    tables.append(f"\nload average at end: {process_report.load_average()}")
    print("\n".join(tables), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
