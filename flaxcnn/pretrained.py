"""One call from a model name to a ready model: ``(module, variables)``.

    model, variables = flaxcnn.pretrained.create("resnet50", pooling="avg")   # features
    model, variables = flaxcnn.pretrained.create("resnet50", num_classes=5)   # new 5-way head
    images = flaxcnn.data.load_images(paths, 224, flaxcnn.pretrained.preprocessing("resnet50"))

Weights load strictly and by name; only layers the caller asked to replace (a new head) keep
their random initialisation, which equals that of the whole model's ``init`` with the same key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from flaxcnn import compiler
from flaxcnn.models import (
    BACKBONES,
    Backbone,
    TransferClassifier,
    get_backbone,
)
from flaxcnn.weights import cache, keras_h5, merge
from flaxcnn.weights.errors import WeightsError

log = logging.getLogger(__name__)
Weights = str | os.PathLike | None
REGISTERED_FILES = tuple(spec for backbone in BACKBONES.values() for spec in backbone.weights)


def preprocessing(name: str) -> str:
    """The input mode a registered model's weights expect (``flaxcnn.data.load_images``'s)."""
    return get_backbone(name).preprocessing


def _size_hw(backbone: Backbone, input_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if input_size is None:
        input_size = backbone.default_input_size
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    if min(height, width) < backbone.min_input_size:
        raise ValueError(
            f"input_size {input_size} is too small; {backbone.keras_name} needs >= "
            f"{backbone.min_input_size} (--image-size on the command line)"
        )
    return int(height), int(width)


def init_subset(model: nn.Module, rng: jax.Array, hw: tuple[int, int], keep) -> dict[str, Any]:
    """The leaves of ``model.init(rng, ...)`` whose ``/``-joined path satisfies ``keep``.

    Only those are computed: XLA drops the other initialisers and the forward pass, so a new
    head costs a second, not the ~10 s of compiling the whole initialiser; the values equal
    the whole ``init``'s (Flax derives each module's key from its path).
    """

    def picked():
        variables = model.init(rng, jnp.zeros((1, *hw, 3)))
        flat = traverse_util.flatten_dict(variables)
        return traverse_util.unflatten_dict(
            {k: v for k, v in flat.items() if keep("/".join(k))}
        )

    return jax.tree.map(np.asarray, compiler.jit(picked)())


def _new_head_needs_top_file(backbone: Backbone, options: Mapping[str, Any]) -> bool:
    """Whether a new classifier keeps top layers that only the with-top file holds."""
    with_top = {layer.name for layer in backbone.layers(True, **options) if layer.weighted}
    no_top = {layer.name for layer in backbone.layers(False, **options) if layer.weighted}
    return bool(with_top - no_top - set(backbone.classifier))


def create(
    name: str,
    *,
    weights: Weights = "imagenet",
    input_size: int | tuple[int, int] | None = None,
    include_top: bool = False,
    pooling: str | None = None,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    dtype: Any = jnp.float32,
    conv_impl: str = "auto",
    rng: jax.Array | None = None,
    **family_options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds a registered model and its variables, loading weights strictly.

    Args:
      name: a registered model (``flaxcnn.models.list_models()``) or Keras's name for it.
      weights: ``'imagenet'`` (``$FLAXCNN_WEIGHTS``, the cache, then Keras's URL), a path to
        a Keras ``.h5`` file, or ``None`` (random initialisation).
      input_size: input height/width (int or ``(h, w)``; default: the size the weights were
        trained at); any size from the model's minimum loads, weights come from the nearest
        published resolution.
      include_top: keep the ImageNet top. With ``num_classes`` other than 1000 its classifier
        is replaced by a new, randomly initialised one.
      pooling: without the top: ``None`` (feature map), ``'avg'`` or ``'max'`` (vectors).
      num_classes: with ``include_top=False``, a new ``num_classes``-way head on the pooled
        backbone (a :class:`~flaxcnn.models.TransferClassifier`, as timm's
        ``create_model(name, num_classes=K)``); ``None``: the backbone alone.
      cache_dir: weights cache (default ``$FLAXCNN_CACHE`` or ``~/.cache/flaxcnn``).
      download: allow downloading ``'imagenet'`` weights.
      dtype: computation dtype (parameters stay float32).
      conv_impl: convolution formulation (results do not depend on it).
      rng: init key for random layers (default ``PRNGKey(0)``).
      **family_options: the family's options (``alpha=0.5``, ``minimalistic=True``, ...).

    Returns:
      ``(model, {'params': ..., 'batch_stats'?: ...})``.

    Raises:
      UnknownModelError: ``name`` is not registered.
      ValueError: an option or size the model does not support.
      WeightsError: the file is missing or corrupt, or holds another model (named).
    """
    backbone = get_backbone(name)
    options = backbone.check_options(family_options)
    hw = _size_hw(backbone, input_size)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    transfer = not include_top and num_classes is not None
    top_classes = 1000 if num_classes is None or transfer else num_classes
    module = backbone.build(include_top=include_top, num_classes=top_classes,
                            pooling="avg" if transfer else pooling, dtype=dtype,
                            conv_impl=conv_impl, **options)  # fmt: skip
    model = TransferClassifier(module, num_classes, dtype=dtype) if transfer else module
    new_head = transfer or (include_top and top_classes != 1000)
    if weights is None:
        variables = compiler.jit(model.init)(rng, jnp.zeros((1, *hw, 3)))
        return model, jax.tree.map(np.asarray, variables)

    abstract = jax.eval_shape(module.init, rng, jnp.zeros((1, *hw, 3)))
    file_top = include_top and (not new_head or _new_head_needs_top_file(backbone, options))
    source = _weights_path(backbone, options, weights, hw, file_top, cache_dir, download)
    loaded = keras_h5.load_keras_h5(source)
    classifier = "|".join(backbone.classifier)
    dont_load = [rf"(params|batch_stats)/({classifier})/.*"] if new_head and include_top else []
    try:
        backbone_vars = merge.merge_variables(
            abstract, _without_other_top(loaded, backbone, options, include_top),
            dont_load=dont_load, source=str(source))  # fmt: skip
    except WeightsError as error:
        raise WeightsError(_wrong_file_message(source, loaded, backbone, options, error)) from None
    if new_head:
        head_path = (lambda p: p.startswith("params/head/")) if transfer else (
            lambda p: any(p.split("/")[1] == c for c in backbone.classifier))  # fmt: skip
        fresh = init_subset(model, rng, (backbone.min_input_size,) * 2, head_path)
        backbone_vars = _with_new_head(backbone_vars, fresh, transfer)
    log.info("loaded %s%s", source, " (new head, random init)" if new_head else "")
    return model, backbone_vars


def _weights_path(backbone, options, weights, hw, include_top, cache_dir, download):
    if not isinstance(weights, str | os.PathLike):
        raise TypeError(f"weights={weights!r}; pass 'imagenet', a .h5 path or None")
    if os.fspath(weights) != "imagenet":
        return cache.resolve(weights, None)
    try:
        spec = backbone.find_weights(hw, include_top, **options)
    except ValueError as e:
        raise WeightsError(f"{e}; or pass weights=None or a Keras .h5 path (--weights none or "
                           "--weights PATH on the command line)") from None  # fmt: skip
    return cache.resolve("imagenet", spec, cache=cache_dir, download=download,
                         registered=REGISTERED_FILES)  # fmt: skip


def _without_other_top(loaded, backbone: Backbone, options, include_top: bool):
    """A model without the top takes a with-top file too: the top's layers are left out
    (asking for no top asks to leave them out)."""
    if include_top:
        return loaded
    no_top = {layer.name for layer in backbone.layers(False, **options)}
    return {collection: {k: v for k, v in layers.items() if k in no_top}
            for collection, layers in loaded.items()}  # fmt: skip


def _with_new_head(variables, fresh, transfer: bool) -> dict[str, Any]:
    if not transfer:
        merged = traverse_util.flatten_dict(variables)
        merged.update(traverse_util.flatten_dict(fresh))
        return traverse_util.unflatten_dict(merged)
    out = {"params": {**fresh["params"], "backbone": variables["params"]}}
    if "batch_stats" in variables:
        out["batch_stats"] = {"backbone": variables["batch_stats"]}
    return out


def identify(loaded: Mapping[str, Any]) -> tuple[Backbone, bool] | None:
    """The registered model whose Keras layer names a converted file's layers are, and
    whether it holds the top; ``None`` when no model's names cover the file's."""
    names = set(loaded.get("params", {})) | set(loaded.get("batch_stats", {}))
    best, best_score = None, 0.0
    for backbone in BACKBONES.values():
        for include_top in (False, True):
            expected = {layer.name for layer in backbone.layers(include_top) if layer.weighted}
            score = len(names & expected) / max(len(names | expected), 1)
            if score > best_score:
                best, best_score = (backbone, include_top), score
    return best if best_score >= 0.5 else None


def _wrong_file_message(source, loaded, backbone: Backbone, options, error: WeightsError) -> str:
    """The merge's error, or what the file holds when it is another model's."""
    found = identify(loaded)
    wanted = backbone.describe(options)
    if found is None:
        return f"{source} holds no registered model's Keras layers; expected {wanted}: {error}"
    other, _ = found
    if other.name != backbone.name:
        return (f"{source} holds {other.keras_name} weights, not {wanted}; pass a "
                f"{backbone.keras_name} file, or model {other.name!r} for this one (--model "
                f"{other.name} on the command line)")  # fmt: skip
    for candidate in _option_grid(backbone):
        if candidate == options:
            continue
        try:
            module = backbone.build(**candidate)
            shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                    jnp.zeros((1, *(backbone.min_input_size,) * 2, 3)))  # fmt: skip
            merge.merge_variables(shapes, _without_other_top(loaded, backbone, candidate, False),
                                  source=str(source))  # fmt: skip
        except (WeightsError, ValueError):
            continue
        return (f"{source} holds {backbone.describe(candidate)} weights, not {wanted}; pass "
                f"the matching options ({_as_arguments(candidate)}; {_as_flags(candidate)} on "
                "the command line) or another file")  # fmt: skip
    return str(error)


def _as_arguments(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


def _as_flags(options: Mapping[str, Any]) -> str:
    """Family options as the CLI spells them (``cli.add_model_flags``)."""
    flag = lambda key: "--" + key.replace("_", "-")
    return " ".join(
        (flag(key) if value else "--no-" + flag(key)[2:]) if isinstance(value, bool)
        else f"{flag(key)} {value}" for key, value in options.items()
    )  # fmt: skip


def _option_grid(backbone: Backbone) -> list[dict[str, Any]]:
    grids = [{}]
    for key, allowed in backbone.options.items():
        grids = [{**g, key: value} for g in grids for value in allowed]
    return grids


def mobilenet_v2(
    alpha: float = 1.0,
    input_size: int | tuple[int, int] = 224,
    include_top: bool = True,
    *,
    num_classes: int = 1000,
    pooling: str | None = None,
    weights: Weights = "imagenet",
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """``create("mobilenet_v2", ...)`` with Keras's ``MobileNetV2(...)`` argument order."""
    return create("mobilenet_v2", alpha=alpha, input_size=input_size, include_top=include_top,
                  num_classes=num_classes if include_top else None, pooling=pooling,
                  weights=weights, **kwargs)  # fmt: skip
