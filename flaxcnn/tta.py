"""Test-time augmentation: a prediction averages the logits of an image's views.

``'flip'`` (``--tta flip``) views each image as itself and its horizontal mirror, the
augmentation every ImageNet model was trained with (timm's and big_vision's evaluation
"flip" TTA); ``'none'`` is the image alone. Pure functions on images and logits, so that
validation, test, ``predict`` and an exported model all compute the same thing:

    logits = tta.logits(lambda x: model.apply(variables, x), images, "flip")

Views stand on their own axis, ``[B, V, ...]``, so a cache can hold the views' features or
activations and :func:`mean_logits` finishes the prediction from them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

MODES = ("none", "flip")


def num_views(mode: str) -> int:
    """Views per image under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"test-time augmentation {mode!r} is unknown; allowed: {', '.join(MODES)}")
    return 2 if mode == "flip" else 1


def views(images: jax.Array, mode: str) -> jax.Array:
    """``[B, H, W, C]`` images -> ``[B, V, H, W, C]``: each image, then its mirror (``'flip'``)."""
    if num_views(mode) == 1:
        return images[:, None]
    return jnp.stack([images, images[:, :, ::-1]], axis=1)


def mean_logits(logits_fn: Callable[[jax.Array], jax.Array], views_: jax.Array) -> jax.Array:
    """``[B, V, ...]`` views (images, or their cached features) -> ``[B, classes]``: the mean of
    the views' logits, in float32.

    ``logits_fn`` runs once per view on ``[B, ...]``, the batch shape of a prediction without
    views, so a view's logits are exactly those it would get alone, and two equal views (a
    mirror-symmetric image) give them back unchanged: ``(a + a) / 2 == a``.
    """
    total = None
    for view in range(views_.shape[1]):
        logits = logits_fn(views_[:, view]).astype(jnp.float32)
        total = logits if total is None else total + logits
    return total / views_.shape[1]


def logits(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array, mode: str) -> jax.Array:
    """The test-time-augmented logits ``[B, classes]`` of ``[B, H, W, C]`` images.

    Args:
      logits_fn: images -> logits (e.g. ``lambda x: model.apply(variables, x)``).
      images: preprocessed images.
      mode: one of :data:`MODES`; ``'none'`` calls ``logits_fn(images)`` and nothing else.
    """
    if num_views(mode) == 1:
        return logits_fn(images)
    return mean_logits(logits_fn, views(images, mode))
