"""Orbax checkpoints: a resumable "latest" stream, a separate "best" stream, and restore().

A run's workdir holds two CheckpointManagers, so that keeping the best checkpoint can never
delete the latest resumable one (orbax#526)::

    workdir/checkpoints/<step>/{state, metadata}      last ``keep`` full TrainStates (--resume)
    workdir/best/<step>/{variables, metadata}         best by validation accuracy, no optimizer

``metadata`` is JSON that makes a checkpoint self-describing: the model config (see
``flaxcnn.models.build_model``), image size, preprocessing, class names, epoch and metrics.
Orbax writes each step to a temporary folder and renames it only when complete, and we wait
for every asynchronous save before returning from a phase, so an interrupted save never
replaces a good checkpoint; a step folder left incomplete by a crash, or one whose files are
missing or corrupt, is skipped with a warning naming it and the previous good step is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.experimental import multihost_utils

from flaxcnn import sharding
from flaxcnn.models import build_model

if TYPE_CHECKING:
    from flaxcnn.train import TrainState

log = logging.getLogger(__name__)

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
_COMMIT_MARKER = "commit_success.txt"


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; the message says what to pass instead."""


def _is_complete_step(path: pathlib.Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / "metadata").is_dir()


def _has_all_items(path: pathlib.Path) -> bool:
    """Orbax leaves ``_CHECKPOINT_METADATA`` in a finalised step; items must all be present."""
    if not (path / "_CHECKPOINT_METADATA").exists():
        return False
    items = [p for p in path.iterdir() if p.is_dir()]
    return bool(items) and all(any(i.iterdir()) for i in items)


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Steps under a manager folder that are complete; warns about (and skips) broken ones."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for path in sorted(directory.iterdir()):
        if not path.name.isdigit():
            continue
        if _is_complete_step(path) and _has_all_items(path):
            steps.append(int(path.name))
        else:
            log.warning("ignoring incomplete checkpoint %s (a save was interrupted)", path)
    return sorted(steps)


def save_variables(
    directory: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any]
) -> pathlib.Path:
    """Writes one self-describing inference checkpoint: ``variables`` + ``metadata`` items.

    Used by ``python -m flaxcnn.weights convert``; training writes the same items into
    ``workdir/best/<step>``.
    """
    directory = pathlib.Path(directory).resolve()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(
        directory,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(dict(variables)),
            metadata=ocp.args.JsonSave(dict(metadata)),
        ),
    )
    return directory


def _step_dirs(path: pathlib.Path) -> list[pathlib.Path]:
    """The step folders a user meant, best first: a run workdir (best, then latest, newest
    first), a manager folder (newest first) or one step folder."""
    if _is_complete_step(path) or (path / "metadata").is_dir():
        return [path]
    candidates = []
    for manager_dir in (path / BEST_DIR, path / LATEST_DIR, path):
        candidates += [manager_dir / str(step) for step in reversed(complete_steps(manager_dir))]
    if not candidates:
        raise CheckpointError(
            f"no checkpoint found at {path}; pass a run folder (holding {BEST_DIR}/ or "
            f"{LATEST_DIR}/), one of those folders, or a step folder inside them"
        )
    return candidates


def _first_readable(path: str | os.PathLike, read):
    """``read(step_dir)`` of the first candidate that reads; unreadable ones are skipped with
    a warning naming them (a crash or a full disk can leave a step folder with files missing)."""
    path = pathlib.Path(path).expanduser().resolve()
    errors = []
    for step_dir in _step_dirs(path):
        try:
            return read(step_dir)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("ignoring unreadable checkpoint %s (%s)", step_dir, reason)
            errors.append(f"{step_dir}: {reason}")
    raise CheckpointError(f"no readable checkpoint at {path} ({'; '.join(errors)})")


def _read_metadata(step_dir: pathlib.Path) -> dict[str, Any]:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
    restored = checkpointer.restore(step_dir, args=args)
    return dict(restored["metadata"])


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of the checkpoint ``path`` points to (see :func:`restore`)."""
    return _first_readable(path, _read_metadata)


def restore(
    path: str | os.PathLike, *, dtype: Any = None, conv_impl: str = "auto"
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Restores a model for inference or research code, without its optimizer.

    Args:
      path: a run workdir (its best checkpoint, else its latest), a ``best/`` or
        ``checkpoints/`` folder (its newest step), or one step folder; relative paths are
        made absolute.
      dtype: computation dtype of the rebuilt module (default float32).
      conv_impl: convolution formulation (see ``flaxcnn.models.layers``).

    Returns:
      ``(model, {'params', 'batch_stats'?}, metadata)``; ``model.apply(variables, images)``
      gives logits for images preprocessed as ``metadata['preprocessing']`` says.

    Raises:
      CheckpointError: nothing restorable at ``path``; the message says what to pass.
      Unreadable step folders (files missing or corrupt) are skipped with a warning, and
      the next older one is used.
    """
    return _first_readable(path, lambda step_dir: _restore_step(step_dir, dtype, conv_impl))


def _restore_step(step_dir: pathlib.Path, dtype: Any, conv_impl: str):
    import jax.numpy as jnp

    metadata = _read_metadata(step_dir)
    model = build_model(metadata["model"], dtype=dtype or jnp.float32, conv_impl=conv_impl)
    height, width = metadata["image_size"]
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)))
    )
    # Onto this process's first device, whatever devices or processes saved it: without a
    # target sharding Orbax refuses a checkpoint saved on another topology (orbax#648).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    on_device = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree
    )
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    if (step_dir / "variables").is_dir():
        restored = checkpointer.restore(step_dir, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(on_device(dict(abstract)))))  # fmt: skip
        variables = dict(restored["variables"])
    else:  # a resumable training checkpoint: take the model's part of the TrainState
        handler = ocp.CompositeCheckpointHandler(state=ocp.StandardCheckpointHandler())
        saved = ocp.Checkpointer(handler).metadata(step_dir).item_metadata["state"]
        restored = checkpointer.restore(
            step_dir, args=ocp.args.Composite(state=ocp.args.StandardRestore(on_device(saved)))
        )
        state = restored["state"]
        variables = {"params": state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
    log.info("restored %s", step_dir)
    return model, variables, metadata


@dataclasses.dataclass(frozen=True)
class BestSnapshot:
    """The best epoch so far, held on the host until the next checkpoint write."""

    step: int
    variables: Any
    metadata: dict

    @classmethod
    def of(cls, state: TrainState, metadata: dict, host_variables: Any = None) -> BestSnapshot:
        """``host_variables``: ``state.variables`` already fetched to the host, if at hand.

        A host copy, because the next step donates (deletes) the state's device buffers.
        """
        variables = jax.device_get(state.variables) if host_variables is None else host_variables
        return cls(int(state.step), variables, json.loads(json.dumps(metadata)))


class RunCheckpoints:
    """The latest (resumable) and best (inference) Orbax streams of one workdir."""

    def __init__(self, workdir: pathlib.Path, keep: int):
        # cleanup_tmp_directories: a save killed mid-write leaves a '<step>.orbax-checkpoint-tmp-*'
        # folder; it never counts as a checkpoint, and is removed when the next run starts.
        # barrier_sync_key_prefix: both managers save the same step asynchronously, and Orbax
        # names its cross-process barriers by step alone; with several processes they collide.
        options = lambda n, name: ocp.CheckpointManagerOptions(
            max_to_keep=n, create=True, cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=name))  # fmt: skip
        self.latest_dir = workdir / LATEST_DIR
        self.best_dir = workdir / BEST_DIR
        self.latest = ocp.CheckpointManager(self.latest_dir, options=options(keep, "latest"))
        self.best = ocp.CheckpointManager(self.best_dir, options=options(1, "best"))

    def save(self, state: TrainState, metadata: dict, *, best: BestSnapshot | None) -> None:
        """Saves ``state`` to the latest stream and ``best`` (if any) to the best stream."""
        step = int(state.step)
        # Orbax writes the JSON in a background thread: snapshot it now, before the caller's
        # history list grows (a later epoch would otherwise leak into this checkpoint).
        metadata = json.loads(json.dumps(metadata))
        if step not in self.latest.all_steps():  # else a re-save after resume at the same step
            self.latest.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state.to_checkpoint()),
                metadata=ocp.args.JsonSave(metadata)))  # fmt: skip
        # A best step that a killed run saved ahead of its latest one holds this same state
        # (training is deterministic); Orbax would skip it anyway (steps <= its newest).
        if best is not None and best.step not in self.best.all_steps():
            self.best.save(best.step, args=ocp.args.Composite(
                variables=ocp.args.StandardSave(best.variables),
                metadata=ocp.args.JsonSave(best.metadata)))  # fmt: skip

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk; raises if one failed."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.check_for_errors()
        self.best.check_for_errors()

    def close(self) -> None:
        """Finishes saves in flight and stops Orbax's threads: a run stopped by an error
        (NaN, Ctrl-C, a bug) still leaves its last good checkpoint complete on disk."""
        for manager in (self.latest, self.best):
            try:
                manager.wait_until_finished()
                manager.close()
            except Exception as e:  # already failing: report, do not mask the first error
                log.warning("could not finish writing checkpoints in %s (%s)",
                            manager.directory, e)  # fmt: skip



def restore_latest_state(
    latest_dir: pathlib.Path, template_for, mesh: jax.sharding.Mesh
) -> tuple[TrainState, dict] | None:
    """Newest readable checkpoint, replicated over ``mesh`` whatever device count saved it
    (orbax#648); broken ones are skipped with a warning naming them.

    ``template_for(metadata)`` gives the TrainState template of that checkpoint's phase (an
    older step may belong to an earlier phase, with another optimizer state). Incomplete or
    unreadable steps newer than the restored one are moved aside to ``<step>.unreadable``
    (kept for inspection): Orbax never writes a step at or below its newest one, so left in
    place they would stop the resumed run from saving those steps again.
    """
    handler = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = None
    for step in reversed(complete_steps(latest_dir)):
        path = latest_dir / str(step)
        try:
            metadata = read_metadata(path)
            template = template_for(metadata)
            target = sharding.abstract_replicated(template.to_checkpoint(), mesh)
            tree = handler.restore(path, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))  # fmt: skip
            restored = template.from_checkpoint(tree["state"]), metadata
            break
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("ignoring unreadable checkpoint %s (%s)", path, reason)
    kept = int(restored[0].step) if restored else -1
    if jax.process_count() > 1:
        # Also a barrier: nothing is moved aside while another process may still read it.
        multihost_utils.assert_equal(np.int64(kept), "processes restored different checkpoints")
    if jax.process_index() == 0:
        newer = [p for p in latest_dir.iterdir() if p.name.isdigit() and int(p.name) > kept]
        for path in sorted(newer):
            aside, n = path.with_name(f"{path.name}.unreadable"), 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.unreadable{n}")
            path.rename(aside)
            log.warning("moved the unreadable checkpoint aside to %s", aside)
    return restored
