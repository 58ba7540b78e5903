"""One training run from a :class:`~flaxcnn.config.TrainConfig`: ``fit(config, workdir)``.

Transfer recipe (``model='mobilenet_v2'``), after the TensorFlow transfer-learning tutorial:
  1. ``head``: the whole backbone frozen, only the new head trains. When augmentation is off
     for this phase (``feature_cache='auto'``: always, see README), the backbone runs once
     over the data and the head trains on cached pooled features.
  2. ``finetune``: the backbone from ``fine_tune_at`` on trains too, at a low learning rate.
The backbone's BatchNorm stays in inference mode throughout (``TransferClassifier``).
``model='simple_cnn'`` is one phase, ``train``, with everything trainable.

Start-up precedence: the workdir's own latest complete checkpoint when resuming, else
pretrained (or random) initialisation; the log says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from flaxcnn import checkpoints, data, metrics, optim, pretrained, sharding, train
from flaxcnn.config import ConfigError, TrainConfig
from flaxcnn.models import build_model

log = logging.getLogger(__name__)
FORMAT = "flaxcnn/1"


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: the summary written to metrics.json, and the final model."""

    summary: dict[str, Any]
    model: Any
    state: train.TrainState | None


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary."""


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    learning_rate: float
    rules: tuple[tuple[str, str], ...]
    trainable_from: str
    cached_features: bool
    augment: bool
    cosine_decay: bool = False  # learning rate decays to 0 over the phase (cosine)


def plan_phases(config: TrainConfig) -> list[Phase]:
    """The phases a config asks for (validated: bad ``fine_tune_at`` fails before any work)."""
    if config.model == "simple_cnn":
        return [Phase("train", config.head_epochs, config.head_learning_rate,
                      tuple(optim.ALL_TRAINABLE), "the input", False, config.augment)]
    cache = config.feature_cache == "on" or (
        config.feature_cache == "auto" and config.head_epochs != 0
    )
    # Cached epochs cost almost nothing, so the head trains to convergence (README).
    head_epochs = config.head_epochs if config.head_epochs is not None else (50 if cache else 10)
    first = optim.fine_tune_layer(config.fine_tune_at, config.alpha)
    return [
        Phase("head", head_epochs, config.head_learning_rate,
              tuple(optim.transfer_rules(None)), "head", cache, config.augment and not cache,
              cosine_decay=True),
        Phase("finetune", config.finetune_epochs, config.finetune_learning_rate,
              tuple(optim.transfer_rules(first, config.alpha)), f"backbone/{first}", False,
              config.augment),
    ]  # fmt: skip


def model_config(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    if config.model == "simple_cnn":
        return {"arch": "simple_cnn", "num_classes": num_classes,
                "dropout_rate": config.dropout_rate}  # fmt: skip
    return {
        "arch": "transfer",
        "backbone": {"arch": "mobilenet_v2", "alpha": config.alpha, "include_top": False,
                     "pooling": "avg"},
        "num_classes": num_classes,
        "dropout_rate": config.dropout_rate,
        "freeze_backbone_batch_norm": True,
    }  # fmt: skip


def initial_variables(config: TrainConfig, model, hw: tuple[int, int], rng) -> dict[str, Any]:
    """Random init, with the pretrained backbone merged in for the transfer model."""
    variables = jax.jit(model.init)(rng, jnp.zeros((1, *hw, 3)))
    variables = jax.tree.map(np.asarray, variables)
    if config.model == "simple_cnn" or config.weights is None:
        log.info("initialised from scratch (random weights)")
        return variables
    _, backbone = pretrained.mobilenet_v2(
        config.alpha, hw, include_top=False, pooling="avg", weights=config.weights,
        download=config.download,
    )  # fmt: skip
    for collection in ("params", "batch_stats"):
        variables[collection] = {**variables[collection], "backbone": backbone[collection]}
    log.info("initialised the backbone from %s weights, head at random", config.weights)
    return variables


@contextlib.contextmanager
def _stop_on_signals():
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries (main thread only)."""
    received: list[int] = []
    handler = lambda signum, frame: received.append(signum)
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: no handlers
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Checkpoints:
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
        self.latest_dir = workdir / checkpoints.LATEST_DIR
        self.best_dir = workdir / checkpoints.BEST_DIR
        self.latest = ocp.CheckpointManager(self.latest_dir, options=options(keep, "latest"))
        self.best = ocp.CheckpointManager(self.best_dir, options=options(1, "best"))

    def save(self, state: train.TrainState, metadata: dict, *, best: bool) -> None:
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
        if best and step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.Composite(
                variables=ocp.args.StandardSave(state.variables),
                metadata=ocp.args.JsonSave(metadata)))  # fmt: skip

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



def _restore_latest(
    latest_dir: pathlib.Path, template_for, mesh: jax.sharding.Mesh
) -> tuple[train.TrainState, dict] | None:
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
    for step in reversed(checkpoints.complete_steps(latest_dir)):
        path = latest_dir / str(step)
        try:
            metadata = checkpoints.read_metadata(path)
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


def fit(config: TrainConfig, workdir: str | os.PathLike, *, resume: bool = False) -> FitResult:
    """Trains as ``config`` says, checkpointing into ``workdir``; returns the summary.

    Args:
      config: the run.
      workdir: output folder (created); holds config.json, checkpoints, metrics, curves.
      resume: continue from the workdir's latest complete checkpoint (same step, optimizer
        state, RNG and data order), if there is one.

    Returns:
      The summary (``{'epochs': history, 'best_val_accuracy', 'test'?, ...}`` as in
      metrics.json), the module and the final TrainState.
    """
    stores: list[_Checkpoints] = []
    try:
        return _fit(config, workdir, resume, stores)
    finally:
        for store in stores:
            store.close()


def _fit(config: TrainConfig, workdir, resume: bool, stores: list) -> FitResult:
    workdir = pathlib.Path(workdir).expanduser().resolve()
    is_main = jax.process_index() == 0
    # Everything that can reject the run (phases, batch size, data, weights) comes before
    # the first write into the workdir, so that a bad setting leaves nothing behind.
    phases = plan_phases(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    preprocessing = "tf" if config.model == "mobilenet_v2" else "unit"
    try:
        dataset = data.open_dataset(config.data, data_dir=config.data_dir,
                                    download=config.download,
                                    validation_fraction=config.validation_fraction,
                                    split_seed=config.seed)  # fmt: skip
    except data.DataError as e:
        raise data.DataError(f"--data: {e}") from None
    if dataset.split_sizes["train"] < config.batch_size:
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the "
                          f"{dataset.split_sizes['train']} usable training images of "
                          f"{dataset.name}; lower --batch-size")  # fmt: skip
    log.info("devices: %d x %s (%s backend), %d process(es)", mesh.devices.size,
             jax.devices()[0].device_kind, jax.default_backend(), jax.process_count())  # fmt: skip
    for note in dataset.notes:
        log.info("%s", note)
    hw = (config.image_size, config.image_size)
    mconfig = model_config(config, len(dataset.class_names))
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    model = build_model(mconfig, dtype=dtype, conv_impl=config.conv_impl)
    base_metadata = {
        "format": FORMAT, "model": mconfig, "image_size": list(hw),
        "preprocessing": preprocessing, "class_names": list(dataset.class_names),
        "data": dataset.name, "config": dataclasses.asdict(config),
    }  # fmt: skip
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    common = dict(batch_size=config.batch_size, image_size=hw, preprocessing=preprocessing)
    rng = jax.random.PRNGKey(config.seed)
    latest_dir = workdir / checkpoints.LATEST_DIR
    steps_per_epoch = data.num_batches(dataset, "train", config.batch_size, drop_remainder=True)

    # Start-up: own checkpoint (resume) > pretrained/random init.
    start = {"phase_index": 0, "epoch": 0, "epoch_in_phase": 0, "batch": 0,
             "phase_complete": False, "history": [], "partial": None}  # fmt: skip
    variables = state = None
    if resume and checkpoints.complete_steps(latest_dir):
        abstract_vars = jax.eval_shape(lambda: model.init(rng, jnp.zeros((1, *hw, 3))))
        abstract_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_vars)
        template_for = lambda meta: _phase_state(phases[meta["phase_index"]], abstract_vars,
                                                 rng, config, 0, steps_per_epoch)  # fmt: skip
        restored = _restore_latest(latest_dir, template_for, mesh)
        if restored is not None:
            state, metadata = restored
            start = {k: metadata[k] for k in start}
            variables = state.variables
            log.info("resumed from %s at step %d (epoch %d, batch %d)", latest_dir,
                     int(state.step), start["epoch"], start["batch"])  # fmt: skip
        else:
            log.warning("--resume: no readable checkpoint in %s, starting fresh", latest_dir)
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting fresh", latest_dir)
    if variables is None:
        variables = initial_variables(config, model, hw, jax.random.fold_in(rng, 1))
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        config.save(workdir / "config.json")
    store = _Checkpoints(workdir, config.keep_checkpoints)
    stores.append(store)

    history: list[dict] = list(start["history"])
    best_accuracy = max((h["val_accuracy"] for h in history), default=-1.0)
    run_start = time.time() - (history[-1]["wall_seconds"] if history else 0.0)
    with _stop_on_signals() as received:
        for phase_index, phase in enumerate(phases):
            if phase_index < start["phase_index"] or (
                phase_index == start["phase_index"] and start["phase_complete"]
            ) or phase.epochs == 0:
                continue
            resuming_here = phase_index == start["phase_index"] and state is not None
            if not resuming_here:
                step = int(state.step) if state is not None else 0
                state = _phase_state(phase, variables, jax.random.fold_in(rng, 2), config, step,
                                     steps_per_epoch)  # fmt: skip
                # On the mesh before step 1, or step 2 (fed step 1's output) compiles again.
                state = sharding.replicate(state, mesh)
            labels = optim.path_labels(state.params, phase.rules)
            counts = optim.count_by_label(state.params, labels)
            input_key = "features" if phase.cached_features else "image"
            apply_fn = (
                (lambda v, x, **kw: model.apply(v, x, method=model.classify_features, **kw))
                if phase.cached_features else model.apply
            )  # fmt: skip
            steps = train.make_steps(apply_fn, train.frozen_tree(labels), mesh,
                                     update_batch_stats=config.model == "simple_cnn",
                                     input_key=input_key)  # fmt: skip
            bn_mode = ("trains (batch statistics)" if config.model == "simple_cnn" else
                       "of the backbone in inference mode (running averages, never updated)")
            extra = ", features cached (one backbone pass)" if phase.cached_features else ""
            extra += ", augmentation on" if phase.augment else ", augmentation off"
            log.info("%s", train.describe_phase(phase.name, counts, phase.trainable_from, bn_mode,
                                                phase.learning_rate, extra))  # fmt: skip

            if phase.cached_features:
                t0 = time.time()
                cache = {split: train.extract_features(
                    model, state.variables,
                    data.eval_batches(dataset, split, **common, **shard), mesh)
                    for split in ("train", "validation")}  # fmt: skip
                log.info("cached %d + %d feature vectors in %.1f s", len(cache["train"]["label"]),
                         len(cache["validation"]["label"]), time.time() - t0)  # fmt: skip

            def train_iter(epoch, start_batch, phase=phase):
                if phase.cached_features:
                    return train.feature_batches(cache["train"], config.batch_size,  # noqa: B023 - called within this iteration
                                                 seed=config.seed, epoch=epoch,
                                                 start_batch=start_batch, **shard)  # fmt: skip
                return data.train_batches(dataset, **common, augment=phase.augment,
                                          seed=config.seed, epoch=epoch,
                                          start_batch=start_batch, **shard)  # fmt: skip

            def val_iter(phase=phase):
                if phase.cached_features:
                    return train.feature_batches(cache["validation"], config.batch_size,  # noqa: B023 - called within this iteration
                                                 seed=None, **shard)  # fmt: skip
                return data.eval_batches(dataset, "validation", **common, **shard)

            first_epoch_in_phase = start["epoch_in_phase"] if resuming_here else 0
            epoch_offset = (start["epoch"] - first_epoch_in_phase) if resuming_here else (
                history[-1]["epoch"] if history else 0)  # fmt: skip
            n_batches = (len(cache["train"]["label"]) // config.batch_size if phase.cached_features
                         else data.num_batches(dataset, "train", config.batch_size,
                                               drop_remainder=True))  # fmt: skip
            if n_batches == 0:
                raise data.DataError(f"the train split has fewer examples than --batch-size "
                                     f"{config.batch_size}; lower --batch-size")  # fmt: skip
            stale = _stale_epochs(history, phase.name) if resuming_here else 0
            for epoch_in_phase in range(first_epoch_in_phase, phase.epochs):
                epoch = epoch_offset + epoch_in_phase + 1
                start_batch = start["batch"] if resuming_here and epoch_in_phase == first_epoch_in_phase else 0  # noqa: E501
                partial = start["partial"] if start_batch else None
                epoch_steps = _continuing(steps, partial)
                t_epoch = time.time()
                bar = tqdm(total=n_batches, initial=start_batch, disable=not is_main,
                           desc=f"epoch {epoch} [{phase.name}]", leave=False, unit="batch")  # fmt: skip  # noqa: E501
                done = [start_batch]

                def on_step(s, total, bar=bar, done=done):
                    done[0] += 1
                    bar.update(1)
                    if done[0] % config.log_every == 0 or done[0] == n_batches:  # noqa: B023 - called within this iteration
                        running = metrics.finalize(total)
                        metrics.check_finite(running["loss"], int(s.step), epoch)  # noqa: B023 - called within this iteration
                        bar.set_postfix(loss=f"{running['loss']:.4f}",
                                        acc=f"{running['accuracy']:.4f}")  # fmt: skip
                    return bool(received)

                try:  # closed on errors too: a NaN message must not land on the bar's line
                    state, sums = train.run_epoch(epoch_steps, state,
                                                  train_iter(epoch, start_batch), mesh,
                                                  on_step=on_step)  # fmt: skip
                finally:
                    bar.close()
                if sums is None:  # resumed after the epoch's last batch (older checkpoints)
                    sums = _as_sums(partial)
                if received and done[0] < n_batches:  # mid-epoch: save the batch position
                    train_metrics = metrics.finalize(sums)
                    metrics.check_finite(train_metrics["loss"], int(state.step), epoch)
                    metrics.check_finite_params(state.variables, int(state.step), epoch)
                    meta = {**base_metadata, "phase_index": phase_index, "epoch": epoch - 1,
                            "epoch_in_phase": epoch_in_phase, "batch": done[0],
                            "phase_complete": False, "history": history,
                            "partial": {k: float(v) for k, v in jax.device_get(sums).items()}}  # fmt: skip  # noqa: E501
                    store.save(state, meta, best=False)
                    store.wait()
                    raise Interrupted(
                        f"stopped by signal {received[0]} at step {int(state.step)} (epoch {epoch},"
                        f" batch {done[0]}); checkpoint saved in {store.latest_dir}; continue "
                        f"with the same command plus --resume"
                    )
                train_metrics = metrics.finalize(sums)
                metrics.check_finite(train_metrics["loss"], int(state.step), epoch)
                val = train.evaluate(steps, state.variables, val_iter(), mesh)
                seconds = time.time() - t_epoch
                record = {
                    "epoch": epoch, "phase": phase.name,
                    "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],  # noqa: E501
                    "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "learning_rate": phase.learning_rate, "epoch_seconds": round(seconds, 3),
                    "wall_seconds": round(time.time() - run_start, 3),
                    "images_per_second": round(train_metrics["count"] / max(seconds, 1e-9), 1),
                }  # fmt: skip
                history.append(record)
                improved = val["accuracy"] >= best_accuracy  # ties: the later, more trained

                best_accuracy = max(best_accuracy, val["accuracy"])
                stale = 0 if improved else stale + 1
                last = epoch_in_phase + 1 == phase.epochs or (
                    config.early_stopping_patience and stale >= config.early_stopping_patience)
                meta = {**base_metadata, "phase_index": phase_index, "epoch": epoch,
                        "epoch_in_phase": epoch_in_phase + 1, "batch": 0,
                        "phase_complete": bool(last), "history": history, "partial": None,
                        "val_accuracy": val["accuracy"]}  # fmt: skip
                metrics.check_finite_params(state.variables, int(state.step), epoch)
                store.save(state, meta, best=improved)
                log.info("epoch %d [%s] train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                         "%.1f s, %.0f img/s", epoch, phase.name, record["train_loss"],
                         record["train_accuracy"], record["val_loss"], record["val_accuracy"],
                         seconds, record["images_per_second"])  # fmt: skip
                if is_main:
                    metrics.write_reports(workdir, history)
                if received:  # the signal came during the last batch or the evaluation
                    store.wait()
                    raise Interrupted(
                        f"stopped by signal {received[0]} at step {int(state.step)} (end of epoch "
                        f"{epoch}); checkpoint saved in {store.latest_dir}; continue with the "
                        f"same command plus --resume"
                    )
                if last:
                    if stale and config.early_stopping_patience:
                        log.info("early stopping: no validation improvement for %d epochs", stale)
                    break
            store.wait()
            variables = state.variables
            start = {**start, "phase_index": -1}

    summary = {"best_val_accuracy": best_accuracy, "class_names": list(dataset.class_names),
               "phases": [p.name for p in phases]}  # fmt: skip
    if "test" in dataset.split_sizes and state is not None:
        eval_steps = train.make_steps(model.apply, train.frozen_tree(
            optim.path_labels(state.params, optim.ALL_TRAINABLE)), mesh,
            update_batch_stats=False)  # fmt: skip
        summary["test"] = train.evaluate(eval_steps, state.variables,
                                         data.eval_batches(dataset, "test", **common, **shard),
                                         mesh)  # fmt: skip
        log.info("test: loss %.4f acc %.4f on %d images", summary["test"]["loss"],
                 summary["test"]["accuracy"], summary["test"]["count"])  # fmt: skip
    store.wait()
    if is_main:
        metrics.write_reports(workdir, history, summary=summary)
    return FitResult({"epochs": history, **summary}, model, state)


def _as_sums(partial: dict[str, float]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in partial.items()}


def _continuing(steps: train.StepFns, partial: dict[str, float] | None) -> train.StepFns:
    """Steps whose first call adds the interrupted epoch's ``partial`` sums to its own.

    ``run_epoch`` then accumulates ``((b0 + b1) + b2) + ...`` in the same order as an
    uninterrupted epoch, so the epoch's metrics are bit-identical (float addition is not
    associative: adding the partial sums at the end would differ in the last bits).
    """
    if partial is None:
        return steps
    pending = [_as_sums(partial)]

    def train_step(state, batch):
        state, sums = steps.train(state, batch)
        return state, (metrics.add_sums(pending.pop(), sums) if pending else sums)

    return dataclasses.replace(steps, train=train_step)


def _stale_epochs(history: list[dict], phase_name: str) -> int:
    """Epochs of ``phase_name`` since its last validation improvement, replayed from the
    history, so that early stopping counts the same across a resume."""
    best, stale = -1.0, 0
    for record in history:
        improved = record["val_accuracy"] >= best
        best = max(best, record["val_accuracy"])
        if record["phase"] == phase_name:
            stale = 0 if improved else stale + 1
    return stale


def _phase_state(
    phase: Phase, variables, rng, config: TrainConfig, step: int, steps_per_epoch: int
) -> train.TrainState:
    labels = optim.path_labels(variables["params"], phase.rules)
    learning_rate = (
        optax.cosine_decay_schedule(phase.learning_rate, max(phase.epochs * steps_per_epoch, 1))
        if phase.cosine_decay else phase.learning_rate
    )  # fmt: skip
    tx = optim.make_optimizer(learning_rate, labels, weight_decay=config.weight_decay)
    return train.TrainState.create(variables, tx, rng, step=step)
