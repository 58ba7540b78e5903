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

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxcnn.models.layers import CONV_IMPLS, DepthwiseConv2D, PointwiseConv
from flaxcnn.models.mobilenet_v2 import (
    ALPHAS,
    NUM_STAGES,
    MobileNetV2,
    keras_layer_names,
    stage_of_layer,
)
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


def random_variables(model: nn.Module, input_shape: Sequence[int], *, seed: int = 0) -> Any:
    """Variables shaped like ``model.init``'s, drawn with numpy: nothing is compiled.

    For benchmarks and tests, where compiling ``init`` (a random initialiser per leaf, ~10 s
    for MobileNetV2 on a 2-core CPU) costs more than the work they measure. Realistic
    magnitudes, not a trained model's: fan-in scaled normal kernels, BatchNorm scales and
    variances uniform in [0.5, 1.5], small normal biases and means.

    Args:
      model: an unbound module.
      input_shape: the input's shape, batch axis included (e.g. ``(1, 160, 160, 3)``).
      seed: numpy seed.

    Returns:
      The variables as numpy arrays (host copies: safe to pass to steps that donate).
    """
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']") or name.endswith("['scale']"):
            value = rng.uniform(0.5, 1.5, spec.shape)
        elif name.endswith("['mean']") or name.endswith("['bias']"):
            value = rng.normal(0.0, 0.1, spec.shape)
        else:  # kernels
            fan_in = int(np.prod(spec.shape[:-1])) if len(spec.shape) > 1 else 1
            fan_in = int(np.prod(spec.shape[:2])) if "depthwise" in name else fan_in
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), spec.shape)
        return np.asarray(value, spec.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


__all__ = [
    "ALPHAS",
    "ARCHITECTURES",
    "CONV_IMPLS",
    "NUM_STAGES",
    "DepthwiseConv2D",
    "MobileNetV2",
    "PointwiseConv",
    "SimpleCNN",
    "TransferClassifier",
    "build_model",
    "keras_layer_names",
    "random_variables",
    "stage_of_layer",
]
