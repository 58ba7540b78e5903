"""Faults a run must survive, each injected for real: kill -9, SIGTERM/SIGINT (at any
moment), broken checkpoints, NaN, broken images, bad flags and paths; and what a run leaves
in its workdir and log. README.md "Failure modes" lists them.

The end-to-end tests run the real CLI in subprocesses on a tiny MobileNetV2 (alpha 0.35,
32x32, random init, 'lax' convs) over 16+8 real photos per class plus broken and odd image
files, and compare every interrupted run with one uninterrupted reference run: on CPU the
same seed gives bit-identical metrics and parameters. All processes share one persistent
compilation cache (``$FLAXCNN_CACHE``), and the reference runs in the background while the
kill -9 test runs, so each program compiles about once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import flaxcnn
from flaxcnn import checkpoints, report, tf_runtime
from flaxcnn.config import TrainConfig
from flaxcnn.experiments import transfer

PROG = "python -m flaxcnn.experiments.transfer"
STEPS_PER_EPOCH = 4  # 37 readable training images (32 photos + 5 odd files) // batch 8
RUN_FLAGS = [
    "--no-download", "--weights", "none", "--alpha", "0.35", "--image-size", "32",
    "--batch-size", "8", "--conv-impl", "lax", "--head-epochs", "2", "--finetune-epochs", "2",
    "--fine-tune-at", "block_16", "--head-learning-rate", "1e-2",
    "--finetune-learning-rate", "1e-3", "--keep-checkpoints", "20", "--log-every", "1",
    "--checkpoint-every-seconds", "0",
]  # fmt: skip
TIMING = {"epoch_seconds", "wall_seconds", "images_per_second"}
UNREADABLE = ["train/cat/empty.jpg", "train/cat/truncated.jpg", "train/dog/notes.jpg"]
# What TensorFlow's C++ libraries print unless flaxcnn keeps them quiet (flaxcnn.tf_runtime).
TENSORFLOW_NOISE = ("oneDNN", "cudart_stub", "absl::InitializeLog", "cuInit", "jpeg_mem",
                    "I0000", "W0000", "E0000")  # fmt: skip


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _restore_cli_logging():
    """The CLI points the 'flaxcnn' logger at the (captured) stderr; undo that afterwards."""
    logger = logging.getLogger("flaxcnn")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


@pytest.fixture(scope="module")
def messy_data(tiny_cats_vs_dogs, tmp_path_factory) -> pathlib.Path:
    """The tiny photo folder plus 3 unreadable files and 5 odd-but-valid images in train/,
    and a test split (the validation photos)."""
    root = tmp_path_factory.mktemp("messy") / "data"
    shutil.copytree(tiny_cats_vs_dogs, root)
    shutil.copytree(root / "validation", root / "test")
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    photo = next(iter(sorted(cat.glob("*.jpg")))).read_bytes()
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (dog / "notes.jpg").write_text("not an image, despite the name")
    rgba = Image.new("RGBA", (40, 30), (200, 120, 40, 255))
    rgba.putalpha(90)
    rgba.save(cat / "alpha.png")
    Image.new("L", (50, 40), 128).save(dog / "gray.jpg")
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(dog / "cmyk.jpg")
    Image.new("RGB", (1, 1), (0, 90, 200)).save(cat / "one_pixel.png")
    Image.new("RGB", (3000, 2000), (30, 60, 130)).save(dog / "huge.jpg", quality=50)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("flaxcnn-cache")


@pytest.fixture(scope="module")
def env(cache_dir) -> dict[str, str]:
    # JAX_PLATFORMS=cpu: bit-identical results are a CPU guarantee (README.md, Failure modes).
    # XLA's CPU backend at -O0 compiles MobileNetV2 about 3x faster; every process of these
    # tests uses it, so their results stay comparable bit for bit. TF_CPP_MIN_LOG_LEVEL is
    # left unset, as a user has it: the runs' logs must hold no TensorFlow noise.
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
    env = {**os.environ, "FLAXCNN_CACHE": str(cache_dir), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags.strip()}  # fmt: skip
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


class Run:
    """One CLI subprocess; stderr goes to a file that the test polls."""

    def __init__(self, workdir: pathlib.Path, data: pathlib.Path, env, *flags: str):
        self.workdir = workdir
        workdir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        command = [sys.executable, "-m", "flaxcnn.experiments.transfer", "--data", str(data),
                   *RUN_FLAGS, "--workdir", str(workdir), *flags]  # fmt: skip
        self.proc = subprocess.Popen(command, env=env, cwd=workdir.parent, stdout=self.log,
                                     stderr=subprocess.STDOUT)  # fmt: skip

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, condition, *, timeout: float = 300.0, poll: float = 0.005) -> None:
        """Polls ``condition()`` until it holds; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                ended = self.proc.poll() is not None
                self.kill()
                pytest.fail(("the run ended" if ended else "timed out") + " before the fault "
                            f"could be injected:\n{self.output[-3000:]}")  # fmt: skip
            time.sleep(poll)

    def wait(self, timeout: float = 400.0) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        return rc, self.output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no handler, no cleanup
        self.wait()


@pytest.fixture(scope="module")
def reference(messy_data, env, tmp_path_factory):
    """The uninterrupted run, started in the background on first use.

    Its workdir first holds an older run: ``--overwrite`` must replace it.
    """
    workdir = tmp_path_factory.mktemp("reference") / "run"
    (workdir / checkpoints.LATEST_DIR).mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    (workdir / "old-run-marker.txt").write_text("from an older run")
    run = Run(workdir, messy_data, env, "--overwrite")
    done = {}

    def result() -> tuple[int, str]:
        if not done:
            done["rc"], done["output"] = run.wait()
            assert done["rc"] == 0, done["output"][-3000:]
        return done["rc"], done["output"]

    run.result = result
    yield run
    run.kill()


# ----------------------------------------------------------------------------- helpers


def _steps(manager_dir: pathlib.Path) -> list[int]:
    if not manager_dir.is_dir():
        return []
    return sorted(int(p.name) for p in manager_dir.iterdir() if p.name.isdigit())


def _saving(workdir: pathlib.Path) -> list[pathlib.Path]:
    """Orbax's in-flight step folders (renamed to ``<step>`` when complete)."""
    found = []
    for sub in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
        with contextlib.suppress(FileNotFoundError):  # os.scandir: cheap enough to poll at 1 kHz
            found += [pathlib.Path(e.path) for e in os.scandir(workdir / sub)
                      if "orbax-checkpoint-tmp" in e.name]  # fmt: skip
    return found


def _kill_9_inside_a_save(run: Run, workdir: pathlib.Path) -> list[pathlib.Path]:
    """kill -9 while Orbax writes a resumable checkpoint, after the first one is complete.

    Polls every millisecond for Orbax's temporary step folder in ``checkpoints/``. When one
    appears, the run is frozen (SIGSTOP stops every thread at once, Orbax's writers too)
    and, if the folder is still there, killed (SIGKILL): the kill lands inside that save. A
    save that finished between the poll and the freeze (folder already renamed) is let go
    (SIGCONT) and the next one is caught. Returns the in-flight folders the kill left.
    """
    latest = workdir / checkpoints.LATEST_DIR
    writing = lambda: [p for p in _saving(workdir) if p.parent == latest]
    while True:
        run.wait_until(lambda: _steps(latest) and writing(), poll=0.001)
        run.proc.send_signal(signal.SIGSTOP)
        if writing():
            in_flight = _saving(workdir)
            run.kill()  # SIGKILL reaches a stopped process: it dies where it stood
            return in_flight
        run.proc.send_signal(signal.SIGCONT)


def _final_state(workdir: pathlib.Path) -> tuple[int, dict]:
    """The newest complete TrainState checkpoint (params, opt_state, rng, step) as numpy."""
    step = checkpoints.complete_steps(workdir / checkpoints.LATEST_DIR)[-1]
    path = workdir / checkpoints.LATEST_DIR / str(step) / "state"
    return step, jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def _tensorboard_scalars(workdir: pathlib.Path) -> dict[tuple[str, str], list]:
    """``{(run, tag): [(step, value), ...]}`` read back from the run's event files."""
    tf = tf_runtime.tensorflow()
    scalars: dict[tuple[str, str], list] = {}
    for run in ("train", "validation"):
        for path in sorted((workdir / report.TENSORBOARD_DIR / run).glob("events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    assert value.metadata.plugin_data.plugin_name == "scalars"
                    scalars.setdefault((run, value.tag), []).append(
                        (event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


def _assert_events_match_metrics(workdir: pathlib.Path) -> None:
    """Every per-epoch scalar of metrics.json is in the events once, in order, none more."""
    epochs = json.loads((workdir / "metrics.json").read_text())["epochs"]
    scalars = _tensorboard_scalars(workdir)
    tags = {tag for key, tag in report.TENSORBOARD_SCALARS.items() if key in epochs[0]}
    assert set(scalars) >= tags and len(tags) >= 5
    for key, (run, tag) in report.TENSORBOARD_SCALARS.items():
        want = [(e["epoch"], e[key]) for e in epochs if key in e]
        got = scalars.get((run, tag), [])
        assert [step for step, _ in got] == [step for step, _ in want], (run, tag)
        # Events hold float32: within half an ulp of float32 of metrics.json's float64.
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=2**-24)


def _comparable(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in epochs]


def _assert_same_run(workdir: pathlib.Path, reference_dir: pathlib.Path, epochs: int = 4) -> None:
    """Same per-epoch metrics (bit for bit, timing aside) and the same final TrainState."""
    got = json.loads((workdir / "metrics.json").read_text())
    want = json.loads((reference_dir / "metrics.json").read_text())
    assert _comparable(got["epochs"]) == _comparable(want["epochs"])
    assert len(got["epochs"]) == epochs and got["best_val_accuracy"] == want["best_val_accuracy"]
    (step, state), (want_step, want_state) = _final_state(workdir), _final_state(reference_dir)
    assert step == want_step == epochs * STEPS_PER_EPOCH
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(want_state), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not _saving(workdir), "a killed save's temporary folder was not cleaned up"


# ------------------------------------- kill -9, SIGTERM, SIGINT, broken checkpoints, resume


def _signal_line(output: str, signum: int, epoch: int) -> tuple[int, int]:
    """Checks the one-line stop message; returns (step, batch) of the saved checkpoint
    (batch STEPS_PER_EPOCH: the signal came in the epoch's last step or its validation)."""
    assert "Traceback" not in output, output[-3000:]
    line = output.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"{PROG}: stopped by signal {signum} at step (\d+) \((?:epoch {epoch}, batch (\d+) of "
        rf"{STEPS_PER_EPOCH}|end of epoch {epoch})\); checkpoint saved in (\S+); continue with "
        r"the same command plus --resume",
        line,
    )
    assert match, line
    return int(match[1]), int(match[2] or STEPS_PER_EPOCH)


@pytest.mark.slow
def test_kill_9_signals_and_broken_checkpoints_then_resume_equals_an_uninterrupted_run(
    reference, messy_data, env, tmp_path
):
    """One run, interrupted four ways; every --resume continues from the last good
    checkpoint, and the end result equals the uninterrupted run's bit for bit.

    1. kill -9 while a checkpoint is being written (the first one complete), checked: the
       save's temporary folder is left behind, then deleted by the next start;
    2. SIGTERM as fine-tuning starts: checkpoint at the next step, mid-epoch, exit 130;
    3. SIGINT (Ctrl-C) as the last epoch starts, after resuming mid-epoch;
    4. the three newest checkpoints break (left incomplete, a data file lost, metadata
       garbled): each is skipped with a warning naming it, and the run falls back to the end
       of the head phase (another phase: another optimizer state).
    """
    workdir = tmp_path / "run"
    latest = workdir / checkpoints.LATEST_DIR
    epoch_end = lambda epoch: epoch * STEPS_PER_EPOCH

    # 1. kill -9 inside a save: its temporary folder is left behind, its step incomplete.
    run = Run(workdir, messy_data, env)
    in_flight = _kill_9_inside_a_save(run, workdir)
    assert in_flight and all(p.is_dir() for p in in_flight), in_flight
    killed_steps = [int(p.name.split(".")[0]) for p in in_flight if p.parent == latest]
    for folder in in_flight:  # '<step>.orbax-checkpoint-tmp...' never became '<step>'
        assert int(folder.name.split(".")[0]) not in _steps(folder.parent), folder
    resumed_at = _steps(latest)[-1]
    assert resumed_at < min(killed_steps) and resumed_at < epoch_end(3), (resumed_at, in_flight)

    # 2. Resumed; SIGTERM as the first fine-tuning epoch (3) starts.
    run = Run(workdir, messy_data, env, "--resume")
    run.wait_until(lambda: "epoch 3 [finetune]" in run.output, poll=0.02)
    run.proc.send_signal(signal.SIGTERM)
    rc, output = run.wait()
    assert rc == 130, output[-3000:]
    assert f"resumed from {latest} at step {resumed_at} " in output
    assert not _saving(workdir), "the killed save's temporary folder was not cleaned up"
    assert not any(p.exists() for p in in_flight)  # deleted, never read as a checkpoint
    step, batch = _signal_line(output, int(signal.SIGTERM), epoch=3)
    assert 0 < batch < STEPS_PER_EPOCH and step == epoch_end(2) + batch
    metadata = checkpoints.read_metadata(latest)
    assert (metadata["epoch"], metadata["batch"]) == (2, batch)
    assert metadata["partial"]["count"] == 8 * batch  # the epoch's metric sums so far

    # 3. Resumed mid-epoch 3; SIGINT as epoch 4 starts. Epoch 3 must match the reference.
    run = Run(workdir, messy_data, env, "--resume")
    run.wait_until(lambda: "epoch 4 [finetune]" in run.output, poll=0.02)
    run.proc.send_signal(signal.SIGINT)
    rc, output = run.wait()
    assert rc == 130, output[-3000:]
    # The resume names the position in the words the stop used.
    assert (f"resumed from {latest} at step {step} (epoch 3, batch {batch} of "
            f"{STEPS_PER_EPOCH})") in output  # fmt: skip
    _signal_line(output, int(signal.SIGINT), epoch=4)  # mid-epoch, or at its end if late
    reference.result()
    got = json.loads((workdir / "metrics.json").read_text())["epochs"]
    want = json.loads((reference.workdir / "metrics.json").read_text())["epochs"]
    assert len(got) >= 3 and _comparable(got) == _comparable(want[: len(got)])

    # 4. The newest checkpoint (mid-epoch 4) was left without its commit metadata, the one
    #    of epoch 3 lost a data file, and the mid-epoch 3 one has garbled metadata.
    incomplete = latest / str(_steps(latest)[-1])
    corrupt = latest / str(epoch_end(3))
    garbled = latest / str(step)
    (incomplete / "_CHECKPOINT_METADATA").unlink()
    max((corrupt / "state").rglob("d/*"), key=lambda p: p.stat().st_size).unlink()
    (garbled / "metadata" / "metadata").write_text('{"format": "flaxcnn/1", "hist')
    rc, output = Run(workdir, messy_data, env, "--resume").wait()
    assert rc == 0, output[-3000:]
    assert f"ignoring incomplete checkpoint {incomplete} " in output
    assert f"ignoring unreadable checkpoint {corrupt} (" in output
    assert f"ignoring unreadable checkpoint {garbled} (" in output
    assert f"resumed from {latest} at step {epoch_end(2)} " in output
    for broken in (incomplete, corrupt, garbled):  # set aside, so those steps can be saved
        assert (latest / f"{broken.name}.unreadable").is_dir()
    assert checkpoints.complete_steps(latest)[-2:] == [epoch_end(3), epoch_end(4)]
    _assert_same_run(workdir, reference.workdir)
    # Epochs 3-4 ran three times (stopped, fallen back to epoch 2): TensorBoard has each once.
    _assert_events_match_metrics(workdir)


# ------------------------------------------------------------- a signal at any moment

STOPPED_BEFORE_ANY_CHECKPOINT = (
    rf"{PROG}: stopped by signal {{signum}} (?:during start-up, before anything was written|"
    r"(?:during start-up|as phase head was being prepared|in phase head), before any checkpoint "
    r"was saved); run the same command again"
)
STOPPED_AT_A_STEP = (
    rf"{PROG}: stopped by signal {{signum}} at step \d+ \((?:epoch 1, batch \d of "
    rf"{STEPS_PER_EPOCH}|end of epoch 1)\); checkpoint saved in \S+; continue with the same "
    r"command plus --resume"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "moment"),
    [
        (signal.SIGINT, 0.5),  # importing JAX and TensorFlow
        (signal.SIGTERM, "devices: "),  # building the model, initialising, compiling
        (signal.SIGINT, "phase head: "),  # caching the features, compiling the first step
    ],
)
def test_a_signal_at_any_moment_of_start_up_stops_with_exit_130_and_one_line(
    signum, moment, messy_data, env, tmp_path
):
    """Ctrl-C in the first seconds used to be lost (swallowed in JAX's GC callback: the run
    finished with exit 0). Every moment gets exit 130 and one line saying what is saved."""
    workdir = tmp_path / "run"
    run = Run(workdir, messy_data, env)
    if isinstance(moment, float):
        time.sleep(moment)
    else:
        run.wait_until(lambda: moment in run.output, poll=0.01)
    run.proc.send_signal(signum)
    rc, output = run.wait()
    assert rc == 130, output[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
    lines = output.strip().splitlines()
    nothing_saved = re.fullmatch(STOPPED_BEFORE_ANY_CHECKPOINT.format(signum=signum), lines[-1])
    assert nothing_saved or re.fullmatch(STOPPED_AT_A_STEP.format(signum=signum), lines[-1]), (
        lines[-1])
    if nothing_saved:  # and nothing left behind: the same command runs again as it is
        assert not workdir.exists()
    if isinstance(moment, float):
        assert len(lines) == 1, lines


# ------------------------------------------------------ what a run leaves, what it logs


@pytest.mark.slow
def test_the_run_records_what_ran_logs_plain_lines_and_no_tensorflow_noise(reference, messy_data):
    """The reference run, its log a file as under Slurm: config.json's record, the list of
    unreadable images, test results of the best checkpoint and the last state, TensorBoard
    events equal to metrics.json, progress as plain lines, and not one line of TensorFlow."""
    _, output = reference.result()
    workdir = reference.workdir
    text = (workdir / "config.json").read_text()
    record = json.loads(text)
    assert record["workdir"] == str(workdir.resolve())
    [invocation] = record["invocations"]  # the --overwrite'n older run left no record behind
    assert invocation["flaxcnn_version"] == flaxcnn.__version__
    assert invocation["command"].startswith(f"{PROG} --data {messy_data} --no-download ")
    assert invocation["command"].endswith(" --overwrite") and invocation["start_step"] == 0
    assert invocation["cwd"] == str(workdir.parent) and "changed" not in invocation
    assert TrainConfig.from_json(text).finetune_epochs == 2  # still a TrainConfig to read

    assert (workdir / "unreadable_images.txt").read_text().splitlines() == UNREADABLE

    summary = json.loads((workdir / "metrics.json").read_text())
    _, _, restored = checkpoints.restore(workdir)
    best, last = summary["test_best"], summary["test"]
    assert best["epoch"] == restored["epoch"] and last["epoch"] == 4
    assert best["count"] == last["count"] == 16
    assert output.strip().splitlines()[-1] == (
        f"best validation accuracy {summary['best_val_accuracy']:.4f}; test accuracy "
        f"{best['accuracy']:.4f} (best checkpoint, epoch {best['epoch']}), "
        f"{last['accuracy']:.4f} (last state); results in {workdir}")  # fmt: skip

    _assert_events_match_metrics(workdir)

    assert "\r" not in output  # no progress bar fragments in a log file
    for batch in (1, 2):  # --log-every 1: the running metrics of each finished batch
        assert re.search(rf"epoch 3 \[finetune\] batch {batch}/{STEPS_PER_EPOCH}: loss "
                         r"\d\.\d{4} acc \d\.\d{4}, \d+ img/s\n", output), output[-3000:]
    noise = [line for line in output.splitlines() if any(n in line for n in TENSORFLOW_NOISE)]
    assert not noise


@pytest.mark.slow
def test_a_finished_run_extends_its_last_phase_and_records_only_what_ran(
    reference, messy_data, env, tmp_path
):
    """--resume with more fine-tuning epochs on a finished run trains them (it used to train
    nothing and rewrite config.json); fewer are refused; the same flags write nothing."""
    reference.result()
    workdir = tmp_path / "run"
    shutil.copytree(reference.workdir, workdir)
    before = {name: (workdir / name).read_text() for name in ("config.json", "metrics.json")}

    rc, output = Run(workdir, messy_data, env, "--resume", "--finetune-epochs", "1").wait()
    assert rc == 2, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        f"{PROG}: error: --finetune-epochs 1: phase finetune of {workdir} ended after 2 epochs "
        "(--finetune-epochs 2) and it is complete; pass --finetune-epochs 2 or more to extend "
        "it, or start a new run (another --workdir, or --overwrite)")  # fmt: skip

    rc, output = Run(workdir, messy_data, env, "--resume").wait()
    assert rc == 0, output[-3000:]
    assert f"nothing to train: {workdir} finished at step 16 (end of epoch 4)" in output
    assert before == {name: (workdir / name).read_text() for name in before}

    rc, output = Run(workdir, messy_data, env, "--resume", "--finetune-epochs", "4").wait()
    assert rc == 0, output[-3000:]
    assert "extending phase finetune from 2 to 4 epochs: its cosine schedule is laid out" in output
    epochs = json.loads((workdir / "metrics.json").read_text())["epochs"]
    want = json.loads(before["metrics.json"])["epochs"]
    assert _comparable(epochs[:4]) == _comparable(want)
    assert [(e["epoch"], e["phase"]) for e in epochs[4:]] == [(5, "finetune"), (6, "finetune")]
    # The cosine over the 4 epochs (16 steps) from where the phase stood: steps 11 and 15.
    peak, steps = 1e-3, 4 * STEPS_PER_EPOCH
    for record, k in zip(epochs[4:], (11, 15), strict=True):
        rate = peak * 0.5 * (1 + math.cos(math.pi * k / steps))
        # optax computes the cosine in float32: a few ulps of float32 at the peak's scale.
        assert record["learning_rate"] == pytest.approx(rate, rel=0, abs=peak * 2**-21)
    assert checkpoints.complete_steps(workdir / checkpoints.LATEST_DIR)[-1] == 24
    record = json.loads((workdir / "config.json").read_text())
    assert record["finetune_epochs"] == 4
    assert len(record["invocations"]) == 2  # the refused run and the no-op added nothing
    resumed = record["invocations"][-1]
    assert resumed["start_step"] == 16 and resumed["changed"]["finetune_epochs"] == [2, 4]
    assert resumed["command"].endswith("--resume --finetune-epochs 4")
    _assert_events_match_metrics(workdir)


@pytest.mark.slow
def test_signal_mid_epoch_then_resume_is_bit_identical_at_default_xla_optimisation(
    messy_data, cache_dir, tmp_path
):
    """The test above runs XLA at -O0 (3x faster compiles); users run XLA's default level.
    There too, a fine-tuning epoch on images (augmentation, dropout, shuffled order) stopped
    by SIGTERM after its first step and continued with --resume ends with an uninterrupted
    run's metrics and TrainState, bit for bit. (No head phase: its epochs on cached features
    are one lax.scan each, so a signal lands at an epoch end there.)"""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FLAXCNN_CACHE": str(cache_dir),
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    assert "optimization_level" not in env.get("XLA_FLAGS", "")
    one_epoch = ("--head-epochs", "0", "--finetune-epochs", "1")
    rc, output = Run(tmp_path / "reference", messy_data, env, *one_epoch).wait()
    assert rc == 0, output[-3000:]
    run = Run(tmp_path / "run", messy_data, env, *one_epoch)  # compiled: the persistent cache
    run.wait_until(lambda: "epoch 1 [finetune]" in run.output, poll=0.02)
    run.proc.send_signal(signal.SIGTERM)
    rc, output = run.wait()
    assert rc == 130, output[-3000:]
    step, batch = _signal_line(output, int(signal.SIGTERM), epoch=1)
    assert 0 < batch < STEPS_PER_EPOCH and step == batch
    rc, output = Run(tmp_path / "run", messy_data, env, *one_epoch, "--resume").wait()
    assert rc == 0, output[-3000:]
    assert f"at step {step} (epoch 1, batch {batch} of {STEPS_PER_EPOCH})" in output
    _assert_same_run(tmp_path / "run", tmp_path / "reference", epochs=1)


# ------------------------------------------------------------------------ broken images


@pytest.mark.slow
def test_broken_images_are_skipped_and_counted_in_a_whole_run(reference):
    """Empty, truncated and text-as-.jpg files are skipped and counted; RGBA PNG, grayscale,
    CMYK JPEG, 1x1 and 3000x2000 images train like any other. (--overwrite also replaced
    the older run that the reference workdir held.)"""
    _, output = reference.result()
    assert "skipped 3 unreadable images, e.g. train/" in output
    assert not (reference.workdir / "old-run-marker.txt").exists()
    report = json.loads((reference.workdir / "metrics.json").read_text())
    assert [e["phase"] for e in report["epochs"]] == ["head", "head", "finetune", "finetune"]
    assert all(math.isfinite(e["train_loss"]) for e in report["epochs"])


# ------------------------------------------------------------------ corrupted checkpoints


@pytest.mark.slow
# Orbax leaves an un-awaited coroutine and a closed event loop behind a failed restore.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_restore_skips_partial_and_corrupted_steps_with_a_warning(
    reference, tmp_path, caplog, monkeypatch
):
    """flaxcnn.checkpoints.restore on a run folder whose newest steps are broken."""
    reference.result()
    run = tmp_path / "run"
    for sub in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
        shutil.copytree(reference.workdir / sub, run / sub)
    latest = run / checkpoints.LATEST_DIR
    final = 4 * STEPS_PER_EPOCH
    # A step folder that a crash left without its commit metadata ...
    (latest / str(final) / "_CHECKPOINT_METADATA").unlink()
    # ... one with a data file missing, and a best checkpoint with its variables gone.
    victim = latest / str(final - STEPS_PER_EPOCH)
    next(iter((victim / "state").rglob("d/*"))).unlink()
    best = run / checkpoints.BEST_DIR / str(checkpoints.complete_steps(run / "best")[-1])
    shutil.rmtree(best / "variables" / "d")
    monkeypatch.setattr(logging.getLogger("flaxcnn"), "propagate", True)  # the CLI sets False
    caplog.set_level(logging.WARNING, logger="flaxcnn")

    _, variables, metadata = checkpoints.restore(run)
    assert metadata["epoch"] == 2  # best -> latest 16 (incomplete) -> 12 (corrupt) -> 8
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"ignoring incomplete checkpoint {latest / str(final)}" in w for w in warnings)
    assert any(f"ignoring unreadable checkpoint {victim} (" in w for w in warnings)
    assert any(f"ignoring unreadable checkpoint {best} (" in w for w in warnings)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))

    with pytest.raises(checkpoints.CheckpointError, match=f"no readable checkpoint at {victim}"):
        checkpoints.restore(victim)  # an explicit step folder: no silent substitute


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.slow
def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(
    reference, messy_data, env, tmp_path
):
    """Resumes the reference run after its first epoch with --head-learning-rate 3e38: the
    weights overflow in epoch 2 (AdamW's decay term turns 3e38 weights into inf); one line
    names the step, and nothing non-finite is saved."""
    reference.result()
    workdir = tmp_path / "run"
    first = workdir / checkpoints.LATEST_DIR / str(STEPS_PER_EPOCH)
    shutil.copytree(reference.workdir / checkpoints.LATEST_DIR / first.name, first)
    run = Run(workdir, messy_data, env, "--resume", "--head-learning-rate", "3e38",
              "--weight-decay", "0.1")  # fmt: skip
    rc, output = run.wait()
    assert rc == 3, output[-3000:]
    assert "Traceback" not in output
    assert re.fullmatch(
        rf"{PROG}: error: (loss became (nan|inf|-inf)|the parameters became NaN/Inf) at step "
        r"\d+ \(epoch 2\); stopped without saving.*--resume",
        output.strip().splitlines()[-1],
    ), output[-1000:]
    assert checkpoints.complete_steps(workdir / checkpoints.LATEST_DIR) == [STEPS_PER_EPOCH]
    assert not _steps(workdir / checkpoints.BEST_DIR) and not _saving(workdir)
    _, state = _final_state(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------------ bad flags and paths


def _bad_folders(root: pathlib.Path) -> dict[str, pathlib.Path]:
    no_classes = root / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "train" / "photo.jpg").write_bytes(b"")
    empty_class = root / "empty_class"
    (empty_class / "train" / "cat").mkdir(parents=True)
    (empty_class / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(empty_class / "train" / "dog" / "a.jpg")
    return {"no_classes": no_classes, "empty_class": empty_class}


@pytest.mark.parametrize(
    ("flags", "flag", "allowed"),
    [
        (["--data", "no_such_dataset_xyz"], "--data", "unknown TFDS dataset"),
        (["--data", "{no_classes}"], "--data", "no class subfolders"),
        (["--data", "{empty_class}"], "--data", "has no images"),
        (["--image-size", "16"], "--image-size", "an integer >= 32"),
        (["--fine-tune-at", "500"], "--fine-tune-at", "MobileNetV2 has Keras layers 1.."),
        (["--fine-tune-at", "block_99"], "--fine-tune-at", "block_16, Conv_1"),
        (["--weights", "{tmp}/missing.h5"], "--weights", "imagenet, none, or a Keras .h5"),
        (["--batch-size", "0"], "--batch-size", "a positive integer"),
        (["--batch-size", "64"], "--batch-size", "lower --batch-size"),
        (["--dtype", "float16"], "--dtype", "'float32', 'bfloat16'"),
        (["--alpha", "0.3"], "--alpha", "0.35"),
        (["--validation-fraction", "1.5"], "--validation-fraction", "0 < f < 1"),
        (["--head-learning-rate", "inf"], "--head-learning-rate", "a positive number"),
        (["--lr-schedule", "linear"], "--lr-schedule", "'cosine', 'constant'"),
        (["--checkpoint-every-seconds", "-1"], "--checkpoint-every-seconds", "a number >= 0"),
        (["--workdir", "{file}/sub"], "--workdir", "not writable"),
        (["--resume"], "--resume", "holds no run to continue"),
    ],
)
def test_bad_flag_exits_non_zero_with_one_line_and_touches_nothing(
    flags, flag, allowed, tiny_cats_vs_dogs, tmp_path, capsys
):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file: nothing can be created below it")
    names = {"tmp": tmp_path, "file": blocker, **_bad_folders(tmp_path)}
    flags = [f.format(**names) for f in flags]
    workdir = tmp_path / "out"
    argv = ["--data", str(tiny_cats_vs_dogs), *RUN_FLAGS, "--workdir", str(workdir), *flags,
            "--no-compilation-cache"]  # fmt: skip
    try:
        rc = transfer.main(argv)
    except SystemExit as e:  # argparse rejects --dtype float16 itself
        rc = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{PROG}: error: ") and flag in lines[0] and allowed in lines[0]
    assert not workdir.exists()  # not even an empty folder is left behind
    assert blocker.read_text().startswith("a regular file")


def test_existing_workdir_is_refused_without_resume_and_never_deleted_unless_a_run(
    tiny_cats_vs_dogs, tmp_path, capsys
):
    argv = ["--data", str(tiny_cats_vs_dogs), *RUN_FLAGS, "--no-compilation-cache"]
    previous_run = tmp_path / "previous_run"
    (previous_run / checkpoints.LATEST_DIR).mkdir(parents=True)
    (previous_run / "config.json").write_text("{}")
    assert transfer.main([*argv, "--workdir", str(previous_run)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "--workdir" in line and "--resume" in line and "--overwrite" in line
    assert (previous_run / "config.json").read_text() == "{}"
    # --overwrite deletes the run only once the new one is accepted: bad data keeps it.
    bad_data = ["--data", str(tmp_path / "no_such_folder"), "--no-download"]
    assert transfer.main([*argv, *bad_data, "--workdir", str(previous_run), "--overwrite"]) == 2
    assert "--data" in capsys.readouterr().err
    assert (previous_run / "config.json").read_text() == "{}"

    documents = tmp_path / "documents"  # not a run: --overwrite must not delete it
    documents.mkdir()
    (documents / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        assert transfer.main([*argv, "--workdir", str(documents), *extra]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and "--workdir" in line and "holds no run" in line
    assert (documents / "thesis.tex").read_text() == "precious"
