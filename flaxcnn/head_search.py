"""The head phase picks its own recipe: a grid of heads trained at once on the cached features.

With the backbone frozen and its features cached, a whole head phase costs about a second, so
rather than one learning rate and weight decay for every dataset, the phase trains one head per
grid point (learning rate x weight decay) in one compiled program:
``jax.vmap`` over the grid of the head phase's own train step (``train.train_step``),
``lax.scan`` over its steps, with its data order, dropout keys, schedule and class weights. The
grid point with the lowest validation loss at the phase's end wins, and the head phase trains
with it: the winner's head is the head the phase then trains (up to the float rounding of
batched matrix products).

A value given on the command line fixes its axis (``--head-learning-rate``,
``--weight-decay``); with both given there is nothing to search. The pick is recorded
in ``config.json`` (and every checkpoint's config), so a resumed run keeps it, and the grid
goes to ``head_search.json`` in the workdir and to the log as a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from flaxcnn import compiler, metrics, optim, phases, sharding, train, tta
from flaxcnn.config import TrainConfig

log = logging.getLogger(__name__)
RESULTS_FILE = "head_search.json"
# The grid (README "Default recipe" and experiments/head_search/ say why these values).
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
WEIGHT_DECAYS = (0.0, 0.1, 0.3, 1.0, 3.0)
# The TrainConfig field of each axis (its flag: the field with '-' for '_').
AXES = {"learning_rate": "head_learning_rate", "weight_decay": "weight_decay"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One grid point: the head phase's peak learning rate and weight decay."""

    learning_rate: float
    weight_decay: float


def grid(config: TrainConfig) -> list[Recipe]:
    """The grid points of ``config``: each axis is its default values, or the one given."""
    defaults = {"learning_rate": LEARNING_RATES, "weight_decay": WEIGHT_DECAYS}
    axes = [defaults[axis] if getattr(config, field) is None else (getattr(config, field),)
            for axis, field in AXES.items()]  # fmt: skip
    return [Recipe(*values) for values in itertools.product(*axes)]


@dataclasses.dataclass(frozen=True)
class GridRun:
    """The heads of a grid, trained.

    Attributes:
      recipes: the grid points, in order.
      heads: the trained head parameters, stacked along a leading grid axis (host arrays).
      results: per grid point, the last epoch's train loss/accuracy (train loss as trained:
        class-weighted) and the validation loss/accuracy at the end.
      seconds: wall time of the search (compilation included).
    """

    recipes: list[Recipe]
    heads: Any
    results: list[dict[str, float]]
    seconds: float

    @property
    def best(self) -> int:
        """The grid point of lowest validation loss (the first of equals; never a NaN)."""
        losses = [r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf
                  for r in self.results]  # fmt: skip
        if all(loss == math.inf for loss in losses):
            raise metrics.NonFiniteLossError(
                f"every head of the recipe search diverged ({len(losses)} grid points); "
                "pass --head-learning-rate and --weight-decay")  # fmt: skip
        return int(np.argmin(losses))

    def head(self, index: int) -> Any:
        return jax.tree.map(lambda x: x[index], self.heads)


def train_heads(
    apply_fn: Callable, head_params: Any, rng: jax.Array, train_cache: Mapping[str, np.ndarray],
    validation_cache: Mapping[str, np.ndarray], recipes: Sequence[Recipe], *, epochs: int,
    batch_size: int, seed: int, schedule: Callable[[Any], optax.Schedule],
    class_weights: np.ndarray | None, mesh: jax.sharding.Mesh,
) -> GridRun:  # fmt: skip
    """Trains one head per recipe on cached features, all in one vmapped, scanned program.

    Every head starts from ``head_params`` with the dropout keys of a head phase whose state
    holds ``rng`` and starts at step 0, and sees the batches ``train.feature_batches`` gives
    the phase's epochs 1..``epochs`` (the head phase is a run's first).

    Args:
      apply_fn: ``(variables, features, train=..., rngs=...) -> logits`` of the head.
      head_params: the head's initial parameters (a tree of its own, e.g. ``{'head': ...}``).
      rng: the head phase's state key.
      train_cache, validation_cache: ``{'features', 'label'}``; validation features may hold
        test-time-augmentation views (``[N, V, D]``, see ``flaxcnn.tta``).
      recipes: the grid points.
      epochs: epochs of the head phase.
      batch_size: its global batch size.
      seed: the run's seed (data order).
      schedule: peak rate -> the phase's learning-rate schedule.
      class_weights: the training loss's per-class weights, if any.
      mesh: the device mesh (every device computes the whole grid: it is tiny).
    """
    t0 = time.time()
    n = len(train_cache["label"])
    order = np.stack([np.stack(list(train.batch_indices(n, batch_size, seed=seed, epoch=e)))
                      for e in range(1, epochs + 1)]).astype(np.int32)  # fmt: skip
    # Axes with one value stay Python numbers, so their arithmetic is the head phase's own.
    fields = [f.name for f in dataclasses.fields(Recipe)]
    varying = [k for k in fields if len({getattr(r, k) for r in recipes}) > 1]
    fixed = {k: getattr(recipes[0], k) for k in fields if k not in varying}
    stacked = {k: np.asarray([getattr(r, k) for r in recipes], np.float32) for k in varying}
    labels = jax.tree.map(lambda _: optim.TRAINABLE, head_params)
    frozen = train.frozen_tree(labels)
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    views = validation_cache["features"].ndim > train_cache["features"].ndim

    def one_head(recipe, params, features, label, order, val_features, val_label):
        recipe = {**fixed, **recipe}
        tx = optim.make_optimizer(schedule(recipe["learning_rate"]), labels,
                                  weight_decay=recipe["weight_decay"])  # fmt: skip
        state = train.TrainState.create({"params": params}, tx, rng)
        step = lambda state, batch: train.train_step(
            state, batch, apply_fn=apply_fn, frozen=frozen, update_batch_stats=False,
            input_key="features", class_weights=weights)  # fmt: skip

        def batch_step(carry, idx):
            state, sums = carry
            state, batch_sums = step(state, {"features": features[idx], "label": label[idx]})
            return (state, metrics.add_sums(sums, batch_sums)), None

        def epoch(state, epoch_order):
            zero = jax.tree.map(jnp.asarray, metrics.zero_sums())
            (state, sums), _ = lax.scan(batch_step, (state, zero), epoch_order)
            return state, sums

        state, train_sums = lax.scan(epoch, state, order)
        logits_fn = lambda x: apply_fn(state.variables, x, train=False)
        val_logits = (tta.mean_logits(logits_fn, val_features) if views
                      else logits_fn(val_features))  # fmt: skip
        val_sums = metrics.classification_sums(val_logits, val_label, None)
        return state.params, jax.tree.map(lambda x: x[-1], train_sums), val_sums

    replicated = sharding.replicated(mesh)
    program = compiler.jit(jax.vmap(one_head, in_axes=(0, *[None] * 6)), differentiated=True,
                           out_shardings=replicated)  # fmt: skip
    inputs = sharding.replicate(
        (stacked, head_params, train_cache["features"], train_cache["label"], order,
         validation_cache["features"], validation_cache["label"]), mesh)  # fmt: skip
    heads, train_sums, val_sums = jax.device_get(program(*inputs))
    results = []
    for i in range(len(recipes)):
        last = metrics.finalize({k: v[i] for k, v in train_sums.items()})
        val = metrics.finalize({k: v[i] for k, v in val_sums.items()})
        results.append({"train_loss": last["loss"], "train_accuracy": last["accuracy"],
                        "val_loss": val["loss"], "val_accuracy": val["accuracy"]})  # fmt: skip
    return GridRun(list(recipes), heads, results, time.time() - t0)


def search(config: TrainConfig, phase: phases.Phase, source: phases.PhaseData, model: Any,
           variables: Any, rng: jax.Array, class_weights: np.ndarray | None,
           mesh: jax.sharding.Mesh) -> GridRun:  # fmt: skip
    """The grid of ``config`` trained as its head phase ``phase`` would train one head, on the
    phase's cached features (``source``), from the head in ``variables``; logs the table.

    Args:
      config: the run (its unset recipe fields are the searched axes).
      phase: the head phase (its epochs).
      source: the head phase's data, features cached (``phases.PhaseData.build``).
      model: the ``TransferClassifier``.
      variables: its initial variables (the head the phase starts from).
      rng: the key of the head phase's TrainState (its dropout keys).
      class_weights: the training loss's class weights, if any.
      mesh: the device mesh.
    """
    steps_per_epoch = source.n_batches
    run = train_heads(
        phases.head_apply(model), {"head": variables["params"]["head"]}, rng,
        source.cache["train"], source.validation_cache, grid(config), epochs=phase.epochs,
        batch_size=config.batch_size, seed=config.seed,
        schedule=lambda rate: phases.learning_rate_schedule(rate, phase, config.lr_schedule,
                                                            steps_per_epoch),
        class_weights=class_weights, mesh=mesh)  # fmt: skip
    picked = run.recipes[run.best]
    searched = ", ".join(f"--{field.replace('_', '-')}" for field in AXES.values()
                         if getattr(config, field) is None)  # fmt: skip
    log.info("head recipe search (%s): %d heads on the cached features, %d epochs each, in "
             "%.1f s; picked learning rate %g, weight decay %g (lowest validation loss)",
             searched, len(run.recipes), phase.epochs, run.seconds, picked.learning_rate,
             picked.weight_decay)  # fmt: skip
    for line in table_lines(payload(run, phase.epochs)):
        log.info("  %s", line)
    return run


def payload(run: GridRun, epochs: int) -> dict[str, Any]:
    """What ``head_search.json`` holds: every grid point's recipe and metrics, and the pick."""
    return {
        "picked": dataclasses.asdict(run.recipes[run.best]),
        "selected_by": "lowest validation loss at the end of the head phase",
        "epochs": epochs, "seconds": round(run.seconds, 3),
        "grid": [{**dataclasses.asdict(recipe), **{  # a diverged head's NaN as null (JSON)
            k: v if math.isfinite(v) else None for k, v in result.items()}}
            for recipe, result in zip(run.recipes, run.results, strict=True)],
    }  # fmt: skip


def table_lines(results: Mapping[str, Any]) -> list[str]:
    """The grid of a :func:`payload` as text, one line per grid point, the pick marked."""
    picked = dict(results["picked"])
    lines = [f"{'learning rate':>13} {'weight decay':>12} {'train loss':>10} {'val loss':>9} "
             f"{'val acc':>8}"]  # fmt: skip
    number = lambda value, width: f"{'nan' if value is None else f'{value:.4f}':>{width}}"
    for row in results["grid"]:
        recipe = {k: row[k] for k in picked}
        lines.append(f"{row['learning_rate']:>13g} {row['weight_decay']:>12g} "
                     f"{number(row['train_loss'], 10)} {number(row['val_loss'], 9)} "
                     f"{number(row['val_accuracy'], 8)}"
                     + ("  <- picked" if recipe == picked else ""))  # fmt: skip
    return lines


def picked_config(config: TrainConfig, run: GridRun) -> TrainConfig:
    """``config`` with the winner's values in the fields that were searched."""
    recipe = dataclasses.asdict(run.recipes[run.best])
    return config.replace(**{field: recipe[axis] for axis, field in AXES.items()})


def write_results(workdir: pathlib.Path, results: Mapping[str, Any]) -> None:
    """Writes a :func:`payload` to ``workdir/head_search.json``."""
    from flaxcnn import report

    report.replace_file(workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")


def recorded(config: TrainConfig, workdir: pathlib.Path) -> TrainConfig:
    """A resumed run's config with its pick in the fields left unset, so that the search is
    not run again: from the newest readable checkpoint's config (what its state trained
    with), else from ``config.json`` (written once the pick is made, before any checkpoint).
    An explicitly given value stays, as any other setting changed on resume."""
    from flaxcnn import checkpoints

    unset = [field for field in AXES.values() if getattr(config, field) is None]
    record: dict[str, Any] = {}
    if unset and checkpoints.complete_steps(workdir / checkpoints.LATEST_DIR):
        with contextlib.suppress(checkpoints.CheckpointError):
            record = checkpoints.read_metadata(workdir / checkpoints.LATEST_DIR)["config"]
    if unset and not record:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((workdir / "config.json").read_text())
    values = {field: record[field] for field in unset if record.get(field) is not None}
    return config.replace(**values) if values else config
