"""The phases of a run, each computed once: what trains, its optimizer, steps and data.

Transfer recipe (a registered backbone), after the TensorFlow transfer-learning tutorial:
  1. ``head``: the whole backbone frozen, only the new head trains. When augmentation is off
     for this phase (``feature_cache='auto'``: always, see README), the backbone runs once
     over the data and the head trains on cached pooled features.
  2. ``finetune``: the backbone from ``fine_tune_at`` on trains too, at a low learning rate.
     The whole stages below it run as their own inference computation before each training
     step (:func:`frozen_stage_count`), and validation runs from the first trainable stage on
     their activations, computed once (:func:`validation_cache`).
The backbone's norms stay in inference mode throughout (``TransferClassifier``). A model
trained from scratch has one phase, ``train``, with everything trainable.

``run.fit``, ``flaxcnn.bench`` and the experiment scripts all build phases here, so bench
times the product's own steps. Only the backbone contract is asked about the model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxcnn import data, metrics, optim, train, tta
from flaxcnn.config import TrainConfig

log = logging.getLogger(__name__)
# Host memory the validation split's frozen-stage activations may take (feature_cache='auto').
EVAL_CACHE_MAX_BYTES = 2 * 2**30
HEAD_EPOCHS_CACHED, HEAD_EPOCHS = 50, 10  # cached epochs cost almost nothing (README)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a run.

    Attributes:
      name: ``'head'``, ``'finetune'`` or ``'train'``.
      epochs: epochs to train.
      learning_rate: peak rate of the trainable backbone (or everything, from scratch).
      rules: freeze rules (``flaxcnn.optim.path_labels``).
      first_trainable: the first backbone layer that trains (``None``: none of it, or a
        model trained from scratch).
      cached_features: the head trains on cached backbone features.
      augment: training images are augmented.
      head_learning_rate: the head's own rate (the rules label it ``HEAD``), if it has one.
    """

    name: str
    epochs: int
    learning_rate: float
    rules: tuple[tuple[str, str], ...]
    first_trainable: str | None
    cached_features: bool
    augment: bool
    head_learning_rate: float | None = None

    @property
    def trains_from(self) -> str:
        """Where training starts, for the log."""
        if self.name == "train":
            return "the input"
        return "head" if self.first_trainable is None else f"backbone/{self.first_trainable}"


def plan(config: TrainConfig) -> list[Phase]:
    """The phases a config asks for (validated: a bad ``fine_tune_at`` fails before any work).

    An unset head recipe is planned at ``config.DEFAULT_HEAD_RECIPE``; ``run.fit`` plans
    again with the head phase's pick (``flaxcnn.head_search``) before anything trains.
    """
    backbone = config.backbone
    head_rate = config.head_recipe()["head_learning_rate"]
    if backbone is None:
        epochs = HEAD_EPOCHS if config.head_epochs is None else config.head_epochs
        return [Phase("train", epochs, head_rate, tuple(optim.ALL_TRAINABLE),
                      None, False, config.augment)]  # fmt: skip
    cache = config.head_on_cached_features
    head_epochs = config.head_epochs
    if head_epochs is None:
        head_epochs = HEAD_EPOCHS_CACHED if cache else HEAD_EPOCHS
    first = backbone.fine_tune_layer(config.resolved_fine_tune_at, **config.options)
    trainable = backbone.layers_from(first, **config.options)
    return [
        Phase("head", head_epochs, head_rate, tuple(optim.transfer_rules()),
              None, cache, config.augment and not cache),
        Phase("finetune", config.finetune_epochs, config.finetune_learning_rate,
              tuple(optim.transfer_rules(trainable, head_label=optim.HEAD)), first, False,
              config.augment, config.finetune_head_learning_rate),
    ]  # fmt: skip


def learning_rate_schedule(rate: Any, phase: Phase, kind: str, steps_per_epoch: int):
    """A learning rate over a phase: cosine decay from ``rate`` to 0, or constant (``kind``,
    ``TrainConfig.lr_schedule``); ``rate`` may be traced (``flaxcnn.head_search``)."""
    if kind == "constant":
        return optax.constant_schedule(rate)
    return optax.cosine_decay_schedule(rate, max(phase.epochs * steps_per_epoch, 1))


@dataclasses.dataclass(frozen=True)
class PhaseSetup:
    """A phase made concrete for one model: labels, frozen tree, optimizer, compiled steps.

    Attributes:
      phase: the phase.
      labels: the optimizer label of every parameter (``flaxcnn.optim`` labels).
      frozen: static bool tree, True for frozen leaves (their backward pass is dropped).
      tx: the optimizer (Adam(W) per label; frozen leaves get ``set_to_zero``).
      steps: the jitted train/eval steps (the head alone on cached features).
      learning_rates: ``step -> {label: rate}`` of the phase's schedules (for the records).
    """

    phase: Phase
    labels: Any
    frozen: Any
    tx: optax.GradientTransformation
    steps: train.StepFns
    learning_rates: Any

    def initial_state(self, variables: Any, rng: jax.Array, step: int = 0) -> train.TrainState:
        return train.TrainState.create(variables, self.tx, rng, step=step)

    def describe(self, params: Any, model_has_statistics: bool, trains_statistics: bool) -> str:
        """The one line each phase starts with."""
        counts = optim.count_by_label(params, self.labels)
        phase = self.phase
        if not model_has_statistics:
            norms = "no running statistics"
        elif trains_statistics:
            norms = "BatchNorm trains (batch statistics)"
        else:
            norms = "BatchNorm of the backbone in inference mode (running averages, never updated)"
        head = f" (head {phase.head_learning_rate:g})" if phase.head_learning_rate else ""
        extra = ", features cached (one backbone pass)" if phase.cached_features else ""
        extra += ", augmentation on" if phase.augment else ", augmentation off"
        return (
            f"phase {phase.name}: {counts[optim.TRAINABLE]:,} trainable / "
            f"{counts[optim.FROZEN]:,} frozen parameters; trainable from {phase.trains_from}; "
            f"{norms}; learning rate {phase.learning_rate:g}{head}{extra}"
        )


def head_apply(model: Any):
    """``(variables, features, **kw) -> logits``: the head of a ``TransferClassifier`` alone,
    as it trains and evaluates on cached features."""
    return lambda v, x, **kw: model.apply(v, x, method=model.classify_features, **kw)


def frozen_stage_count(phase: Phase, config: TrainConfig) -> int:
    """The backbone stages a phase never trains: those below the stage of its first trainable
    layer (0 for the head phase, a model from scratch, or fine-tuning from the stem).

    The backbone's norms are in inference mode in every transfer phase, so these stages are a
    function of the images alone: validation caches their output (:func:`validation_cache`)
    and training computes it apart from the differentiated step (:func:`setup`).
    """
    if phase.first_trainable is None or config.backbone is None:
        return 0
    return config.backbone.stage_of(phase.first_trainable, **config.options)


def to_stage(model: Any, stage: int):
    """``(variables, images) -> activations`` entering backbone stage ``stage`` (inference)."""
    return lambda v, x: model.apply(v, x, method=model.features, stop=stage)


def from_stage(model: Any, stage: int):
    """``(variables, activations, **kw) -> logits``: the model continued from stage ``stage``."""
    return lambda v, x, **kw: model.apply(v, x, start=stage, **kw)


def setup(
    phase: Phase, params: Any, model: Any, mesh: jax.sharding.Mesh, config: TrainConfig,
    steps_per_epoch: int, class_weights: np.ndarray | None = None,
) -> PhaseSetup:  # fmt: skip
    """Computes a phase's labels, frozen tree, optimizer and steps (jitted, compiled on use).

    Args:
      phase: from :func:`plan`.
      params: the model's parameters (only their structure is used).
      model: the module (a ``TransferClassifier`` for the transfer phases).
      mesh: the device mesh.
      config: the run.
      steps_per_epoch: optimizer steps per epoch (the schedules' length).
      class_weights: per-class weights of the training loss (``--class-weight``), if any.
    """
    labels = optim.path_labels(params, phase.rules)
    frozen = train.frozen_tree(labels)
    rate = learning_rate_schedule(phase.learning_rate, phase, config.lr_schedule,
                                  steps_per_epoch)  # fmt: skip
    head_rate = None
    if phase.head_learning_rate is not None:
        head_rate = learning_rate_schedule(phase.head_learning_rate, phase,
                                           config.lr_schedule, steps_per_epoch)  # fmt: skip
    recipe = config.head_recipe()
    decay = recipe["weight_decay"]
    if phase.name == "finetune":
        decay = config.resolved_finetune_weight_decay
    tx = optim.make_optimizer(rate, labels, weight_decay=decay,
                              head_learning_rate=head_rate)  # fmt: skip
    apply_fn = head_apply(model) if phase.cached_features else model.apply
    input_key = "features" if phase.cached_features else "image"
    # On cached features the views of test-time augmentation come from the cache (PhaseData).
    stage = 0 if phase.cached_features else frozen_stage_count(phase, config)
    split = (to_stage(model, stage), from_stage(model, stage)) if stage else None
    steps = train.make_steps(apply_fn, frozen, mesh, update_batch_stats=config.backbone is None,
                             input_key=input_key, class_weights=class_weights,
                             tta="none" if phase.cached_features else config.tta,
                             frozen_stages=split)  # fmt: skip
    learning_rates = lambda step: {
        "learning_rate": float(rate(step)),
        **({"head_learning_rate": float(head_rate(step))} if head_rate else {}),
    }
    return PhaseSetup(phase, labels, frozen, tx, steps, learning_rates)


def as_sums(partial: dict[str, float]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in partial.items()}


def _continuing(steps: train.StepFns, partial: dict[str, float] | None) -> train.StepFns:
    """Steps whose first call adds the interrupted epoch's ``partial`` sums to its own.

    ``run_epoch`` then accumulates ``((b0 + b1) + b2) + ...`` in the same order as an
    uninterrupted epoch, so the epoch's metrics are bit-identical (float addition is not
    associative: adding the partial sums at the end would differ in the last bits).
    """
    if partial is None:
        return steps
    pending = [as_sums(partial)]

    def train_step(state, batch):
        state, sums = steps.train(state, batch)
        return state, (metrics.add_sums(pending.pop(), sums) if pending else sums)

    return dataclasses.replace(steps, train=train_step)


@dataclasses.dataclass(frozen=True)
class PhaseData:
    """Where one phase's batches come from: cached backbone features, or the image pipeline.

    Attributes:
      dataset: the opened data.
      cache: ``{'train', 'validation'} -> {'features', 'label'}`` on cached features.
      augment: whether training images are augmented.
      batch_size: the global batch size.
      seed: the run's seed (data order and augmentation).
      pipeline: ``data.eval_batches``/``train_batches`` keywords (size, preprocessing, shard).
      shard: this process's share (``process_index``, ``process_count``).
      mesh: the device mesh.
      validation_cache: validation from cached features or activations (else the images);
        with test-time augmentation those of every view (``[N, V, ...]``, ``flaxcnn.tta``).
      validation_step: the step that evaluates ``validation_cache`` when it is not the
        phase's own (activations entering a stage, see :func:`validation_cache`; views).
    """

    dataset: data.ImageDataset
    cache: dict[str, dict[str, np.ndarray]] | None
    augment: bool
    batch_size: int
    seed: int
    pipeline: dict
    shard: dict
    mesh: jax.sharding.Mesh
    validation_cache: dict[str, np.ndarray] | None = None
    validation_step: Any = None

    @classmethod
    def build(cls, phase: Phase, dataset, model, variables, mesh, config: TrainConfig, pipeline,
              shard) -> PhaseData:  # fmt: skip
        """Caches what the phase can cache (features; frozen validation activations) of the
        backbone in ``variables``."""
        cache = None
        if phase.cached_features:
            t0 = time.time()
            cache = {split: train.extract_features(
                model, variables, data.eval_batches(dataset, split, **pipeline, **shard), mesh,
                tta=config.tta if split == "validation" else "none")
                for split in ("train", "validation")}  # fmt: skip
            views = tta.num_views(config.tta)
            log.info("cached %d + %d%s feature vectors in %.1f s", len(cache["train"]["label"]),
                     len(cache["validation"]["label"]), f" x {views} views" if views > 1 else "",
                     time.time() - t0)  # fmt: skip
            validation, step = cache["validation"], None  # the phase's own steps take features
            if views > 1:
                step = train.make_eval_step(head_apply(model), mesh, input_key="features",
                                            cached_views=True)  # fmt: skip
        else:
            validation, step = validation_cache(phase, dataset, model, variables, mesh, config,
                                                pipeline, shard)  # fmt: skip
        source = cls(dataset, cache, phase.augment, config.batch_size, config.seed, pipeline,
                     shard, mesh, validation, step)  # fmt: skip
        if source.n_batches == 0:
            raise data.DataError(f"the train split has fewer examples than --batch-size "
                                 f"{config.batch_size}; lower --batch-size")  # fmt: skip
        return source

    @property
    def n_batches(self) -> int:
        if self.cache is not None:
            return len(self.cache["train"]["label"]) // self.batch_size
        return data.num_batches(self.dataset, "train", self.batch_size, drop_remainder=True)

    def evaluate(self, steps: train.StepFns, variables) -> dict[str, float]:
        """Validation metrics, from the phase's validation cache if it has one."""
        if self.validation_cache is None:
            batches = data.eval_batches(self.dataset, "validation", **self.pipeline, **self.shard)
        else:
            batches = train.feature_batches(self.validation_cache, self.batch_size, seed=None,
                                            **self.shard)  # fmt: skip
        if self.validation_step is not None:
            steps = dataclasses.replace(steps, evaluate=self.validation_step)
        return train.evaluate(steps, variables, batches, self.mesh)

    def run_epoch(self, steps, state, epoch: int, start_batch: int, partial, progress):
        """Trains one epoch from ``start_batch`` on (``partial``: the sums before it)."""
        if self.cache is not None:  # in memory: whole chunks of steps per call (lax.scan)
            batches = train.feature_batches(
                self.cache["train"], self.batch_size, seed=self.seed, epoch=epoch,
                start_batch=start_batch, **self.shard)  # fmt: skip
            carried = None if partial is None else as_sums(partial)
            state, sums = train.run_epoch_in_memory(
                steps, state, batches, self.mesh, initial_sums=carried, on_step=progress
            )
        else:
            batches = data.train_batches(self.dataset, **self.pipeline, augment=self.augment,
                                         seed=self.seed, epoch=epoch, start_batch=start_batch,
                                         **self.shard)  # fmt: skip
            state, sums = train.run_epoch(_continuing(steps, partial), state, batches, self.mesh,
                                          on_step=progress)  # fmt: skip
        if sums is None:  # resumed after the epoch's last batch (older checkpoints)
            sums = as_sums(partial)
        return state, sums


def validation_cache(phase: Phase, dataset, model, variables, mesh, config: TrainConfig,
                     pipeline, shard):  # fmt: skip
    """The validation split's activations entering the first stage that trains, computed once.

    The stages below it are frozen, with their norms in inference mode, and validation images
    are never augmented, so their output on the validation split cannot change during the
    phase; each epoch's evaluation then runs only the stages that train (results equal up to
    float rounding). With the default model fine-tuned from its layer 100 on a 2-core CPU an
    epoch's evaluation takes ~2 s instead of ~10 s. Off with ``feature_cache='off'``; with
    ``'auto'`` only when the activations fit ``EVAL_CACHE_MAX_BYTES``. With test-time
    augmentation the cache holds the activations of every view. Returns ``(cache, eval_step)``,
    or Nones where nothing below the trainable part is frozen in the backbone (a model from
    scratch, fine-tuning from the stem; the head phase caches its pooled features itself).
    """
    stage = frozen_stage_count(phase, config)
    if config.feature_cache == "off" or stage == 0:
        return None, None
    image = jnp.zeros((1, *pipeline["image_size"], 3))
    shape = jax.eval_shape(to_stage(model, stage), variables, image).shape[1:]
    n = dataset.split_sizes["validation"]
    views = tta.num_views(config.tta)
    nbytes = n * views * int(np.prod(shape)) * 4
    if config.feature_cache == "auto" and nbytes > EVAL_CACHE_MAX_BYTES:
        log.info("validation activations at %s would take %.1f GB: evaluating from the images",
                 phase.first_trainable, nbytes / 1e9)  # fmt: skip
        return None, None
    t0 = time.time()
    cache = train.extract_features(
        model, variables, data.eval_batches(dataset, "validation", **pipeline, **shard),
        mesh, stop=stage, tta=config.tta)  # fmt: skip
    log.info("cached the validation activations entering %s (%d x %s, %.0f MB) in %.1f s; "
             "evaluation runs from there (training starts at %s)",
             config.backbone.stage_names[stage], n * views, "x".join(map(str, shape)),
             nbytes / 1e6, time.time() - t0, phase.first_trainable)  # fmt: skip
    return cache, train.make_eval_step(from_stage(model, stage), mesh, input_key="features",
                                       cached_views=views > 1)  # fmt: skip
