"""One training run from a :class:`~flaxcnn.config.TrainConfig`: ``fit(config, workdir)``.

Transfer recipe (``model='mobilenet_v2'``), after the TensorFlow transfer-learning tutorial:
  1. ``head``: the whole backbone frozen, only the new head trains. When augmentation is off
     for this phase (``feature_cache='auto'``: always, see README), the backbone runs once
     over the data and the head trains on cached pooled features.
  2. ``finetune``: the backbone from ``fine_tune_at`` on trains too, at a low learning rate.
     Validation runs from the first trainable block on activations of the frozen ones,
     computed once (``_validation_cache``).
The backbone's BatchNorm stays in inference mode throughout (``TransferClassifier``).
``model='simple_cnn'`` is one phase, ``train``, with everything trainable.

Start-up precedence: the workdir's own latest complete checkpoint when resuming, else
pretrained (or random) initialisation; the log says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from tqdm.auto import tqdm

from flaxcnn import checkpoints, data, metrics, optim, pretrained, sharding, train
from flaxcnn.config import ConfigError, TrainConfig
from flaxcnn.models import build_model, keras_layer_names, stage_of_layer

log = logging.getLogger(__name__)
FORMAT = "flaxcnn/1"
# Host memory the validation split's frozen-stage activations may take (feature_cache='auto').
EVAL_CACHE_MAX_BYTES = 2 * 2**30
PLOT_EVERY_SECONDS = 30  # curves.png is redrawn at most this often within a phase


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
    head_learning_rate: float | None = None  # the head's own rate (rules label it HEAD)


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
              tuple(optim.transfer_rules(None)), "head", cache, config.augment and not cache),
        Phase("finetune", config.finetune_epochs, config.finetune_learning_rate,
              tuple(optim.transfer_rules(first, config.alpha, head_label=optim.HEAD)),
              f"backbone/{first}", False, config.augment, config.finetune_head_learning_rate),
    ]  # fmt: skip


def initial_variables(config: TrainConfig, model, hw: tuple[int, int], rng) -> dict[str, Any]:
    """Random init, or for the transfer model the pretrained backbone plus a random head.

    With pretrained weights only the head is initialised: compiling the random initialiser of
    every backbone leaf, only to overwrite it, costs ~10 s on a 2-core CPU. Flax derives each
    module's init key from its path, so the head gets the same values either way.
    """
    image = jnp.zeros((1, *hw, 3))
    if config.model == "simple_cnn" or config.weights is None:
        log.info("initialised from scratch (random weights)")
        return jax.tree.map(np.asarray, jax.jit(model.init)(rng, image))
    _, backbone = pretrained.mobilenet_v2(
        config.alpha, hw, include_top=False, pooling="avg", weights=config.weights,
        download=config.download,
    )  # fmt: skip
    features = jax.eval_shape(functools.partial(model.apply, method=model.features),
                              {"params": {"backbone": backbone["params"]},
                               "batch_stats": {"backbone": backbone["batch_stats"]}}, image)
    head = jax.jit(functools.partial(model.init, method=model.classify_features))(
        rng, jnp.zeros(features.shape, features.dtype))  # fmt: skip
    variables = {"params": {**jax.tree.map(np.asarray, head["params"]),
                            "backbone": backbone["params"]},
                 "batch_stats": {"backbone": backbone["batch_stats"]}}  # fmt: skip
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


class _EpochProgress:
    """The progress bar of one epoch: ``run_epoch``'s ``on_step`` callback.

    Every ``log_every`` steps it starts copying the running metric sums to the host and shows
    those of the previous report, which have arrived meanwhile: the host never waits for the
    step it has just dispatched, so no round-trip stalls the device inside an epoch. A NaN loss
    is therefore caught up to ``log_every`` steps late, and always before the epoch is saved.
    """

    def __init__(
        self, desc: str, epoch: int, n_batches: int, start_batch: int, first_step: int,
        log_every: int, *, enabled: bool, stop: list,
    ) -> None:  # fmt: skip
        self.bar = tqdm(total=n_batches, initial=start_batch, disable=not enabled, desc=desc,
                        leave=False, unit="batch")  # fmt: skip
        self.epoch, self.n_batches, self.log_every, self.stop = epoch, n_batches, log_every, stop
        self.done, self.step = start_batch, first_step
        self.pending: tuple[dict, int] | None = None

    def __call__(self, state: train.TrainState, total: dict, n_steps: int = 1) -> bool:
        self.done += n_steps
        self.step += n_steps
        self.bar.update(n_steps)
        last = self.done == self.n_batches
        if self.done // self.log_every > (self.done - n_steps) // self.log_every or last:
            report = (total, self.step)
            if last:  # the epoch ends here and waits for its sums anyway
                shown, self.pending = report, None
            else:
                for leaf in jax.tree.leaves(total):
                    leaf.copy_to_host_async()
                shown, self.pending = self.pending, report
            if shown is not None:
                running = metrics.finalize(shown[0])
                metrics.check_finite(running["loss"], shown[1], self.epoch)
                self.bar.set_postfix(loss=f"{running['loss']:.4f}",
                                     acc=f"{running['accuracy']:.4f}")  # fmt: skip
        return bool(self.stop)

    def close(self) -> None:
        self.bar.close()


@dataclasses.dataclass(frozen=True)
class _PhaseData:
    """Where one phase's batches come from: cached backbone features, or the image pipeline."""

    dataset: data.ImageDataset
    cache: dict[str, dict[str, np.ndarray]] | None
    augment: bool
    config: TrainConfig
    common: dict
    shard: dict
    mesh: jax.sharding.Mesh
    # Validation from cached features or activations (else from the images), and the step
    # that evaluates them when it is not the phase's own (see ``_validation_cache``).
    validation_cache: dict[str, np.ndarray] | None = None
    validation_step: Any = None

    @classmethod
    def build(cls, phase: Phase, dataset, model, state, mesh, config, common, shard) -> _PhaseData:
        cache = None
        if phase.cached_features:
            t0 = time.time()
            cache = {split: train.extract_features(
                model, state.variables, data.eval_batches(dataset, split, **common, **shard), mesh)
                for split in ("train", "validation")}  # fmt: skip
            log.info("cached %d + %d feature vectors in %.1f s", len(cache["train"]["label"]),
                     len(cache["validation"]["label"]), time.time() - t0)  # fmt: skip
        if cache is not None:  # the phase's own steps take features
            validation_cache, validation_step = cache["validation"], None
        else:
            validation_cache, validation_step = _validation_cache(
                phase, dataset, model, state, mesh, config, common, shard)  # fmt: skip
        source = cls(dataset, cache, phase.augment, config, common, shard, mesh,
                     validation_cache, validation_step)  # fmt: skip
        if source.n_batches == 0:
            raise data.DataError(f"the train split has fewer examples than --batch-size "
                                 f"{config.batch_size}; lower --batch-size")  # fmt: skip
        return source

    @property
    def n_batches(self) -> int:
        if self.cache is not None:
            return len(self.cache["train"]["label"]) // self.config.batch_size
        return data.num_batches(self.dataset, "train", self.config.batch_size,
                                drop_remainder=True)  # fmt: skip

    def evaluate(self, steps: train.StepFns, variables) -> dict[str, float]:
        """Validation metrics, from the phase's validation cache if it has one."""
        if self.validation_cache is None:
            batches = data.eval_batches(self.dataset, "validation", **self.common, **self.shard)
        else:
            batches = train.feature_batches(self.validation_cache, self.config.batch_size,
                                            seed=None, **self.shard)  # fmt: skip
        if self.validation_step is not None:
            steps = dataclasses.replace(steps, evaluate=self.validation_step)
        return train.evaluate(steps, variables, batches, self.mesh)

    def run_epoch(self, steps, state, epoch: int, start_batch: int, partial, progress):
        """Trains one epoch from ``start_batch`` on (``partial``: the sums before it)."""
        seed = self.config.seed
        if self.cache is not None:  # in memory: whole chunks of steps per call (lax.scan)
            batches = train.feature_batches(self.cache["train"], self.config.batch_size,
                                            seed=seed, epoch=epoch, start_batch=start_batch,
                                            **self.shard)  # fmt: skip
            carried = None if partial is None else _as_sums(partial)
            state, sums = train.run_epoch_in_memory(
                steps, state, batches, self.mesh, initial_sums=carried, on_step=progress
            )
        else:
            batches = data.train_batches(self.dataset, **self.common, augment=self.augment,
                                         seed=seed, epoch=epoch, start_batch=start_batch,
                                         **self.shard)  # fmt: skip
            state, sums = train.run_epoch(_continuing(steps, partial), state, batches, self.mesh,
                                          on_step=progress)  # fmt: skip
        if sums is None:  # resumed after the epoch's last batch (older checkpoints)
            sums = _as_sums(partial)
        return state, sums


def _validation_cache(phase: Phase, dataset, model, state, mesh, config, common, shard):
    """The validation split's activations entering the first stage that trains, computed once.

    The stages below it are frozen, with BatchNorm on running averages, and validation images
    are never augmented, so their output on the validation split cannot change during the
    phase; each epoch's evaluation then runs only the stages that train (results equal up to
    float rounding). With MobileNetV2 fine-tuned from layer 100 on a 2-core CPU an epoch's
    evaluation takes ~2 s instead of ~10 s. Off with ``feature_cache='off'``; with ``'auto'``
    only when the activations fit ``EVAL_CACHE_MAX_BYTES``. Returns ``(cache, eval_step)``,
    or Nones where nothing below the trainable part is frozen in the backbone (SimpleCNN,
    fine-tuning from the stem; the head phase caches its pooled features itself).
    """
    if config.feature_cache == "off" or not phase.trainable_from.startswith("backbone/"):
        return None, None
    first = phase.trainable_from.removeprefix("backbone/")
    stage = stage_of_layer(first)
    if stage == 0:
        return None, None
    image = jnp.zeros((1, config.image_size, config.image_size, 3))
    shape = jax.eval_shape(functools.partial(model.apply, method=model.features, stop=stage),
                           state.variables, image).shape[1:]  # fmt: skip
    n = dataset.split_sizes["validation"]
    nbytes = n * int(np.prod(shape)) * 4
    if config.feature_cache == "auto" and nbytes > EVAL_CACHE_MAX_BYTES:
        log.info("validation activations at %s would take %.1f GB: evaluating from the images",
                 first, nbytes / 1e9)  # fmt: skip
        return None, None
    t0 = time.time()
    cache = train.extract_features(
        model, state.variables, data.eval_batches(dataset, "validation", **common, **shard),
        mesh, stop=stage)  # fmt: skip
    entry = next(name for name in keras_layer_names(config.alpha)
                 if name != "input_1" and stage_of_layer(name) == stage)  # fmt: skip
    log.info("cached the validation activations entering %s (%d x %s, %.0f MB) in %.1f s; "
             "evaluation runs from there (training starts at %s)", entry, n,
             "x".join(map(str, shape)), nbytes / 1e6, time.time() - t0, first)  # fmt: skip
    from_stage = lambda v, x, **kw: model.apply(v, x, start=stage, **kw)
    return cache, train.make_eval_step(from_stage, mesh, input_key="features")


class _Bookkeeping:
    """What ``fit`` keeps across epochs: history, best accuracy, checkpoint and plot timers.

    Checkpoints are written at an epoch's end when ``checkpoint_every_seconds`` have passed
    since the last write, at a phase's end and on a signal; an improved epoch in between
    waits in host memory (``BestSnapshot``) so that ``best/`` never misses it.
    """

    def __init__(self, workdir: pathlib.Path, store: checkpoints.RunCheckpoints, is_main: bool,
                 config: TrainConfig, history: list[dict]) -> None:  # fmt: skip
        self.workdir, self.store, self.is_main, self.config = workdir, store, is_main, config
        self.history = history
        self.best_accuracy = max((h["val_accuracy"] for h in history), default=-1.0)
        self.run_start = time.time() - (history[-1]["wall_seconds"] if history else 0.0)
        self.last_plot, self.last_save = 0.0, time.time()
        self.pending_best: checkpoints.BestSnapshot | None = None
        self.received: list[int] = []

    def _save(self, state: train.TrainState, meta: dict) -> None:
        self.store.save(state, meta, best=self.pending_best)
        self.pending_best, self.last_save = None, time.time()

    def interrupt_mid_epoch(self, state, sums, epoch: int, batch: int, position: dict):
        """Saves the batch position and the epoch's partial sums, then raises Interrupted."""
        step = int(state.step)
        metrics.check_finite(metrics.finalize(sums)["loss"], step, epoch)
        metrics.check_finite_params(state.variables, step, epoch)
        partial = {k: float(v) for k, v in jax.device_get(sums).items()}
        self._save(state, {**position, "history": self.history, "partial": partial})
        self.store.wait()
        raise Interrupted(
            f"stopped by signal {self.received[0]} at step {step} (epoch {epoch}, batch "
            f"{batch}); checkpoint saved in {self.store.latest_dir}; continue with the same "
            f"command plus --resume"
        )

    def end_epoch(
        self, state, epoch: int, phase: Phase, train_metrics: dict, val: dict, seconds: float,
        *, improved: bool, last: bool, position: dict,
    ) -> None:  # fmt: skip
        """Records the epoch, saves when due, writes the reports; raises on a signal."""
        record = {
            "epoch": epoch, "phase": phase.name,
            "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "learning_rate": phase.learning_rate, "epoch_seconds": round(seconds, 3),
            "wall_seconds": round(time.time() - self.run_start, 3),
            "images_per_second": round(train_metrics["count"] / max(seconds, 1e-9), 1),
        }  # fmt: skip
        self.history.append(record)
        self.best_accuracy = max(self.best_accuracy, val["accuracy"])
        step = int(state.step)
        host_variables = metrics.check_finite_params(state.variables, step, epoch)
        meta = {**position, "history": self.history, "partial": None,
                "val_accuracy": val["accuracy"]}  # fmt: skip
        if improved:
            self.pending_best = checkpoints.BestSnapshot.of(state, meta, host_variables)
        due = time.time() - self.last_save >= self.config.checkpoint_every_seconds
        if last or self.received or due:
            self._save(state, meta)
        log.info("epoch %d [%s] train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                 "%.1f s, %.0f img/s", epoch, phase.name, record["train_loss"],
                 record["train_accuracy"], record["val_loss"], record["val_accuracy"],
                 seconds, record["images_per_second"])  # fmt: skip
        if self.is_main:
            plot = last or bool(self.received) or (
                time.time() - self.last_plot >= PLOT_EVERY_SECONDS)
            metrics.write_reports(self.workdir, self.history, plot=plot)
            self.last_plot = time.time() if plot else self.last_plot
        if self.received:  # the signal came during the last batch or the evaluation
            self.store.wait()
            raise Interrupted(
                f"stopped by signal {self.received[0]} at step {step} (end of epoch {epoch}); "
                f"checkpoint saved in {self.store.latest_dir}; continue with the same command "
                f"plus --resume"
            )


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
    stores: list[checkpoints.RunCheckpoints] = []
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
    mconfig = config.model_config(len(dataset.class_names))
    model = build_model(mconfig, dtype=config.compute_dtype, conv_impl=config.conv_impl)
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

    start, state, variables = _starting_point(config, model, phases, hw, rng, latest_dir, mesh,
                                              steps_per_epoch, resume)  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        config.save(workdir / "config.json")
    store = checkpoints.RunCheckpoints(workdir, config.keep_checkpoints)
    stores.append(store)

    book = _Bookkeeping(workdir, store, is_main, config, list(start["history"]))
    with _stop_on_signals() as received:
        book.received = received
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
            steps = _phase_steps(phase, state.params, model, mesh, config)
            source = _PhaseData.build(phase, dataset, model, state, mesh, config, common, shard)

            first_epoch_in_phase = start["epoch_in_phase"] if resuming_here else 0
            epoch_offset = (start["epoch"] - first_epoch_in_phase) if resuming_here else (
                book.history[-1]["epoch"] if book.history else 0)  # fmt: skip
            stale = _stale_epochs(book.history, phase.name) if resuming_here else 0
            for epoch_in_phase in range(first_epoch_in_phase, phase.epochs):
                epoch = epoch_offset + epoch_in_phase + 1
                resumed_epoch = resuming_here and epoch_in_phase == first_epoch_in_phase
                start_batch = start["batch"] if resumed_epoch else 0
                partial = start["partial"] if start_batch else None
                position = {**base_metadata, "phase_index": phase_index}
                t_epoch = time.time()
                progress = _EpochProgress(
                    f"epoch {epoch} [{phase.name}]", epoch, source.n_batches, start_batch,
                    int(state.step), config.log_every, enabled=is_main, stop=received)  # fmt: skip
                try:  # closed on errors too: a NaN message must not land on the bar's line
                    state, sums = source.run_epoch(steps, state, epoch, start_batch, partial,
                                                   progress)  # fmt: skip
                finally:
                    progress.close()
                if received and progress.done < source.n_batches:
                    book.interrupt_mid_epoch(state, sums, epoch, progress.done, {
                        **position, "epoch": epoch - 1, "epoch_in_phase": epoch_in_phase,
                        "batch": progress.done, "phase_complete": False})  # fmt: skip
                train_metrics = metrics.finalize(sums)
                metrics.check_finite(train_metrics["loss"], int(state.step), epoch)
                val = source.evaluate(steps, state.variables)
                improved = val["accuracy"] >= book.best_accuracy  # ties: the later, more trained
                stale = 0 if improved else stale + 1
                last = epoch_in_phase + 1 == phase.epochs or bool(
                    config.early_stopping_patience and stale >= config.early_stopping_patience)
                book.end_epoch(state, epoch, phase, train_metrics, val, time.time() - t_epoch,
                               improved=improved, last=last, position={
                                   **position, "epoch": epoch, "epoch_in_phase": epoch_in_phase + 1,
                                   "batch": 0, "phase_complete": last})  # fmt: skip
                if last:
                    if stale and config.early_stopping_patience:
                        log.info("early stopping: no validation improvement for %d epochs", stale)
                    break
            store.wait()
            variables = state.variables
            start = {**start, "phase_index": -1}

    history, best_accuracy = book.history, book.best_accuracy
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


def _starting_point(config: TrainConfig, model, phases: list[Phase], hw, rng, latest_dir,
                    mesh, steps_per_epoch: int, resume: bool):  # fmt: skip
    """Where the run starts: the workdir's own latest checkpoint when resuming, else the
    pretrained (or random) initialisation. Returns ``(position, state or None, variables)``."""
    start = {"phase_index": 0, "epoch": 0, "epoch_in_phase": 0, "batch": 0,
             "phase_complete": False, "history": [], "partial": None}  # fmt: skip
    variables = state = None
    if resume and checkpoints.complete_steps(latest_dir):
        abstract_vars = jax.eval_shape(lambda: model.init(rng, jnp.zeros((1, *hw, 3))))
        abstract_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_vars)
        template_for = lambda meta: _phase_state(phases[meta["phase_index"]], abstract_vars,
                                                 rng, config, 0, steps_per_epoch)  # fmt: skip
        restored = checkpoints.restore_latest_state(latest_dir, template_for, mesh)
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
    return start, state, variables


def _phase_steps(phase: Phase, params, model, mesh, config: TrainConfig) -> train.StepFns:
    """Compiles the phase's steps (on cached features: the head alone) and logs the line
    each phase starts with."""
    labels = optim.path_labels(params, phase.rules)
    apply_fn = (
        (lambda v, x, **kw: model.apply(v, x, method=model.classify_features, **kw))
        if phase.cached_features else model.apply
    )  # fmt: skip
    input_key = "features" if phase.cached_features else "image"
    steps = train.make_steps(apply_fn, train.frozen_tree(labels), mesh,
                             update_batch_stats=config.model == "simple_cnn",
                             input_key=input_key)  # fmt: skip
    bn_mode = ("trains (batch statistics)" if config.model == "simple_cnn" else
               "of the backbone in inference mode (running averages, never updated)")
    extra = ", features cached (one backbone pass)" if phase.cached_features else ""
    extra += ", augmentation on" if phase.augment else ", augmentation off"
    counts = optim.count_by_label(params, labels)
    log.info("%s", train.describe_phase(phase.name, counts, phase.trainable_from, bn_mode,
                                        phase.learning_rate, extra,
                                        phase.head_learning_rate))  # fmt: skip
    return steps


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


def _phase_schedule(
    rate: float, phase: Phase, config: TrainConfig, steps_per_epoch: int
) -> optax.Schedule:
    """A learning rate over a phase: cosine decay from ``rate`` to 0, or constant."""
    if config.lr_schedule == "constant":
        return optax.constant_schedule(rate)
    return optax.cosine_decay_schedule(rate, max(phase.epochs * steps_per_epoch, 1))


def _phase_state(
    phase: Phase, variables, rng, config: TrainConfig, step: int, steps_per_epoch: int
) -> train.TrainState:
    labels = optim.path_labels(variables["params"], phase.rules)
    schedule = lambda rate: (
        None if rate is None else _phase_schedule(rate, phase, config, steps_per_epoch)
    )
    tx = optim.make_optimizer(schedule(phase.learning_rate), labels,
                              weight_decay=config.weight_decay,
                              head_learning_rate=schedule(phase.head_learning_rate))  # fmt: skip
    return train.TrainState.create(variables, tx, rng, step=step)
