"""One training run from a :class:`~flaxcnn.config.TrainConfig`: ``fit(config, workdir)``.

The phases (what trains, with which optimizer, on what data) come from :mod:`flaxcnn.phases`;
this module runs them: the epoch loop, checkpoints, signals and reports. Where a resumed run
starts and what it may change is :mod:`flaxcnn.resume`'s.

Start-up precedence: the workdir's own latest complete checkpoint when resuming, else
pretrained (or random) initialisation; the log says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from flaxcnn import (
    analysis,
    checkpoints,
    compiler,
    data,
    head_search,
    interrupts,
    metrics,
    optim,
    phases,
    pretrained,
    report,
    sharding,
    train,
    tta,
)
from flaxcnn import resume as resume_lib
from flaxcnn.config import ConfigError, TrainConfig
from flaxcnn.models import build_model
from flaxcnn.resume import RUN_MARKERS, describe_position, holds_run

__all__ = ["RUN_MARKERS", "FitResult", "Interrupted", "fit", "holds_run", "initial_variables"]

log = logging.getLogger(__name__)
FORMAT = "flaxcnn/1"
PLOT_EVERY_SECONDS = 30  # curves.png is redrawn at most this often within a phase


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: the summary written to metrics.json, and the final model."""

    summary: dict[str, Any]
    model: Any
    state: train.TrainState | None


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped the run; the message says what is saved and how to go on."""


def initial_variables(config: TrainConfig, model, hw: tuple[int, int], rng) -> dict[str, Any]:
    """Random init, or for a backbone its pretrained weights plus a random head.

    With pretrained weights only the head is initialised (``pretrained.create``): compiling
    the random initialiser of every backbone leaf, only to overwrite it, costs ~10 s on a
    2-core CPU; the head gets the same values either way.
    """
    if config.backbone is None or config.weights is None:
        log.info("initialised from scratch (random weights)")
        return jax.tree.map(np.asarray, compiler.jit(model.init)(rng, jnp.zeros((1, *hw, 3))))
    _, variables = pretrained.create(
        config.model, weights=config.weights, input_size=hw, num_classes=model.num_classes,
        download=config.download, rng=rng, **config.options,
    )  # fmt: skip
    log.info("initialised the backbone from %s weights, head at random", config.weights)
    return variables


@dataclasses.dataclass
class _SoFar:
    """What the run has written and saved: the line that reports a stop says it."""

    workdir: pathlib.Path
    stage: str = "during start-up"
    fresh: bool = True  # not resuming: everything in the workdir is this run's
    existed: bool = False  # the workdir folder was there before the run wrote into it
    written: bool = False
    saved: tuple[int, str] | None = None  # latest complete checkpoint: step, position

    def stop_message(self, signum: int | None) -> str:
        what = f"stopped by signal {signum}" if signum else "interrupted"
        if self.saved:
            step, position = self.saved
            latest = self.workdir / checkpoints.LATEST_DIR / str(step)
            return (f"{what} {self.stage}; the latest checkpoint is {latest} ({position}); "
                    "continue with the same command plus --resume")  # fmt: skip
        if self.written and self.fresh and jax.process_index() == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)  # only config.json and alike
            if self.existed:
                self.workdir.mkdir(exist_ok=True)
        return f"{what} {self.stage}, before any checkpoint was saved; run the same command again"


class _EpochProgress:
    """One epoch's ``run_epoch`` callback: the display, the NaN check, the stop flag.

    Every ``log_every`` steps it starts copying the running metric sums to the host and shows
    those of the previous report, which have arrived meanwhile: the host never waits for the
    step it has just dispatched, so no round-trip stalls the device inside an epoch. A NaN loss
    is therefore caught up to ``log_every`` steps late, and always before the epoch is saved.
    """

    def __init__(self, display: report.EpochProgressDisplay, epoch: int, n_batches: int,
                 start_batch: int, first_step: int, log_every: int, *,
                 stop: list) -> None:  # fmt: skip
        self.display, self.epoch, self.n_batches = display, epoch, n_batches
        self.log_every, self.stop = log_every, stop
        self.done, self.step = start_batch, first_step
        self.pending: tuple[dict, int, int] | None = None  # sums, step, batches done

    def __call__(self, state: train.TrainState, total: dict, n_steps: int = 1) -> bool:
        self.done += n_steps
        self.step += n_steps
        self.display.advance(n_steps)
        last = self.done == self.n_batches
        if self.done // self.log_every > (self.done - n_steps) // self.log_every or last:
            report_now = (total, self.step, self.done)
            if last:  # the epoch ends here and waits for its sums anyway
                shown, self.pending = report_now, None
            else:
                for leaf in jax.tree.leaves(total):
                    leaf.copy_to_host_async()
                shown, self.pending = self.pending, report_now
            if shown is not None:
                running = metrics.finalize(shown[0])
                metrics.check_finite(running["loss"], shown[1], self.epoch)
                self.display.show(shown[2], running["loss"], running["accuracy"], final=last)
        return bool(self.stop)


class _Bookkeeping:
    """What ``fit`` keeps across epochs: history, best accuracy, checkpoint and plot timers.

    Checkpoints are written at an epoch's end when ``checkpoint_every_seconds`` have passed
    since the last write, at a phase's end and on a signal; an improved epoch in between
    waits in host memory (``BestSnapshot``) so that ``best/`` never misses it.
    """

    def __init__(self, workdir: pathlib.Path, store: checkpoints.RunCheckpoints, is_main: bool,
                 config: TrainConfig, history: list[dict], so_far: _SoFar,
                 events: report.TensorBoardEvents | None) -> None:  # fmt: skip
        self.workdir, self.store, self.is_main, self.config = workdir, store, is_main, config
        self.history, self.so_far, self.events = history, so_far, events
        self.best_accuracy = max((h["val_accuracy"] for h in history), default=-1.0)
        self.run_start = time.time() - (history[-1]["wall_seconds"] if history else 0.0)
        self.last_plot, self.last_save = 0.0, time.time()
        self.pending_best: checkpoints.BestSnapshot | None = None
        self.received: list[int] = []

    def _save(self, state: train.TrainState, meta: dict) -> None:
        self.store.save(state, meta, best=self.pending_best)
        self.pending_best, self.last_save = None, time.time()
        self.so_far.saved = (int(state.step), describe_position(meta, meta["batches_in_epoch"]))

    def _stopped(self, state: train.TrainState, meta: dict) -> Interrupted:
        self.store.wait()
        return Interrupted(
            f"stopped by signal {self.received[0]} at step {int(state.step)} "
            f"({describe_position(meta, meta['batches_in_epoch'])}); checkpoint saved in "
            f"{self.store.latest_dir}; continue with the same command plus --resume")  # fmt: skip

    def interrupt_mid_epoch(self, state, sums, epoch: int, position: dict) -> Interrupted:
        """Saves the batch position and the epoch's partial sums; returns the Interrupted."""
        step = int(state.step)
        metrics.check_finite(metrics.finalize(sums)["loss"], step, epoch)
        metrics.check_finite_params(state.variables, step, epoch)
        partial = {k: float(v) for k, v in jax.device_get(sums).items()}
        meta = {**position, "history": self.history, "partial": partial}
        self._save(state, meta)
        return self._stopped(state, meta)

    def stop_if_signalled(self, state: train.TrainState, meta: dict) -> None:
        """At an epoch boundary: saves it (unless just saved) and raises on a signal."""
        if self.received:
            if self.so_far.saved is None or self.so_far.saved[0] != int(state.step):
                self._save(state, meta)
            raise self._stopped(state, meta)

    def end_epoch(
        self, state, epoch: int, setup: phases.PhaseSetup, phase_start_step: int,
        train_metrics: dict, val: dict, seconds: float, *, improved: bool, last: bool,
        position: dict,
    ) -> dict:  # fmt: skip
        """Records the epoch, saves when due, writes the reports; raises on a signal.

        The learning rates recorded are those of the epoch's last step (the schedules decay
        within a phase, counting from its first step; the phase's peak is in the config).
        Returns the epoch's checkpoint metadata.
        """
        step = int(state.step)
        record = {
            "epoch": epoch, "phase": setup.phase.name,
            "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            **setup.learning_rates(step - phase_start_step - 1),
            "epoch_seconds": round(seconds, 3),
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
        if last or self.received or time.time() - self.last_save >= (
            self.config.checkpoint_every_seconds
        ):
            self._save(state, meta)
        log.info("epoch %d [%s] train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                 "%.1f s, %.0f img/s", epoch, setup.phase.name, record["train_loss"],
                 record["train_accuracy"], record["val_loss"], record["val_accuracy"],
                 seconds, record["images_per_second"])  # fmt: skip
        if self.is_main:
            plot = last or bool(self.received) or (
                time.time() - self.last_plot >= PLOT_EVERY_SECONDS)
            report.write_reports(self.workdir, self.history, plot=plot)
            self.last_plot = time.time() if plot else self.last_plot
            self.events.add(record)
        self.stop_if_signalled(state, meta)  # it came in the last batch or the evaluation
        return meta


def fit(config: TrainConfig, workdir: str | os.PathLike, *, resume: bool = False,
        overwrite: bool = False, command: str | None = None,
        signals: interrupts.StopSignals | None = None) -> FitResult:  # fmt: skip
    """Trains as ``config`` says, checkpointing into ``workdir``; returns the summary.

    Args:
      config: the run.
      workdir: output folder (created); holds config.json, checkpoints, metrics, curves,
        TensorBoard events.
      resume: continue from the workdir's latest complete checkpoint (same step, optimizer
        state, RNG and data order), if there is one; more epochs than the run was planned
        with extend the phase it completed last (``flaxcnn.resume.phases_to_run``).
      overwrite: replace a run already in ``workdir``; it is deleted only once everything
        that can reject this run (flags, data, weights) has passed.
      command: the command line for the run record (default: this process's).
      signals: SIGINT/SIGTERM handlers already installed by the caller (the CLI); by default
        ``fit`` installs its own for the call (main thread only).

    Returns:
      The summary (``{'epochs': history, 'best_val_accuracy', 'test'?, 'test_best'?, ...}``
      as in metrics.json), the module and the final TrainState.

    Raises:
      Interrupted: SIGINT/SIGTERM (or Ctrl-C) stopped the run; at a step boundary a
        checkpoint was saved first. The message names what is saved.
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    so_far = _SoFar(workdir)
    stop_signals = signals or interrupts.StopSignals()
    try:
        with contextlib.ExitStack() as closing:
            if signals is None and stop_signals.install():
                closing.callback(stop_signals.uninstall)
            return _fit(config, workdir, resume, overwrite, command, stop_signals, so_far,
                        closing)  # fmt: skip
    except Interrupted:
        raise
    except KeyboardInterrupt:  # outside the training loop: nothing more to save
        raise Interrupted(so_far.stop_message(stop_signals.first)) from None


def _fit(config: TrainConfig, workdir: pathlib.Path, resume: bool, overwrite: bool, command,
         signals: interrupts.StopSignals, so_far: _SoFar, closing) -> FitResult:  # fmt: skip
    is_main = jax.process_index() == 0
    # Everything that can reject the run (phases, batch size, data, weights, a resume that
    # changes an ended phase) comes before the first write into the workdir, so that a bad
    # setting leaves nothing behind.
    config = config.resolved()
    resume_lib.check_workdir(workdir, resume=resume, overwrite=overwrite)
    if resume:  # the head recipe the run picked, not a new search
        config = head_search.recorded(config, workdir)
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
    signals.check()
    log.info("devices: %d x %s (%s backend), %d process(es)", mesh.devices.size,
             jax.devices()[0].device_kind, jax.default_backend(), jax.process_count())  # fmt: skip
    for note in dataset.notes:
        log.info("%s", note)
    counts = data.class_counts(dataset, "train")
    class_weights = metrics.class_weights_for(config.class_weight, counts)
    imbalance = metrics.imbalance_warning(dataset.class_names, counts, config.class_weight)
    if imbalance:
        log.warning("warning: %s", imbalance)
    hw = (config.image_size, config.image_size)
    mconfig = config.model_config(len(dataset.class_names))
    model = build_model(mconfig, dtype=config.compute_dtype, conv_impl=config.conv_impl)
    base_metadata = {
        "format": FORMAT, "model": mconfig, "image_size": list(hw),
        "preprocessing": preprocessing, "class_names": list(dataset.class_names),
        "data": dataset.name, "config": dataclasses.asdict(config),
        "phase_epochs": [phase.epochs for phase in plan], "tta": config.tta,
    }  # fmt: skip
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    pipeline = dict(batch_size=config.batch_size, image_size=hw, preprocessing=preprocessing)
    rng = jax.random.PRNGKey(config.seed)
    state_rng = jax.random.fold_in(rng, 2)  # every phase's TrainState (dropout keys)
    latest_dir = workdir / checkpoints.LATEST_DIR
    steps_per_epoch = data.num_batches(dataset, "train", config.batch_size, drop_remainder=True)

    abstract = jax.eval_shape(model.init, rng, jnp.zeros((1, *hw, 3)))
    make_setups = lambda config, plan: [phases.setup(
        phase, abstract["params"], model, mesh, config, steps_per_epoch, class_weights)
        for phase in plan]  # fmt: skip
    setups = make_setups(config, plan)
    start, state = resume_lib.starting_point(setups, abstract, rng, latest_dir, mesh,
                                             steps_per_epoch) if resume else (
        dict(resume_lib.FRESH_START), None)  # fmt: skip
    variables = state.variables if state is not None else initial_variables(
        config, model, hw, jax.random.fold_in(rng, 1))  # fmt: skip
    so_far.fresh = not (resume and holds_run(workdir))
    if state is not None:
        so_far.saved = (int(state.step), describe_position(start, steps_per_epoch))
    todo = resume_lib.phases_to_run(plan, start, workdir)
    if state is not None and not todo:
        summary = resume_lib.nothing_to_train(workdir, start, int(state.step), plan,
                                              steps_per_epoch)  # fmt: skip
        return FitResult(summary, model, state)
    signals.check()
    searched, sources = None, {}  # the head phase's data, when the search has built it
    if config.searches_head_recipe and state is None:
        so_far.stage = f"as phase {plan[0].name} was being prepared"
        sources[0] = phases.PhaseData.build(plan[0], dataset, model, variables, mesh, config,
                                            pipeline, shard)  # fmt: skip
        searched = head_search.search(config, plan[0], sources[0], model, variables, state_rng,
                                      class_weights, mesh)  # fmt: skip
        config = head_search.picked_config(config, searched)
        plan = phases.plan(config)
        setups = make_setups(config, plan)
        base_metadata["config"] = dataclasses.asdict(config)
        signals.check()

    so_far.existed = workdir.exists()
    if overwrite and not resume and holds_run(workdir) and is_main:
        shutil.rmtree(workdir)  # the run it replaces: only now that this one can start
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("flaxcnn: the replaced run is deleted")
    workdir.mkdir(parents=True, exist_ok=True)
    so_far.written = True
    history = list(start["history"])
    events = None
    if is_main:
        resume_lib.write_record(workdir / "config.json", config, command=command,
                                start_step=int(state.step) if state is not None else 0,
                                resumed=not so_far.fresh)  # fmt: skip
        report.write_unreadable_list(workdir, dataset.skipped)
        if searched is not None:
            head_search.write_results(workdir, head_search.payload(searched, plan[0].epochs))
        events = report.TensorBoardEvents(workdir, history)
        closing.callback(events.close)
    store = checkpoints.RunCheckpoints(workdir, config.keep_checkpoints)
    closing.callback(store.close)

    book = _Bookkeeping(workdir, store, is_main, config, history, so_far, events)
    for phase_index, (phase, setup) in enumerate(zip(plan, setups, strict=True)):
        if phase_index not in todo:
            continue
        first_epoch_in_phase = todo[phase_index]
        resuming_here = phase_index == start["phase_index"] and state is not None
        n_resumed = start["batches_in_epoch"] or steps_per_epoch
        if resuming_here:  # the schedules count from the phase's first step
            phase_start_step = (int(state.step) - start["epoch_in_phase"] * n_resumed
                                - start["batch"])  # fmt: skip
            if start["phase_complete"]:
                resume_lib.log_extension(setup, start["epoch_in_phase"], config.lr_schedule,
                                         int(state.step) - phase_start_step)  # fmt: skip
        else:
            phase_start_step = int(state.step) if state is not None else 0
            state = setup.initial_state(variables, state_rng, phase_start_step)
            # On the mesh before step 1, or step 2 (fed step 1's output) compiles again.
            state = sharding.replicate(state, mesh)
        log.info("%s", setup.describe(state.params, bool(state.batch_stats),
                                      config.backbone is None))  # fmt: skip
        so_far.stage = f"as phase {phase.name} was being prepared"
        source = sources.pop(phase_index, None) or phases.PhaseData.build(
            phase, dataset, model, state.variables, mesh, config, pipeline, shard)
        so_far.stage = f"in phase {phase.name}"
        epoch_offset = (start["epoch"] - first_epoch_in_phase) if resuming_here else (
            history[-1]["epoch"] if history else 0)  # fmt: skip
        stale = resume_lib.stale_epochs(history, phase.name) if resuming_here else 0
        with signals.deferred() as received:  # the loop stops at step boundaries, saving
            book.received = received
            meta = None
            for epoch_in_phase in range(first_epoch_in_phase, phase.epochs):
                if meta is not None:
                    book.stop_if_signalled(state, meta)
                epoch = epoch_offset + epoch_in_phase + 1
                resumed_epoch = resuming_here and epoch_in_phase == first_epoch_in_phase
                start_batch = start["batch"] if resumed_epoch else 0
                partial = start["partial"] if start_batch else None
                position = {**base_metadata, "phase_index": phase_index,
                            "batches_in_epoch": source.n_batches}  # fmt: skip
                t_epoch = time.time()
                desc = f"epoch {epoch} [{phase.name}]"
                display = report.EpochProgressDisplay(
                    desc, source.n_batches, start_batch, config.batch_size, enabled=is_main,
                    announce=source.cache is None)  # fmt: skip
                progress = _EpochProgress(display, epoch, source.n_batches, start_batch,
                                          int(state.step), config.log_every,
                                          stop=received)  # fmt: skip
                try:  # closed on errors too: a NaN message must not land on the bar's line
                    state, sums = source.run_epoch(setup.steps, state, epoch, start_batch,
                                                   partial, progress)  # fmt: skip
                finally:
                    display.close()
                if received and progress.done < source.n_batches:
                    raise book.interrupt_mid_epoch(state, sums, epoch, {
                        **position, "epoch": epoch - 1, "epoch_in_phase": epoch_in_phase,
                        "batch": progress.done, "phase_complete": False})  # fmt: skip
                train_metrics = metrics.finalize(sums)
                metrics.check_finite(train_metrics["loss"], int(state.step), epoch)
                val = source.evaluate(setup.steps, state.variables)
                improved = val["accuracy"] >= book.best_accuracy  # ties: the later, more trained
                stale = 0 if improved else stale + 1
                last = epoch_in_phase + 1 == phase.epochs or bool(
                    config.early_stopping_patience and stale >= config.early_stopping_patience)
                meta = book.end_epoch(
                    state, epoch, setup, phase_start_step, train_metrics, val,
                    time.time() - t_epoch, improved=improved, last=last, position={
                        **position, "epoch": epoch, "epoch_in_phase": epoch_in_phase + 1,
                        "batch": 0, "phase_complete": last})  # fmt: skip
                if last:
                    if stale and config.early_stopping_patience:
                        log.info("early stopping: no validation improvement for %d epochs", stale)
                    break
        store.wait()
        signals.check()
        variables = state.variables

    so_far.stage = "during the final evaluation"
    summary = {"best_val_accuracy": book.best_accuracy, "phases": [p.name for p in plan],
               "class_names": list(dataset.class_names)}  # fmt: skip
    if "test" in dataset.split_sizes and state is not None:
        summary.update(_test_results(model, state, workdir, history, dataset, mesh,
                                     {**pipeline, **shard}, config.tta))  # fmt: skip
    store.wait()
    signals.check()
    if state is not None:
        so_far.stage = "during the error analysis"
        summary["analysis"] = _error_analysis(model, workdir, dataset, mesh,
                                              {**pipeline, **shard}, write=is_main)  # fmt: skip
        signals.check()
    if is_main:
        report.write_reports(workdir, history, summary=summary)
    return FitResult({"epochs": history, **summary}, model, state)


def _error_analysis(model, workdir: pathlib.Path, dataset, mesh, pipeline: dict, *,
                    write: bool) -> dict[str, dict]:  # fmt: skip
    """``flaxcnn.analysis`` of the checkpoint ``checkpoints.restore`` loads (the best) on the
    validation split and the test split if present, from one pass over each."""
    _, variables, metadata = checkpoints.restore(workdir)
    mode = metadata.get("tta", "none")  # as the run validated
    return analysis.analyse(
        lambda v, x: tta.logits(lambda y: model.apply(v, y, train=False), x, mode),
        sharding.replicate(variables, mesh),
        dataset, mesh, workdir, checkpoint=f"best checkpoint (epoch {metadata['epoch']})",
        pipeline=pipeline, write=write)  # fmt: skip


def _test_results(model, state, workdir: pathlib.Path, history: list[dict], dataset, mesh,
                  pipeline: dict, tta_mode: str) -> dict[str, dict]:  # fmt: skip
    """Test-split metrics of the last state and of the checkpoint ``checkpoints.restore``
    loads from the workdir (the best by validation accuracy), with the run's test-time
    augmentation."""
    labels = optim.path_labels(state.params, optim.ALL_TRAINABLE)
    steps = train.make_steps(model.apply, train.frozen_tree(labels), mesh,
                             update_batch_stats=False, tta=tta_mode)  # fmt: skip
    evaluate = lambda variables: train.evaluate(
        steps, variables, data.eval_batches(dataset, "test", **pipeline), mesh)
    results = {"test": {**evaluate(state.variables), "epoch": history[-1]["epoch"]}}
    _, best_variables, best_metadata = checkpoints.restore(workdir)
    best_epoch = best_metadata["epoch"]
    if best_epoch == history[-1]["epoch"] and not best_metadata.get("batch"):
        results["test_best"] = dict(results["test"])  # the same weights
    else:
        best = evaluate(sharding.replicate(best_variables, mesh))
        results["test_best"] = {**best, "epoch": best_epoch}
    for key, what in (("test_best", "best checkpoint"), ("test", "last state")):
        r = results[key]
        log.info("test (%s, epoch %d): loss %.4f acc %.4f on %d images", what, r["epoch"],
                 r["loss"], r["accuracy"], r["count"])  # fmt: skip
    return results
