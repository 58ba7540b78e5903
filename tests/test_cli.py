"""The CLI end to end on a small slice of the real photos, with the real weights; its --help,
the package version, and a quiet TensorFlow."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import numpy as np
import pytest
from tolerances import assert_close

import flaxcnn
from flaxcnn import checkpoints, predict
from flaxcnn.experiments import transfer
from flaxcnn.models import CONV_IMPLS

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tensorflow_noise(stderr: str) -> list[str]:
    """TensorFlow's start-up lines (absl's prefix, oneDNN, CUDA stubs) in a process's stderr."""
    markers = ("oneDNN", "cudart_stub", "absl::InitializeLog", "cuInit", "I0000", "W0000")
    return [line for line in stderr.splitlines() if any(m in line for m in markers)]


@pytest.mark.slow
def test_transfer_cli_end_to_end_then_restore_and_predict(
    tiny_cats_vs_dogs, shared_weights, tmp_path
):
    workdir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FLAXCNN_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "flaxcnn.experiments.transfer", "--data", str(tiny_cats_vs_dogs),
        "--weights", str(shared_weights), "--no-download", "--image-size", "32",
        "--batch-size", "8", "--head-epochs", "1", "--finetune-epochs", "1",
        "--fine-tune-at", "block_16", "--conv-impl", "lax", "--workdir", str(workdir),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not _tensorflow_noise(done.stderr)
    assert "phase head: 2,562 trainable / 2,223,872 frozen" in done.stderr
    assert "features cached" in done.stderr
    report = json.loads((workdir / "metrics.json").read_text())
    assert [e["phase"] for e in report["epochs"]] == ["head", "finetune"]
    assert (workdir / "curves.png").stat().st_size > 10_000
    assert (workdir / "metrics.csv").read_text().count("\n") == 3
    assert json.loads((workdir / "config.json").read_text())["image_size"] == 32

    images = sorted(str(p) for p in (tiny_cats_vs_dogs / "validation").glob("*/*.jpg"))
    best_model, best_vars, best_meta = checkpoints.restore(workdir)  # the best checkpoint
    assert best_meta["class_names"] == ["cat", "dog"] and best_meta["preprocessing"] == "tf"
    # The same step from the resumable stream (full TrainState) predicts identically.
    step_dir = workdir / checkpoints.LATEST_DIR / str(checkpoints.complete_steps(
        workdir / checkpoints.BEST_DIR)[-1])  # fmt: skip
    state_model, state_vars, _ = checkpoints.restore(step_dir)
    best = predict.predict_files(best_model, best_vars, best_meta, images, top_k=2)
    same = predict.predict_files(state_model, state_vars, best_meta, images, top_k=2)
    assert best == same
    assert all(r["label"] in ("cat", "dog") and 0.5 <= r["probability"] <= 1.0 for r in best)

    out = subprocess.run(
        [sys.executable, "-m", "flaxcnn.predict", "--checkpoint", str(workdir), "--json",
         *images[:2]], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert not _tensorflow_noise(out.stderr)  # predict imports TensorFlow quietly too
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["image"] for r in rows] == images[:2]
    # Another process, batches of 2 instead of 16: other kernels, so the ImageNet weights'
    # rounding spread (<= 2.2e-5 of the features in the Keras parity); the probability moves
    # by p (1 - p) x the logit gap's change [measured 2.3e-7 of the probability].
    assert_close(rows[0]["probability"], best[0]["probability"], 1e-5, what="probability")


def test_fit_checkpoints_restore_to_the_in_memory_model(tiny_cats_vs_dogs, tmp_path):
    from flaxcnn.config import TrainConfig
    from flaxcnn.run import fit

    config = TrainConfig(
        data=str(tiny_cats_vs_dogs), download=False, model_options={"alpha": 0.35},
        weights=None, image_size=32,
        batch_size=8, head_epochs=1, finetune_epochs=1, fine_tune_at="Conv_1", conv_impl="lax",
    )  # fmt: skip
    result = fit(config, tmp_path / "run")
    model, variables, metadata = checkpoints.restore(
        tmp_path / "run" / checkpoints.LATEST_DIR, conv_impl="lax"
    )
    assert metadata["epoch"] == 2
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    expected = jax.jit(result.model.apply)(result.state.variables, images)
    # Same variables, formulation and shapes: separate compilations of the same program, which
    # a compiler may fuse differently by a few roundings (1e-6: 8 eps) [measured: bit-equal].
    assert_close(jax.jit(model.apply)(variables, images), expected, 1e-6, what="logits")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(result.state.variables),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Pointing at a non-checkpoint folder says what to pass.
    with pytest.raises(checkpoints.CheckpointError, match="pass a run folder"):
        checkpoints.restore(tmp_path)


def test_help_shows_each_default_once_and_the_conv_impl_choices(capsys):
    with pytest.raises(SystemExit) as done:
        transfer.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in text and "(default: False)" not in text
    # Each option's entry: its flags up to the next option's.
    entries = re.split(r" (?=--[a-z][a-z-]+(?: [A-Z_{]|,| --no-| [a-z(]))", text)
    entries = [e for e in entries if e.startswith("--")]
    assert len(entries) > 25
    repeated = [e for e in entries if e.count("default") > 1]
    assert not repeated, repeated
    for shown in ("(default: 32)", "(default: cosine)", "(0: off) (default: 0)"):
        assert shown in text  # --batch-size, --lr-schedule, --early-stopping-patience
    assert f"--conv-impl {{{','.join(CONV_IMPLS)}}}" in text


def test_version_comes_from_the_package_metadata_that_pyproject_defines():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert flaxcnn.__version__ == importlib.metadata.version("flaxcnn")
    assert flaxcnn.__version__ == pyproject["project"]["version"]


def test_importing_flaxcnn_data_and_decoding_a_truncated_jpeg_prints_nothing(
    tiny_cats_vs_dogs, tmp_path
):
    """TensorFlow's start-up lines (oneDNN, CUDA stubs, absl) and its jpeg_mem.cc decode errors
    stay out of stderr by default; TF_CPP_MIN_LOG_LEVEL=0, set by the user, shows them."""
    photo = next((tiny_cats_vs_dogs / "train" / "cat").glob("*.jpg")).read_bytes()
    folder = tmp_path / "data"
    for label in ("cat", "dog"):
        (folder / "train" / label).mkdir(parents=True)
        (folder / "train" / label / "ok.jpg").write_bytes(photo)
    (folder / "train" / "cat" / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    script = (f"import flaxcnn.data as d; s = d.open_dataset({str(folder)!r}, download=False); "
              "print(s.skipped)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "truncated.jpg" in quiet.stdout  # it was decoded, and found broken
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"}, timeout=300)  # fmt: skip
    assert loud.returncode == 0 and "jpeg_mem" in loud.stderr and "absl" in loud.stderr
