"""Optimisers whose frozen parameters are frozen by the optimiser itself (no model knowledge).

Every parameter gets a label from ordered ``(regex, label)`` rules over its ``/``-joined
path (first match wins; an uncovered parameter is an error, so a renamed layer cannot slip
through). ``optax.multi_transform`` gives ``'trainable'`` leaves Adam(W), ``'head'`` leaves
(the new head while fine-tuning) Adam(W) at their own learning rate, and ``'frozen'`` leaves
``optax.set_to_zero()``, so frozen parameters stay bit-identical whatever the gradients;
weight decay is masked to trainable kernels. (The train step additionally stops
gradients at frozen leaves so that XLA never computes their backward pass.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

TRAINABLE = "trainable"
HEAD = "head"  # trainable, at the head's own learning rate
FROZEN = "frozen"
Rules = Sequence[tuple[str, str]]


def path_labels(params: Any, rules: Rules) -> Any:
    """A tree like ``params`` holding each leaf's label from the first matching rule."""
    compiled = [(re.compile(pattern), label) for pattern, label in rules]
    flat = traverse_util.flatten_dict(params)
    labels = {}
    for key in flat:
        path = "/".join(key)
        label = next((lbl for pattern, lbl in compiled if pattern.fullmatch(path)), None)
        if label is None:
            raise ValueError(f"parameter {path!r} matches no freeze rule {list(rules)}")
        labels[key] = label
    return traverse_util.unflatten_dict(labels)


def transfer_rules(
    trainable_layers: Sequence[str] = (), *, head_label: str = TRAINABLE
) -> list[tuple[str, str]]:
    """Freeze rules for ``TransferClassifier``: the head trains, and the named backbone layers.

    Args:
      trainable_layers: the backbone's Keras layers that train (``Backbone.layers_from``);
        empty to freeze the whole backbone (feature extraction).
      head_label: :data:`HEAD` gives the head its own learning rate (see
        :func:`make_optimizer`).
    """
    rules = [(r"head/.*", head_label)]
    if trainable_layers:
        rules.append((rf"backbone/({'|'.join(map(re.escape, trainable_layers))})/.*", TRAINABLE))
    rules.append((r".*", FROZEN))
    return rules


ALL_TRAINABLE: Rules = ((r".*", TRAINABLE),)


LearningRate = float | optax.Schedule


def make_optimizer(
    learning_rate: LearningRate,
    labels: Any,
    *,
    weight_decay: float | jax.Array = 0.0,
    head_learning_rate: LearningRate | None = None,
) -> optax.GradientTransformation:
    """Adam (AdamW when ``weight_decay > 0``, on trainable kernels only); frozen leaves get 0.

    Args:
      learning_rate: constant or schedule of the :data:`TRAINABLE` leaves.
      labels: tree of :data:`TRAINABLE` / :data:`HEAD` / :data:`FROZEN` (see
        :func:`path_labels`).
      weight_decay: decoupled weight decay for trainable leaves with ``ndim > 1``.
      head_learning_rate: constant or schedule of the :data:`HEAD` leaves; required when
        ``labels`` holds any.
    """
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    # A traced decay (one per head of the recipe search, flaxcnn.head_search) is AdamW's.
    decays = not isinstance(weight_decay, int | float) or weight_decay != 0
    adam = lambda rate: (
        optax.adamw(rate, weight_decay=weight_decay, mask=decay_mask) if decays
        else optax.adam(rate)
    )
    transforms = {TRAINABLE: adam(learning_rate), FROZEN: optax.set_to_zero()}
    if HEAD in jax.tree.leaves(labels):
        if head_learning_rate is None:
            raise ValueError(f"labels hold {HEAD!r} leaves but no head_learning_rate was given")
        transforms[HEAD] = adam(head_learning_rate)
    return optax.multi_transform(transforms, labels)


def count_by_label(params: Any, labels: Any) -> dict[str, int]:
    """Number of trainable (:data:`HEAD` included) and frozen scalars."""
    counts = {TRAINABLE: 0, FROZEN: 0}
    flat_labels = traverse_util.flatten_dict(labels)
    for key, value in traverse_util.flatten_dict(params).items():
        counts[FROZEN if flat_labels[key] == FROZEN else TRAINABLE] += int(value.size)
    return counts
