"""Where a run stands and what resuming it means: positions, phases left to train, the record.

A checkpoint's metadata holds its position (``epoch``: epochs done, ``epoch_in_phase``,
``batch``: batches done in the epoch in progress, ``phase_index``, ``phase_complete``). Resuming
continues from there with the flags it is given, which may lengthen the phase the run stands
in, or the one it has just completed (extending a finished run: see :func:`phases_to_run`);
a phase that has ended, and that the run has moved past, cannot change.

``config.json`` is the run record: the configuration in force, and one entry per invocation
(command line, working folder, flaxcnn version, the step it started from, the settings it
changed), so that it describes what ran across resumes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pathlib
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flaxcnn
from flaxcnn import checkpoints, phases, report
from flaxcnn.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)
RUN_MARKERS = ("config.json", checkpoints.LATEST_DIR, checkpoints.BEST_DIR, "metrics.json")
# The flag that sets each phase's epochs (phase names are the engine's, see flaxcnn.phases).
EPOCHS_FLAG = {"head": "--head-epochs", "train": "--head-epochs", "finetune": "--finetune-epochs"}
FRESH_START = {"phase_index": 0, "epoch": 0, "epoch_in_phase": 0, "batch": 0,
               "phase_complete": False, "history": [], "partial": None,
               "batches_in_epoch": None, "phase_epochs": None}  # fmt: skip


def holds_run(workdir: str | os.PathLike) -> bool:
    """Whether a folder holds a flaxcnn run (config.json, checkpoints/, best/ or metrics.json)."""
    path = pathlib.Path(workdir)
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def check_workdir(workdir: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a workdir that ``fit`` must not write into (the CLI checks first, in terms of
    its flags); changes nothing."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file; pass a folder")
    if resume or not workdir.exists() or not any(workdir.iterdir()):
        return
    if not holds_run(workdir):  # overwrite deletes runs only, never other files
        raise ConfigError(f"workdir {workdir} is not empty and holds no run (no "
                          f"{', '.join(RUN_MARKERS)}); pass an empty or new folder")  # fmt: skip
    if not overwrite:
        raise ConfigError(f"workdir {workdir} already holds a run; pass resume=True to continue "
                          "it or overwrite=True to replace it")  # fmt: skip


def describe_position(position: Mapping[str, Any], batches_in_epoch: int) -> str:
    """``'epoch 10, batch 1 of 31'`` (mid-epoch) or ``'end of epoch 10'``: the same words
    when a run stops and when it resumes from that checkpoint."""
    if position.get("batch"):
        n = position.get("batches_in_epoch") or batches_in_epoch
        return f"epoch {position['epoch'] + 1}, batch {position['batch']} of {n}"
    return f"end of epoch {position['epoch']}"


def recorded_phase_epochs(metadata: Mapping[str, Any]) -> list[int] | None:
    """The epochs per phase that the checkpoint's run was planned with (None: unknown)."""
    if metadata.get("phase_epochs") is not None:
        return list(metadata["phase_epochs"])
    try:  # checkpoints written before phase_epochs was recorded
        return [p.epochs for p in phases.plan(TrainConfig.from_json(json.dumps(
            metadata["config"])))]  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None


def phases_to_run(plan: Sequence[phases.Phase], start: Mapping[str, Any],
                  workdir: pathlib.Path) -> dict[int, int]:  # fmt: skip
    """``{phase index: epochs of it already trained}`` of the phases left to train.

    The phase the run stands in continues (it may be made longer, not shorter than what it
    has trained). The phase it has just completed is extended when given more epochs than it
    was planned with, as Keras's ``fit(initial_epoch=...)`` continues a model: same step,
    optimizer state and data order, its schedule laid out again over the new length (a
    constant rate goes on unchanged; a cosine goes on from the new curve's value at that
    step, e.g. 0.96% of its peak at epoch 30 of 32, down to 0). Any other change to a phase
    that has ended is refused.

    Raises:
      ConfigError: the flags change a phase that has ended, or shorten one below what it has
        trained; the message names the flag and the values that would work.
    """
    here, done, complete = start["phase_index"], start["epoch_in_phase"], start["phase_complete"]
    recorded = start["phase_epochs"]
    trained = collections.Counter(record["phase"] for record in start["history"])
    new_run = "start a new run (another --workdir, or --overwrite)"
    todo = {}
    for index, phase in enumerate(plan):
        flag = EPOCHS_FLAG.get(phase.name, "epochs")
        if index < here or (index == here and complete):
            planned = recorded[index] if recorded and index < len(recorded) else None
            if index == here and phase.epochs > (planned if planned is not None else done):
                todo[index] = done  # extended
            elif planned is not None and phase.epochs != planned:
                moved_on = "the run has moved past it" if index < here else "it is complete"
                raise ConfigError(
                    f"{flag} {phase.epochs}: phase {phase.name} of {workdir} ended after "
                    f"{trained[phase.name]} epochs ({flag} {planned}) and {moved_on}; pass "
                    f"{flag} {planned}" + (" or more to extend it" if index == here else "")
                    + f", or {new_run}")  # fmt: skip
        elif index == here and done + (start["batch"] > 0) > 0:
            least = done + (start["batch"] > 0)
            if phase.epochs < least:
                raise ConfigError(
                    f"{flag} {phase.epochs}: {workdir} has trained into epoch {least} of phase "
                    f"{phase.name} already; pass {flag} {least} or more, or {new_run}")
            todo[index] = done
        elif phase.epochs > 0:
            todo[index] = 0
    return todo


def write_record(path: pathlib.Path, config: TrainConfig, *, command: str | None,
                 start_step: int, resumed: bool) -> None:  # fmt: skip
    """Writes ``config.json``: the config in force plus this invocation, after the earlier
    ones when resuming (with the settings it changed, ``{field: [before, now]}``).

    Args:
      path: the workdir's config.json.
      config: the resolved config (its ``workdir`` the resolved folder).
      command: the command line (``None``: this process's, ``sys.orig_argv``).
      start_step: the step this invocation starts training from.
      resumed: whether it continues the run that ``path`` records.
    """
    values = json.loads(config.to_json())
    invocation = {"command": command or shlex.join(sys.orig_argv), "cwd": os.getcwd(),
                  "flaxcnn_version": flaxcnn.__version__, "start_step": start_step}  # fmt: skip
    earlier = []
    if resumed and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        earlier = list(previous.get("invocations", []))
        changed = {k: [previous[k], v] for k, v in values.items()
                   if k in previous and previous[k] != v}  # fmt: skip
        if changed:
            invocation["changed"] = changed
            log.info("resumed with changed settings: %s", ", ".join(
                f"{k} {before} -> {now}" for k, (before, now) in changed.items()))  # fmt: skip
    record = {**values, "invocations": [*earlier, invocation]}
    report.replace_file(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def starting_point(setups: Sequence[phases.PhaseSetup], abstract, rng, latest_dir: pathlib.Path,
                   mesh, steps_per_epoch: int) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """The workdir's own latest readable checkpoint: ``(position, TrainState)``, or the fresh
    start's position and ``None`` when there is none."""
    import jax
    import numpy as np

    if not checkpoints.complete_steps(latest_dir):
        log.info("--resume: no checkpoint in %s yet, starting from the beginning", latest_dir)
        return dict(FRESH_START), None
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    template_for = lambda meta: setups[meta["phase_index"]].initial_state(zeros, rng)
    restored = checkpoints.restore_latest_state(latest_dir, template_for, mesh)
    if restored is None:
        log.warning("--resume: no readable checkpoint in %s, starting fresh", latest_dir)
        return dict(FRESH_START), None
    state, metadata = restored
    start = {k: metadata.get(k, default) for k, default in FRESH_START.items()}
    start["phase_epochs"] = recorded_phase_epochs(metadata)
    log.info("resumed from %s at step %d (%s)", latest_dir, int(state.step),
             describe_position(start, steps_per_epoch))  # fmt: skip
    return start, state


def log_extension(setup: phases.PhaseSetup, epochs_done: int, schedule: str,
                  phase_step: int) -> None:  # fmt: skip
    """The line that says what extending a completed phase does to its learning rate."""
    phase = setup.phase
    rates = ", ".join(f"{k} {v:.3g}" for k, v in setup.learning_rates(phase_step).items())
    log.info("extending phase %s from %d to %d epochs: its %s schedule is laid out over %d "
             "epochs, so training goes on at %s", phase.name, epochs_done, phase.epochs,
             schedule, phase.epochs, rates)  # fmt: skip


def nothing_to_train(workdir: pathlib.Path, start: Mapping[str, Any], step: int,
                     plan: Sequence[phases.Phase],
                     steps_per_epoch: int) -> dict[str, Any]:  # fmt: skip
    """A resumed run that has trained every epoch asked for: says so, writes nothing, and
    returns the summary its metrics.json holds."""
    last = next((p for p in reversed(plan) if p.epochs), plan[-1])
    log.info("nothing to train: %s finished at step %d (%s); pass a larger %s to extend its "
             "last phase", workdir, step, describe_position(start, steps_per_epoch),
             EPOCHS_FLAG.get(last.name, "epochs"))  # fmt: skip
    history = list(start["history"])
    summary = {"best_val_accuracy": max((h["val_accuracy"] for h in history), default=-1.0)}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((workdir / "metrics.json").read_text())
    return {**summary, "epochs": history}


def stale_epochs(history: Sequence[Mapping[str, Any]], phase_name: str) -> int:
    """Epochs of ``phase_name`` since its last validation improvement, replayed from the
    history, so that early stopping counts the same across a resume."""
    best, stale = -1.0, 0
    for record in history:
        improved = record["val_accuracy"] >= best
        best = max(best, record["val_accuracy"])
        if record["phase"] == phase_name:
            stale = 0 if improved else stale + 1
    return stale
