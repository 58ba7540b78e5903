"""One call from a weights name to a ready model: ``(module, variables)``.

    model, variables = flaxcnn.pretrained.mobilenet_v2(input_size=160, include_top=False)
    features = model.apply(variables, images)          # images scaled to [-1, 1]
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxcnn.models.mobilenet_v2 import MIN_INPUT_SIZE, MobileNetV2, last_conv_channels
from flaxcnn.weights import cache, keras_h5, merge, registry

log = logging.getLogger(__name__)


def _size_hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    if min(height, width) < MIN_INPUT_SIZE:
        raise ValueError(f"input_size {input_size} is too small; MobileNetV2 needs >= 32")
    return height, width


class _Classifier(nn.Module):
    """MobileNetV2's ``predictions`` layer alone. Flax derives init keys from module paths,
    so its initial values equal those of the whole model's ``init`` with the same key."""

    num_classes: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)


def mobilenet_v2(
    alpha: float = 1.0,
    input_size: int | tuple[int, int] = 224,
    include_top: bool = True,
    *,
    num_classes: int = 1000,
    pooling: str | None = None,
    weights: str | os.PathLike | None = "imagenet",
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
    rng: jax.Array | None = None,
) -> tuple[MobileNetV2, dict[str, Any]]:
    """Builds MobileNetV2 and its variables, loading weights strictly.

    Args:
      alpha: width multiplier.
      input_size: input height/width (int or ``(h, w)``); any size >= 32 loads, weights come
        from the nearest published resolution.
      include_top: keep the classifier.
      num_classes: classes of the top. With ImageNet weights and ``num_classes != 1000`` the
        no-top file is loaded and ``predictions`` starts from its random initialisation.
      pooling: ``None``, ``'avg'`` or ``'max'`` when ``include_top=False``.
      weights: ``'imagenet'``, a path to a Keras ``.h5`` file, or ``None`` (random init).
      cache_dir: weights cache (default ``$FLAXCNN_CACHE`` or ``~/.cache/flaxcnn``).
      download: allow downloading ``'imagenet'`` weights.
      dtype: computation dtype.
      conv_impl: convolution formulation (results do not depend on it).
      rng: init key for random layers (default ``PRNGKey(0)``).

    Returns:
      ``(model, {'params': ..., 'batch_stats': ...})``.

    Raises:
      WeightsError: the file is missing, corrupt or does not fit the model.
    """
    height, width = _size_hw(input_size)
    model = MobileNetV2(
        alpha=alpha,
        include_top=include_top,
        num_classes=num_classes,
        pooling=pooling,
        dtype=dtype,
        conv_impl=conv_impl,
    )
    rng = jax.random.PRNGKey(0) if rng is None else rng
    init = lambda: model.init(rng, jnp.zeros((1, height, width, 3)))
    new_head = include_top and num_classes != 1000
    if weights is None:
        return model, jax.tree.map(np.asarray, jax.jit(init)())
    # Leaves from the file need only their shapes; a new classifier is initialised alone,
    # as model.init would (compiling the whole model's initialiser costs ~10 s on a CPU).
    variables = jax.eval_shape(init)
    if new_head:
        classifier = _Classifier(num_classes, dtype).init(
            rng, jnp.zeros((1, last_conv_channels(alpha))))  # fmt: skip
        variables["params"]["predictions"] = jax.tree.map(
            np.asarray, classifier["params"]["predictions"])  # fmt: skip

    spec = registry.find_spec(alpha, (height, width), include_top and not new_head)
    path = cache.resolve(weights, spec, cache=cache_dir, download=download)
    loaded = keras_h5.load_keras_h5(path)
    dont_load = [rf"params/{spec.classifier}/.*"] if new_head else []
    variables = merge.merge_variables(variables, loaded, dont_load=dont_load, source=str(path))
    log.info("loaded %s%s", path, " (new 'predictions' head, random init)" if new_head else "")
    return model, variables
