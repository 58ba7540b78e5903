"""One training run from a :class:`~flaxcnn.config.TrainConfig`: ``fit(config, workdir)``.

The phases (what trains, with which optimizer, on what data) come from :mod:`flaxcnn.phases`;
this module runs them: the epoch loop, checkpoints, resume position, signals and reports.

Start-up precedence: the workdir's own latest complete checkpoint when resuming, else
pretrained (or random) initialisation; the log says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxcnn import checkpoints, data, metrics, optim, phases, pretrained, sharding, train
from flaxcnn.config import ConfigError, TrainConfig
from flaxcnn.models import build_model

log = logging.getLogger(__name__)
FORMAT = "flaxcnn/1"
PLOT_EVERY_SECONDS = 30  # curves.png is redrawn at most this often within a phase


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: the summary written to metrics.json, and the final model."""

    summary: dict[str, Any]
    model: Any
    state: train.TrainState | None


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the step boundary."""


def initial_variables(config: TrainConfig, model, hw: tuple[int, int], rng) -> dict[str, Any]:
    """Random init, or for a backbone its pretrained weights plus a random head.

    With pretrained weights only the head is initialised (``pretrained.create``): compiling
    the random initialiser of every backbone leaf, only to overwrite it, costs ~10 s on a
    2-core CPU; the head gets the same values either way.
    """
    if config.backbone is None or config.weights is None:
        log.info("initialised from scratch (random weights)")
        return jax.tree.map(np.asarray, jax.jit(model.init)(rng, jnp.zeros((1, *hw, 3))))
    _, variables = pretrained.create(
        config.model, weights=config.weights, input_size=hw, num_classes=model.num_classes,
        download=config.download, rng=rng, **config.options,
    )  # fmt: skip
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
        self, state, epoch: int, phase: phases.PhaseSetup, train_metrics: dict, val: dict,
        seconds: float, *, improved: bool, last: bool, position: dict,
    ) -> None:  # fmt: skip
        """Records the epoch, saves when due, writes the reports; raises on a signal.

        The learning rates recorded are those of the epoch's last step (the schedules decay
        within a phase; the phase's peak is in the config).
        """
        step = int(state.step)
        record = {
            "epoch": epoch, "phase": phase.phase.name,
            "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            **phase.learning_rates(step - 1), "epoch_seconds": round(seconds, 3),
            "wall_seconds": round(time.time() - self.run_start, 3),
            "images_per_second": round(train_metrics["count"] / max(seconds, 1e-9), 1),
        }  # fmt: skip
        self.history.append(record)
        self.best_accuracy = max(self.best_accuracy, val["accuracy"])
        host_variables = metrics.check_finite_params(state.variables, step, epoch)
        meta = {**position, "history": self.history, "partial": None,
                "val_accuracy": val["accuracy"]}  # fmt: skip
        if improved:
            self.pending_best = checkpoints.BestSnapshot.of(state, meta, host_variables)
        due = time.time() - self.last_save >= self.config.checkpoint_every_seconds
        if last or self.received or due:
            self._save(state, meta)
        log.info("epoch %d [%s] train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                 "%.1f s, %.0f img/s", epoch, phase.phase.name, record["train_loss"],
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
    config = config.resolved()
    plan = phases.plan(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    preprocessing = config.backbone.preprocessing if config.backbone else "unit"
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
    pipeline = dict(batch_size=config.batch_size, image_size=hw, preprocessing=preprocessing)
    rng = jax.random.PRNGKey(config.seed)
    latest_dir = workdir / checkpoints.LATEST_DIR
    steps_per_epoch = data.num_batches(dataset, "train", config.batch_size, drop_remainder=True)

    abstract = jax.eval_shape(model.init, rng, jnp.zeros((1, *hw, 3)))
    setups = [phases.setup(phase, abstract["params"], model, mesh, config, steps_per_epoch)
              for phase in plan]  # fmt: skip
    start, state, variables = _starting_point(config, model, setups, abstract, hw, rng,
                                              latest_dir, mesh, resume)  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        config.save(workdir / "config.json")
    store = checkpoints.RunCheckpoints(workdir, config.keep_checkpoints)
    stores.append(store)

    book = _Bookkeeping(workdir, store, is_main, config, list(start["history"]))
    with _stop_on_signals() as received:
        book.received = received
        for phase_index, (phase, setup) in enumerate(zip(plan, setups, strict=True)):
            if phase_index < start["phase_index"] or (
                phase_index == start["phase_index"] and start["phase_complete"]
            ) or phase.epochs == 0:
                continue
            resuming_here = phase_index == start["phase_index"] and state is not None
            if not resuming_here:
                step = int(state.step) if state is not None else 0
                state = setup.initial_state(variables, jax.random.fold_in(rng, 2), step)
                # On the mesh before step 1, or step 2 (fed step 1's output) compiles again.
                state = sharding.replicate(state, mesh)
            steps = setup.steps
            log.info("%s", setup.describe(state.params, bool(state.batch_stats),
                                          config.backbone is None))  # fmt: skip
            source = phases.PhaseData.build(phase, dataset, model, state, mesh, config, pipeline,
                                            shard)  # fmt: skip

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
                book.end_epoch(state, epoch, setup, train_metrics, val, time.time() - t_epoch,
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
               "phases": [p.name for p in plan]}  # fmt: skip
    if "test" in dataset.split_sizes and state is not None:
        eval_steps = train.make_steps(model.apply, train.frozen_tree(
            optim.path_labels(state.params, optim.ALL_TRAINABLE)), mesh,
            update_batch_stats=False)  # fmt: skip
        summary["test"] = train.evaluate(eval_steps, state.variables,
                                         data.eval_batches(dataset, "test", **pipeline, **shard),
                                         mesh)  # fmt: skip
        log.info("test: loss %.4f acc %.4f on %d images", summary["test"]["loss"],
                 summary["test"]["accuracy"], summary["test"]["count"])  # fmt: skip
    store.wait()
    if is_main:
        metrics.write_reports(workdir, history, summary=summary)
    return FitResult({"epochs": history, **summary}, model, state)


def _starting_point(config: TrainConfig, model, setups: list[phases.PhaseSetup], abstract, hw,
                    rng, latest_dir, mesh, resume: bool):  # fmt: skip
    """Where the run starts: the workdir's own latest checkpoint when resuming, else the
    pretrained (or random) initialisation. Returns ``(position, state or None, variables)``."""
    start = {"phase_index": 0, "epoch": 0, "epoch_in_phase": 0, "batch": 0,
             "phase_complete": False, "history": [], "partial": None}  # fmt: skip
    variables = state = None
    if resume and checkpoints.complete_steps(latest_dir):
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
        template_for = lambda meta: setups[meta["phase_index"]].initial_state(zeros, rng)
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
