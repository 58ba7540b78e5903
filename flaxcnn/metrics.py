"""Epoch metrics: exact example-weighted averages on the device, and the NaN/Inf guards.

Steps return *sums* (``loss_sum``, ``correct``, ``count``) that are added up on the device and
divided once, so a padded final batch and unequal batch sizes weigh each example exactly once
(a mean of batch means does not; flax#262). The files a run writes from them are
``flaxcnn.report``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUM_KEYS = ("loss_sum", "correct", "count")


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> dict:
    """Summed softmax cross-entropy, correct predictions and example count (float32)."""
    import optax

    logits = logits.astype(jnp.float32)
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    values = (jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights))
    return dict(zip(SUM_KEYS, values, strict=True))


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
