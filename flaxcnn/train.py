"""The training engine: TrainState, pure jitted steps, epochs over batches, feature caches.

Data flow: ``data`` (numpy batches) -> ``sharding.to_global`` -> jitted ``train_step``
(``TrainState -> TrainState``, metric sums) -> ``metrics`` / ``checkpoints``. The same steps
run every phase (``flaxcnn.phases``): a head on cached features, fine-tuning, or a model
trained from scratch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import lax

from flaxcnn import compiler, metrics, optim, sharding
from flaxcnn import tta as tta_lib

log = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; ``tx`` is static (rebuilt per phase)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, variables: Mapping[str, Any], tx, rng: jax.Array, step: int = 0):
        params = variables["params"]
        return cls(
            step=jnp.asarray(step, jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=rng,
            tx=tx,
        )

    @property
    def variables(self) -> dict[str, Any]:
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out

    def to_checkpoint(self) -> dict[str, Any]:
        """The arrays Orbax saves (``tx`` is rebuilt from the config on restore)."""
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
            "rng": self.rng,
        }

    def from_checkpoint(self, tree: Mapping[str, Any]) -> TrainState:
        return self.replace(**dict(tree))


@dataclasses.dataclass(frozen=True)
class StepFns:
    """A phase's compiled steps; ``apply`` is ``model.apply`` bound to the phase's method."""

    train: Callable
    evaluate: Callable
    train_scan: Callable  # (state, stacked batches [steps, batch, ...], initial sums)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: Callable,
    frozen: Any,
    update_batch_stats: bool,
    input_key: str,
    class_weights: jax.Array | None = None,
) -> tuple[TrainState, dict]:
    """One optimisation step; returns the new state and this batch's metric sums.

    Frozen leaves (``frozen`` is a static bool tree) are passed through ``stop_gradient``
    so that XLA drops their backward pass entirely, and are left untouched by the update,
    so they stay bit-identical (``p + 0.0`` would turn ``-0.0`` into ``0.0``). The loss (and
    the loss in the sums) weighs each example by its class's weight, if ``class_weights``.
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        params = jax.tree.map(lambda p, f: lax.stop_gradient(p) if f else p, params, frozen)
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        kwargs = dict(train=True, rngs={"dropout": dropout_rng})
        if update_batch_stats:
            logits, updates = apply_fn(
                variables, batch[input_key], mutable=["batch_stats"], **kwargs
            )
        else:
            logits, updates = apply_fn(variables, batch[input_key], **kwargs), {}
        sums = metrics.classification_sums(logits, batch["label"], batch.get("mask"),
                                           class_weights)  # fmt: skip
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), (sums, updates)

    grads, (sums, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(
        lambda p, d, f: p if f else optax.apply_updates(p, d), state.params, deltas, frozen
    )
    batch_stats = updates.get("batch_stats", state.batch_stats)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, sums


def eval_step(
    variables: Mapping[str, Any], batch: Mapping[str, jax.Array], *, apply_fn, input_key,
    tta: str = "none", cached_views: bool = False,
) -> dict:  # fmt: skip
    """Metric sums of one (padded, masked) batch in inference mode.

    With test-time augmentation (``tta``, see ``flaxcnn.tta``) the logits are the mean of the
    views' logits; ``cached_views``: the input already holds the views (``[B, V, ...]``
    cached features or activations of them).
    """
    logits_fn = lambda x: apply_fn(dict(variables), x, train=False)
    x = batch[input_key]
    if cached_views:
        logits = tta_lib.mean_logits(logits_fn, x)
    else:
        logits = tta_lib.logits(logits_fn, x, tta)
    return metrics.classification_sums(logits, batch["label"], batch.get("mask"))


def make_eval_step(apply_fn: Callable, mesh: jax.sharding.Mesh, *, input_key: str = "image",
                   tta: str = "none", cached_views: bool = False):  # fmt: skip
    """Jits ``eval_step`` with the mesh's shardings (batch split, variables replicated)."""
    return compiler.jit(
        functools.partial(
            eval_step, apply_fn=apply_fn, input_key=input_key, tta=tta, cached_views=cached_views
        ),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def make_steps(
    apply_fn: Callable,
    frozen: Any,
    mesh: jax.sharding.Mesh,
    *,
    update_batch_stats: bool,
    input_key: str = "image",
    class_weights: np.ndarray | None = None,
    tta: str = "none",
    frozen_stages: tuple[Callable, Callable] | None = None,
) -> StepFns:
    """Jits the steps once per phase with explicit shardings and a donated state.

    ``class_weights`` weigh the training loss (``train_step``); ``tta`` is the evaluation's
    test-time augmentation of images (``eval_step``). ``frozen_stages`` is ``apply_fn`` cut
    where training starts, ``(features_fn, from_stage_fn)``: ``features_fn(variables, x)``,
    the stages that only run forward in inference mode, is compiled as an inference
    computation (``flaxcnn.compiler``: on CPU without YNNPACK's dots, which lose in passes
    that are not differentiated), and the training steps differentiate ``from_stage_fn`` on
    its output. Evaluation runs ``apply_fn`` whole.
    """
    replicated = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    step = functools.partial(
        train_step,
        apply_fn=apply_fn if frozen_stages is None else frozen_stages[1],
        frozen=frozen,
        update_batch_stats=update_batch_stats,
        input_key=input_key,
        class_weights=None if class_weights is None else jnp.asarray(class_weights, jnp.float32),
    )
    train = compiler.jit(
        step,
        differentiated=True,
        in_shardings=(replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    evaluate = make_eval_step(apply_fn, mesh, input_key=input_key, tta=tta)

    def scanned(state, batches, sums):
        def body(carry, one_batch):
            state, total = carry
            state, batch_sums = step(state, one_batch)
            return (state, metrics.add_sums(total, batch_sums)), None

        (state, sums), _ = lax.scan(body, (state, sums), batches)
        return state, sums

    stacked = sharding.stacked_batch_sharding(mesh)
    train_scan = compiler.jit(
        scanned,
        differentiated=True,
        in_shardings=(replicated, stacked, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    if frozen_stages is None:
        return StepFns(train=train, evaluate=evaluate, train_scan=train_scan)
    features_fn = frozen_stages[0]
    features = compiler.jit(features_fn, in_shardings=(replicated, batch), out_shardings=batch)
    features_stacked = compiler.jit(
        lambda v, xs: lax.map(lambda x: features_fn(v, x), xs),
        in_shardings=(replicated, stacked),
        out_shardings=stacked,
    )
    return StepFns(
        train=AfterFrozenStages(features, train, input_key),
        evaluate=evaluate,
        train_scan=AfterFrozenStages(features_stacked, train_scan, input_key),
    )


@dataclasses.dataclass(frozen=True)
class AfterFrozenStages:
    """A training step on the output of the frozen stages, each its own compilation:
    ``step(state, batch with batch[input_key] = features(state.variables, batch[input_key]),
    *rest)``. The frozen parameters do not change during a phase, so they are read from the
    state that the step is given."""

    features: Callable
    step: Callable
    input_key: str

    def __call__(self, state: TrainState, batch: Mapping[str, Any], *rest: Any) -> Any:
        inputs = self.features(state.variables, batch[self.input_key])
        return self.step(state, {**batch, self.input_key: inputs}, *rest)

    def compile(self, state: TrainState, batch: Mapping[str, Any], *rest: Any):
        """Both computations compiled ahead of time for these inputs (``flaxcnn.bench``)."""
        features = self.features.lower(state.variables, batch[self.input_key]).compile()
        shapes = jax.eval_shape(self.features, state.variables, batch[self.input_key])
        step = self.step.lower(state, {**batch, self.input_key: shapes}, *rest).compile()
        return dataclasses.replace(self, features=features, step=step)

    def as_text(self) -> str:
        """Both programs' HLO, of a compiled one (as ``jax.stages.Compiled.as_text``)."""
        return self.features.as_text() + "\n" + self.step.as_text()

    def cost_analysis(self) -> dict[str, float]:
        """Both programs' costs added up, of a compiled one."""
        costs = [c[0] if isinstance(c, list) else c
                 for c in (self.features.cost_analysis(), self.step.cost_analysis())]  # fmt: skip
        return {k: sum(c.get(k, 0.0) for c in costs) for k in costs[0].keys() | costs[1].keys()}


def frozen_tree(labels: Any) -> Any:
    """Static bool tree (True = frozen) from optimiser labels."""
    return jax.tree.map(lambda label: label == optim.FROZEN, labels)


def run_epoch(
    steps: StepFns,
    state: TrainState,
    batches: Iterator[Mapping[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    on_step: Callable[[TrainState, dict | None], bool] | None = None,
) -> tuple[TrainState, dict | None]:
    """Runs the train step over ``batches``; metric sums stay on the device.

    ``on_step(state, running_sums)`` is called after each step; returning True stops early
    (used for progress display and preemption).
    """
    total = None
    for batch in batches:
        state, sums = steps.train(state, sharding.to_global(batch, mesh))
        total = metrics.add_sums(total, sums)
        if on_step is not None and on_step(state, total):
            break
    return state, total


SCAN_CHUNK = 256  # steps per call of ``train_scan``: bounds the stacked batches in memory


def run_epoch_in_memory(
    steps: StepFns,
    state: TrainState,
    batches: Iterator[Mapping[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    initial_sums: dict | None = None,
    on_step: Callable[..., bool] | None = None,
) -> tuple[TrainState, dict | None]:
    """``run_epoch`` for batches that are already in memory (cached features).

    Up to ``SCAN_CHUNK`` steps run in one ``lax.scan`` call, so an epoch of a small head
    costs one dispatch instead of one per step (per-step dispatch and transfer dominate a
    step that is a 1280x2 matmul). Metric sums accumulate in the same order as in
    ``run_epoch``, starting from ``initial_sums`` (an interrupted epoch's partial sums).
    ``on_step(state, running_sums, n_steps)`` is called after each chunk.
    """
    batches = list(batches)
    total = initial_sums
    for first in range(0, len(batches), SCAN_CHUNK):
        chunk = batches[first : first + SCAN_CHUNK]
        stacked = {k: np.stack([b[k] for b in chunk]) for k in chunk[0]}
        start = total if total is not None else metrics.zero_sums()
        state, total = steps.train_scan(
            state, sharding.to_global(stacked, mesh, stacked=True), start
        )
        if on_step is not None and on_step(state, total, len(chunk)):
            break
    return state, total


def evaluate(
    steps: StepFns, variables: Mapping[str, Any], batches, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """Exact example-weighted loss/accuracy over padded, masked batches."""
    total = None
    for batch in batches:
        total = metrics.add_sums(total, steps.evaluate(variables, sharding.to_global(batch, mesh)))
    if total is None:
        return {"loss": float("nan"), "accuracy": float("nan"), "count": 0}
    return metrics.finalize(total)


def extract_features(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches,
    mesh: jax.sharding.Mesh,
    *,
    stop: int | None = None,
    tta: str = "none",
) -> dict[str, np.ndarray]:
    """Runs the frozen backbone once over a split: ``{'features', 'label'}`` of real examples.

    The cached features make the feature-extraction phase cost one forward pass in total
    instead of one per epoch. With ``stop=k`` the features are the activations entering
    backbone stage ``k`` (fine-tuning evaluates from there: ``model.apply(v, x, start=k)``).
    With test-time augmentation (``tta='flip'``) they are those of every view of each image,
    ``[N, V, ...]`` (``flaxcnn.tta.views``), for an evaluation with ``cached_views``.
    """
    stages = {} if stop is None else {"stop": stop}
    count = tta_lib.num_views(tta)

    # Labels and mask travel with the images: with several processes each one feeds its own
    # share of a batch, and every process gets the whole (global) cache back.
    def features_of(v, batch):
        apply = lambda x: model.apply(v, x, train=False, method=model.features, **stages)
        if count == 1:
            x = apply(batch["image"])
        else:  # one view at a time, as tta.mean_logits evaluates them
            views = tta_lib.views(batch["image"], tta)
            x = jnp.stack([apply(views[:, i]) for i in range(count)], axis=1)
        return x, batch["label"], batch["mask"]

    fn = compiler.jit(
        features_of,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    features, labels = [], []
    for batch in batches:
        local = {"image": batch["image"], "label": batch["label"],
                 "mask": batch.get("mask", np.ones(len(batch["label"]), bool))}  # fmt: skip
        out, label, keep = jax.device_get(fn(dict(variables), sharding.to_global(local, mesh)))
        features.append(np.asarray(out, np.float32)[keep])
        labels.append(label[keep])
    return {"features": np.concatenate(features), "label": np.concatenate(labels)}


def feature_batches(
    cache: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int | None,
    epoch: int = 0,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of cached features: shuffled by ``(seed, epoch)`` and dropping the remainder
    for training (``seed`` given), or in order with a padded, masked last batch."""
    n = len(cache["label"])
    local = batch_size // process_count
    for idx in batch_indices(n, batch_size, seed=seed, epoch=epoch, start_batch=start_batch):
        mask = np.ones(batch_size, bool)
        if len(idx) < batch_size:
            mask[len(idx) :] = False
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), int)])
        mine = slice(process_index * local, (process_index + 1) * local)
        out = {"features": cache["features"][idx][mine], "label": cache["label"][idx][mine]}
        if seed is None:
            out["mask"] = mask[mine]
        yield out


def batch_indices(
    n: int, batch_size: int, *, seed: int | None, epoch: int = 0, start_batch: int = 0
) -> Iterator[np.ndarray]:
    """The example indices of :func:`feature_batches`' batches (the last one may be short
    when evaluating); the head-recipe search trains on the same order."""
    if seed is not None:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        count = n // batch_size
    else:
        order = np.arange(n)
        count = -(-n // batch_size)
    for b in range(start_batch, count):
        yield order[b * batch_size : (b + 1) * batch_size]
