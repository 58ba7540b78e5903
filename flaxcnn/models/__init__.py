"""Model definitions (pure ``flax.linen`` modules) and the one registry of backbones.

Every pretrained family is a module under ``flaxcnn/models/`` that exports ``BACKBONES``, one
:class:`~flaxcnn.models.backbone.Backbone` contract per variant; adding a family is one module
plus one entry in ``FAMILIES`` below. A model is described by a JSON-able dict, its *model
config*, which checkpoints store so that ``flaxcnn.checkpoints.restore`` can rebuild the
module with nothing else::

    {"arch": "mobilenet_v2", "alpha": 1.0, "include_top": True, "num_classes": 1000, ...}
    {"arch": "simple_cnn", "num_classes": 10, "features": [16, 32], ...}
    {"arch": "transfer", "backbone": {...}, "num_classes": 2, "dropout_rate": 0.2, ...}

Run-time choices that do not change the variables (``dtype``, ``conv_impl``) are arguments of
:func:`build_model`, not part of the config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxcnn.models import convnext, efficientnet_v2, mobilenet_v2, mobilenet_v3, resnet
from flaxcnn.models.backbone import Backbone, KerasLayer
from flaxcnn.models.layers import CONV_IMPLS
from flaxcnn.models.simple_cnn import SimpleCNN
from flaxcnn.models.transfer import TransferClassifier

FAMILIES = (mobilenet_v2, mobilenet_v3, efficientnet_v2, resnet, convnext)
BACKBONES: dict[str, Backbone] = {b.name: b for family in FAMILIES for b in family.BACKBONES}
DEFAULT_MODEL = "mobilenet_v2"  # the transfer CLI's and bench's default
# Models trained from scratch by their own recipe (one phase, everything trainable).
SCRATCH_MODELS = ("simple_cnn",)


class UnknownModelError(ValueError):
    """A model name that is not registered; the message lists the registered names."""


def list_models() -> list[str]:
    """The registered backbones' names, in snake_case (``['mobilenet_v2', 'resnet50', ...]``)."""
    return list(BACKBONES)


def _canonical(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_ANY_NAME = {
    _canonical(alias): b.name for b in BACKBONES.values() for alias in (b.name, b.keras_name)
}


def get_backbone(name: str) -> Backbone:
    """The contract of a registered model, by its name or Keras's (``'ResNet50V2'``).

    Raises:
      UnknownModelError: the name is not registered; the message lists those that are.
    """
    registered = _BY_ANY_NAME.get(_canonical(str(name)))
    if registered is None:
        raise UnknownModelError(
            f"unknown model {name!r}; registered: {', '.join(list_models())}"
        )
    return BACKBONES[registered]


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a registered pretrained backbone (not a from-scratch model)."""
    return _canonical(str(name)) in _BY_ANY_NAME


def build_model(
    model_config: Mapping[str, Any], *, dtype: Any = jnp.float32, conv_impl: str = "auto"
) -> nn.Module:
    """Builds the module a model config describes.

    Args:
      model_config: dict with ``arch`` (a registered backbone, ``'simple_cnn'`` or
        ``'transfer'``) and that module's fields.
      dtype: computation dtype (params stay float32).
      conv_impl: convolution formulation (see ``flaxcnn.models.layers``).

    Returns:
      An unbound module.
    """
    fields = dict(model_config)
    arch = fields.pop("arch", None)
    if arch == "simple_cnn":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return SimpleCNN(**fields, dtype=dtype)
    if arch == "transfer":
        backbone = build_model(fields.pop("backbone"), dtype=dtype, conv_impl=conv_impl)
        return TransferClassifier(backbone=backbone, **fields, dtype=dtype)
    return get_backbone(arch).build(**fields, dtype=dtype, conv_impl=conv_impl)


def backbone_of(model_config: Mapping[str, Any]) -> tuple[Backbone, dict[str, Any]] | None:
    """The backbone contract and its options inside a model config (``None``: none)."""
    config = model_config.get("backbone", model_config)
    if not is_backbone(config.get("arch", "")):
        return None
    backbone = get_backbone(config["arch"])
    return backbone, {k: config[k] for k in backbone.options if k in config}


def random_variables(model: nn.Module, input_shape: Sequence[int], *, seed: int = 0) -> Any:
    """Variables shaped like ``model.init``'s, drawn with numpy: nothing is compiled.

    For benchmarks and tests, where compiling ``init`` (a random initialiser per leaf, ~10 s
    for MobileNetV2 on a 2-core CPU) costs more than the work they measure. Realistic
    magnitudes, not a trained model's: fan-in scaled normal kernels, norm scales and
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
        else:  # kernels (a depthwise kernel (kh, kw, 1, C) has fan-in kh * kw)
            fan_in = int(np.prod(spec.shape[:-1])) if len(spec.shape) > 1 else 1
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), spec.shape)
        return np.asarray(value, spec.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


__all__ = [
    "BACKBONES",
    "CONV_IMPLS",
    "DEFAULT_MODEL",
    "SCRATCH_MODELS",
    "Backbone",
    "KerasLayer",
    "SimpleCNN",
    "TransferClassifier",
    "UnknownModelError",
    "backbone_of",
    "build_model",
    "get_backbone",
    "is_backbone",
    "list_models",
    "random_variables",
]
