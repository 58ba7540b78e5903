"""Every family end to end through the real CLI: a whole two-phase run on a small photo
folder (random weights), then ``restore`` and ``predict`` of what it saved, against what the
run computed itself.

The default model's run is covered at length elsewhere (tests/test_cli.py,
tests/test_reliability.py); here one variant per other family runs, all started together
in the background when the module starts (XLA compiles on one core each), then checked. The
predict command line itself is tested on the default model (tests/test_predict.py); here its
library function, which it calls.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flaxcnn import checkpoints, models, predict

REPO = pathlib.Path(__file__).resolve().parent.parent


def _family(backbone) -> str:
    return getattr(backbone.module, "func", backbone.module).__module__


FAMILIES = {_family(b): b.name for b in reversed(models.BACKBONES.values())}
NAMES = sorted(name for name in FAMILIES.values() if name != models.DEFAULT_MODEL)
FLAGS = ["--weights", "none", "--no-download", "--image-size", "32", "--batch-size", "8",
         "--head-epochs", "1", "--finetune-epochs", "1", "--conv-impl", "lax",
         "--checkpoint-every-seconds", "0", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_cats_vs_dogs, tmp_path_factory):
    """Starts one CLI run per family at once; yields ``name -> (workdir, process, log)``."""
    root = tmp_path_factory.mktemp("families")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
           "FLAXCNN_CACHE": str(root / "cache")}  # fmt: skip
    started = {}
    for name in NAMES:
        workdir, log = root / name, root / f"{name}.log"
        command = [sys.executable, "-m", "flaxcnn.experiments.transfer", "--model", name,
                   "--data", str(tiny_cats_vs_dogs), "--workdir", str(workdir), *FLAGS]  # fmt: skip
        with open(log, "w") as out:
            started[name] = (workdir, subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                                       stderr=subprocess.STDOUT), log)  # fmt: skip
    yield started
    for _, process, _ in started.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_whole_run_then_restore_and_predict(runs, name, tiny_cats_vs_dogs):
    workdir, process, log = runs[name]
    assert process.wait(timeout=1200) == 0, log.read_text()[-3000:]
    output = log.read_text()
    backbone = models.get_backbone(name)
    first = backbone.fine_tune_layer(backbone.default_fine_tune_at)
    assert f"trainable from backbone/{first}" in output
    assert "features cached (one backbone pass)" in output
    assert "cached the validation activations entering" in output  # a stage cut of this family
    history = json.loads((workdir / "metrics.json").read_text())["epochs"]
    assert [e["phase"] for e in history] == ["head", "finetune"]
    assert all(np.isfinite(e["train_loss"]) for e in history)

    model, variables, metadata = checkpoints.restore(workdir)
    assert metadata["model"]["backbone"]["arch"] == name
    assert metadata["preprocessing"] == backbone.preprocessing
    assert ("batch_stats" in variables) == backbone.running_statistics
    # What restore + predict give equals what the run itself computed for the same checkpoint
    # (its error analysis of the validation split, in its own process): the label, the
    # probability (the CSV keeps 6 decimals) and the loss, -log p(true class).
    with open(workdir / "analysis" / "validation" / "predictions.csv") as f:
        analysed = {row["example"]: row for row in csv.DictReader(f)}
    assert len(analysed) == 16
    images = sorted(tiny_cats_vs_dogs.glob("validation/*/*.jpg"))
    rows = predict.predict_files(model, variables, metadata, images, top_k=2)
    for path, row in zip(images, rows, strict=True):
        want = analysed[str(path.relative_to(tiny_cats_vs_dogs))]
        assert row["label"] == want["predicted"]
        assert row["probability"] == pytest.approx(float(want["probability_predicted"]), abs=1e-5)
        # float32 softmax: p(true) keeps ~7 digits, so -log p agrees to ~1e-6 relative; 1e-4
        # of the loss leaves room for the two processes' kernels and still catches any other
        # weights or preprocessing (different logits move the loss by far more). Random
        # weights can push p(true) below float32's range (loss > ~87): those keep the label.
        loss = float(want["loss"])
        if loss < 80:
            p_true = row["probabilities"][want["true"]]
            assert -np.log(p_true) == pytest.approx(loss, rel=1e-4, abs=1e-5)
