"""Epoch metrics: exact example-weighted averages on the device, and the NaN/Inf guards.

Steps return *sums* (``loss_sum``, ``correct``, ``count``) that are added up on the device and
divided once, so a padded final batch and unequal batch sizes weigh each example exactly once
(a mean of batch means does not; flax#262). The files a run writes from them are
``flaxcnn.report``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUM_KEYS = ("loss_sum", "correct", "count")


def classification_sums(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None,
    class_weights: jax.Array | None = None,
) -> dict:  # fmt: skip
    """Summed softmax cross-entropy, correct predictions and example count (float32).

    With ``class_weights`` (the training loss, ``--class-weight``) each example's
    cross-entropy is multiplied by its class's weight, as Keras's ``class_weight`` does;
    ``count`` and ``correct`` are not weighted, so ``loss_sum / count`` is Keras's weighted
    loss (balanced weights average 1 over the training split: the loss keeps its scale).
    """
    import optax

    logits = logits.astype(jnp.float32)
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss_weights = weights if class_weights is None else weights * class_weights[labels]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    values = (jnp.sum(losses * loss_weights), jnp.sum(correct * weights), jnp.sum(weights))
    return dict(zip(SUM_KEYS, values, strict=True))


IMBALANCE_RATIO = 3.0  # class counts further apart than this get a warning at the start


def class_weights_for(mode: str, counts: Sequence[int]) -> np.ndarray | None:
    """The training loss's per-class weights for ``--class-weight`` (``None``: unweighted).

    ``'balanced'`` is Keras's and scikit-learn's ``n_samples / (n_classes * count_c)``: every
    class weighs as much in total, and the weights average 1 over the examples.
    """
    if mode == "none":
        return None
    counts = np.asarray(counts, np.float64)
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)


def imbalance_warning(class_names: Sequence[str], counts: Sequence[int], mode: str) -> str | None:
    """The start-of-run line when the training classes' counts differ by more than
    :data:`IMBALANCE_RATIO` (``None`` when they do not): the largest and smallest class, and
    what the loss does about it."""
    counts = np.asarray(counts)
    most, fewest = int(np.argmax(counts)), int(np.argmin(counts))
    ratio = counts[most] / max(counts[fewest], 1)
    if ratio <= IMBALANCE_RATIO:
        return None
    line = (f"the training classes are imbalanced: {class_names[most]} has {counts[most]} "
            f"images, {class_names[fewest]} {counts[fewest]} ({ratio:.1f}x apart); ")  # fmt: skip
    weights = class_weights_for(mode, counts)
    if weights is None:
        return line + ("every image weighs the same in the loss: pass --class-weight balanced "
                       "to weigh each class by n / (classes x count)")  # fmt: skip
    return line + (f"the training loss is weighted ({mode}: {class_names[most]} "
                   f"{weights[most]:.3g}, {class_names[fewest]} {weights[fewest]:.3g}; the "
                   "reported train loss is the weighted one)")  # fmt: skip


def zero_sums() -> dict:
    """The sums of no examples (the start of an accumulation)."""
    return {k: np.zeros((), np.float32) for k in SUM_KEYS}


def add_sums(total: dict | None, sums: dict) -> dict:
    return sums if total is None else jax.tree.map(jnp.add, total, sums)


def finalize(sums: Mapping[str, Any]) -> dict[str, float]:
    """``{'loss', 'accuracy', 'count'}`` from summed metrics (fetches them from the device)."""
    sums = jax.device_get(dict(sums))
    count = float(sums["count"])
    return {
        "loss": float(sums["loss_sum"]) / max(count, 1.0),
        "accuracy": float(sums["correct"]) / max(count, 1.0),
        "count": int(count),
    }


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped before saving anything non-finite."""


def check_finite(loss: float, step: int, epoch: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} at step {step} (epoch {epoch}); stopped without saving it. "
            "The last good checkpoint is kept: lower the learning rate and --resume"
        )


def check_finite_params(variables: Any, step: int, epoch: int) -> Any:
    """Raises before a checkpoint could store NaN/Inf weights (a finite loss is computed from
    the weights *before* the update, so the last step of an epoch can still break them).

    Returns the host copy it checked (the caller may keep it instead of fetching again).
    """
    # On the host: eager jnp checks would compile a program per leaf shape. (Replicated
    # arrays can be fetched on every process.)
    host = jax.device_get(variables)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(host)):
        raise NonFiniteLossError(
            f"the parameters became NaN/Inf at step {step} (epoch {epoch}); stopped without "
            "saving them. The last good checkpoint is kept: lower the learning rate and --resume"
        )
    return host
