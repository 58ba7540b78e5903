"""``experiments/benchmarks/compare_keras.py`` compares flaxcnn with Keras fairly: each framework
in a process of its own, one after the other, the Keras ones with a clean environment (no jax,
no flaxcnn, glibc's default malloc), equal work, and minimum and median reported.

Real subprocesses, real TensorFlow with Keras 3 and tf_keras, on ``--smoke`` settings (32 px,
a few steps, one epoch on the tiny folder): these check the machinery, never speed.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "experiments" / "benchmarks" / "compare_keras.py"
# Set for the comparison: flaxcnn's process may see them, the Keras processes must not (the
# old script ran Keras inside the flaxcnn process, under its malloc tuning and XLA flags).
PARENT_SETTINGS = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false", "MALLOC_ARENA_MAX": "1"}


def _compare(*flags: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **PARENT_SETTINGS}
    return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True,
                          text=True, env=env, timeout=timeout)  # fmt: skip


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_steps_run_in_separate_clean_processes_and_report_min_and_median(
    tiny_cats_vs_dogs, tmp_path
):
    jsonl = tmp_path / "rows.jsonl"
    done = _compare("--smoke", "--cases", "finetune+augment", "--data", str(tiny_cats_vs_dogs),
                    "--jsonl", str(jsonl))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(jsonl)
    processes = {r["side"]: r for r in rows if r["kind"] == "process"}
    assert set(processes) == {"flaxcnn", "keras3", "tf_keras"}
    pids = {r["pid"] for r in processes.values()}
    assert len(pids) == 3 and os.getpid() not in pids
    for r in rows:  # every timed row came from its side's process
        if r["kind"] == "step":
            assert r["pid"] == processes[r["side"]]["pid"]
    order = sorted(processes.values(), key=lambda r: r["started"])
    assert [r["side"] for r in order] == ["flaxcnn", "keras3", "tf_keras"]
    assert all(a["time"] <= b["started"] for a, b in itertools.pairwise(order))  # never together
    for flavour in ("keras3", "tf_keras"):
        keras = processes[flavour]
        assert keras["imported"] == {"jax": False, "jaxlib": False, "flax": False,
                                     "flaxcnn": False}  # fmt: skip
        assert not keras["jaxlib_mapped"]  # no XLA:CPU runtime in the process at all
        assert not {"XLA_FLAGS", "MALLOC_ARENA_MAX"} & set(keras["settings"])
        assert keras["malloc_arenas"] > 1  # glibc's default: an arena per allocating thread
        assert keras["tf_intra_op_threads"] == keras["tf_inter_op_threads"] == 0  # TF's own
        assert keras["cores"] == processes["flaxcnn"]["cores"]
    flax = processes["flaxcnn"]
    assert flax["malloc_tuned"] and flax["malloc_arenas"] == 1  # flaxcnn's own setting
    assert flax["settings"]["XLA_FLAGS"] == PARENT_SETTINGS["XLA_FLAGS"]

    steps = {(r["side"], r.get("row") or r["case"]): r for r in rows if r["kind"] == "step"}
    assert {("flaxcnn", "finetune"), ("flaxcnn", "input+augment"), ("flaxcnn", "input"),
            ("keras3", "finetune+augment"), ("tf_keras", "finetune+augment")} == set(steps)
    for r in steps.values():
        assert len(r["ms"]) == 3 and r["ms_min"] == min(r["ms"]) > 0
    trainable = {r.get("trainable_backbone_params") for r in steps.values()} - {None}
    assert len(trainable) == 1 and trainable.pop() > 0  # the same layers train on every side

    lines = done.stdout.splitlines()
    headers = [line for line in lines if line.startswith("| side | case |")]
    assert len(headers) == 1  # the table is printed once
    header = headers[0]
    assert "| ms/step (median) | ms/step (min) |" in header
    ratio = next(line for line in lines if line.startswith("| finetune+augment |"))
    cells = [c.strip() for c in ratio.strip("|").split("|")]
    assert all(re.fullmatch(r"\d+\.\d+ \(\d+\.\d+\)", c) for c in cells[1:4]), ratio
    assert all(re.fullmatch(r"\d+\.\d+x \(\d+\.\d+x\)", c) for c in cells[4:6]), ratio
    assert sum("trainable backbone parameters when fine-tuning" in line
               and line.endswith("(equal)") for line in lines) == 2  # fmt: skip


@pytest.mark.slow
def test_whole_runs_each_in_its_own_process(tiny_cats_vs_dogs, tmp_path):
    jsonl, workdir = tmp_path / "rows.jsonl", tmp_path / "flaxcnn-run"
    # Keras 3 only: the tf_keras side's start-up is covered above, and its fit is the same
    # code path; each whole run costs ~20 s of CPU.
    # A second flaxcnn configuration in the same command (the last flag wins: 40 px).
    done = _compare("--smoke", "--full", "--no-steps", "--flavours", "keras3", "--data",
                    str(tiny_cats_vs_dogs), "--workdir", str(workdir), "--jsonl", str(jsonl),
                    "--also-flaxcnn", "--image-size 40 --finetune-epochs 0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(jsonl)
    ours = [r for r in rows if r["kind"] == "full" and r["side"] == "flaxcnn"]
    assert [r["workdir"] for r in ours] == [str(workdir), f"{workdir}-1"]
    assert [r["image_size"] for r in ours] == [32, 40]
    assert (workdir / "metrics.json").exists()
    full = {r["side"]: r for r in rows if r["kind"] == "full"}
    assert set(full) == {"flaxcnn", "keras3"} and full["keras3"]["image_size"] == 32
    for r in [*ours, full["keras3"]]:
        assert 0.0 <= r["final_val_accuracy"] <= r["best_val_accuracy"] <= 1.0
    keras_wall = next(r["wall_s"] for r in rows if r["kind"] == "full_wall")
    assert keras_wall > full["keras3"]["head_s"] + full["keras3"]["finetune_s"]
    process = next(r for r in rows if r["kind"] == "process")
    assert process["side"] == "keras3" and not process["imported"]["jax"]
    lines = done.stdout.splitlines()
    assert any(line.startswith("| Keras 3 recipe | 32 |") for line in lines)
    ratios = [line for line in lines if line.startswith("wall time flaxcnn transfer (")]
    assert len(ratios) == 2
    assert all(line.split(" / ")[-1].startswith("Keras 3: ") for line in ratios)
    assert "--image-size 40 --finetune-epochs 0)" in ratios[1]


KERAS_FREEZE = """
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
import keras_side
keras, tf = keras_side.import_keras("keras3")
for plan in json.loads(sys.argv[2]):
    args = argparse.Namespace(application=plan["keras_name"], image_size=32, weights=None,
                              options=plan["options"], num_classes=2)
    model, base = keras_side.recipe_model(keras, args, augment=False)
    index = keras_side.set_phase(base, "finetune", plan["fine_tune_layer"])
    print(json.dumps([base.layers[index].name, keras_side.parameter_count(base.trainable_weights)]))
"""


@pytest.mark.slow
def test_keras_3_fine_tunes_the_layers_flaxcnn_fine_tunes_in_other_families():
    """Keras 3 lists some families' layers unlike tf_keras (whose list flaxcnn's contract
    follows: MobileNetV3's 'expanded_conv_8/expand' is Keras 3's 'expanded_conv_8_expand',
    and its hard-swish and ConvNeXt's blocks add or drop layers), so the Keras side freezes by
    the layer's name, and both sides train the same parameters."""
    sys.path.insert(0, str(SCRIPT.parent))
    import flaxcnn_side

    plans = [flaxcnn_side.plan(name, {}, 32, None)
             for name in ("mobilenet_v3_small", "convnext_tiny", "efficientnet_v2_b0")]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", KERAS_FREEZE, str(SCRIPT.parent),
                           json.dumps(plans)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    keras = [json.loads(line) for line in done.stdout.splitlines()]
    assert keras[0][0] == "expanded_conv_8_expand" != plans[0]["fine_tune_layer"]
    for plan, (layer, trainable) in zip(plans, keras, strict=True):
        assert layer.replace("_", "/") == plan["fine_tune_layer"].replace("_", "/")
        assert trainable == flaxcnn_side.trainable_backbone_params(plan) > 0


def test_bad_flags_fail_in_one_line_before_anything_runs(tmp_path):
    for flags, named in ((["--full", "--data", str(tmp_path / "missing")], "missing"),
                         (["--cases", "warp_drive"], "--cases"),
                         (["--weights", str(tmp_path / "none.h5")], "none.h5")):  # fmt: skip
        done = _compare(*flags, "--jsonl", str(tmp_path / "rows.jsonl"), timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("compare_keras.py: error: ") and named in lines[0]
        assert not (tmp_path / "rows.jsonl").exists()  # nothing ran


def test_unknown_model_fails_in_one_line(tmp_path):
    done = _compare("--model", "warp_net", "--jsonl", str(tmp_path / "rows.jsonl"), timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "unknown model 'warp_net'" in lines[0] and "mobilenet_v2" in lines[0]
