"""Model definitions (pure ``flax.linen`` modules) and the one registry that builds them.

A model is described by a JSON-able dict, its *model config*, which checkpoints store so that
``flaxcnn.checkpoints.restore`` can rebuild the module with nothing else::

    {"arch": "mobilenet_v2", "alpha": 1.0, "include_top": True, "num_classes": 1000, ...}
    {"arch": "simple_cnn", "num_classes": 10, "features": [16, 32], ...}
    {"arch": "transfer", "backbone": {...}, "num_classes": 2, "dropout_rate": 0.2, ...}

Run-time choices that do not change the variables (``dtype``, ``conv_impl``) are arguments of
:func:`build_model`, not part of the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.models.layers import CONV_IMPLS, DepthwiseConv2D, PointwiseConv
from flaxcnn.models.mobilenet_v2 import ALPHAS, MobileNetV2, keras_layer_names
from flaxcnn.models.simple_cnn import SimpleCNN
from flaxcnn.models.transfer import TransferClassifier

ARCHITECTURES = ("mobilenet_v2", "simple_cnn", "transfer")


def build_model(
    model_config: Mapping[str, Any], *, dtype: Any = jnp.float32, conv_impl: str = "auto"
) -> nn.Module:
    """Builds the module a model config describes.

    Args:
      model_config: dict with ``arch`` in ``ARCHITECTURES`` and that module's fields.
      dtype: computation dtype (params stay float32).
      conv_impl: MobileNetV2 convolution formulation (see ``flaxcnn.models.layers``).

    Returns:
      An unbound module.
    """
    fields = dict(model_config)
    arch = fields.pop("arch", None)
    if arch == "mobilenet_v2":
        return MobileNetV2(**fields, dtype=dtype, conv_impl=conv_impl)
    if arch == "simple_cnn":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return SimpleCNN(**fields, dtype=dtype)
    if arch == "transfer":
        backbone = build_model(fields.pop("backbone"), dtype=dtype, conv_impl=conv_impl)
        return TransferClassifier(backbone=backbone, **fields, dtype=dtype)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


__all__ = [
    "ALPHAS",
    "ARCHITECTURES",
    "CONV_IMPLS",
    "DepthwiseConv2D",
    "MobileNetV2",
    "PointwiseConv",
    "SimpleCNN",
    "TransferClassifier",
    "build_model",
    "keras_layer_names",
]
