"""EfficientNetV2 B0-B3, S, M and L, ported layer for layer from ``keras.applications``.

"Keras-exact" (Tan & Le, 2021, as ``tf_keras.applications.efficientnet_v2`` builds it): the
block tables are Keras's ``DEFAULT_BLOCKS_ARGS`` scaled by its ``round_filters`` and
``round_repeats``; every submodule carries the Keras layer name (``stem_conv``,
``block2b_expand_conv``, ``block4a_dwconv2``, ``block4a_se_reduce``, ``top_conv``,
``predictions``); BatchNorm uses epsilon 1e-3 and momentum 0.9 (Keras's ``bn_momentum``;
Keras and Flax share the EMA convention); the activation is swish ``x * sigmoid(x)``; every
conv pads ``"same"`` (at stride 2 TensorFlow's ``"same"`` is ``lax``'s ``"SAME"``: the odd
pixel at the bottom right). Stochastic depth is Keras's per-example ``Dropout`` on the
residual branch, its rate growing linearly over the blocks; like the top's dropout it acts
only with ``train=True`` and a ``'dropout'`` rng.

Keras builds its input preprocessing into the model (``include_preprocessing=True``):
rescaling to [0, 1] and ImageNet mean/std normalisation for the B variants, ``x / 128 - 1``
for S/M/L. Here the module never normalises its input; the contract's ``preprocessing``
names the equivalent mode (``'torch'``, ``'tf128'``; ``flaxcnn.data.scale_images``), and the
layer list keeps Keras's weightless ``rescaling``/``normalization`` layers so that layer
indices stay Keras's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.models.backbone import Backbone, KerasLayer, check_stage_call
from flaxcnn.models.layers import (
    Conv2D,
    DepthwiseConv2D,
    PointwiseConv,
    conv_batch_norm,
    global_pool,
)
from flaxcnn.weights.registry import PretrainedSpec

MIN_INPUT_SIZE = 32  # Keras's obtain_input_shape(min_size=32)
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.9

# Keras's DEFAULT_BLOCKS_ARGS, one row per block group: (block type, kernel size, repeats,
# input filters, output filters, expansion ratio, squeeze-excite ratio, stride).
_B_BLOCKS = (
    ("fused", 3, 1, 32, 16, 1, 0.0, 1),
    ("fused", 3, 2, 16, 32, 4, 0.0, 2),
    ("fused", 3, 2, 32, 48, 4, 0.0, 2),
    ("mbconv", 3, 3, 48, 96, 4, 0.25, 2),
    ("mbconv", 3, 5, 96, 112, 6, 0.25, 1),
    ("mbconv", 3, 8, 112, 192, 6, 0.25, 2),
)  # fmt: skip
_S_BLOCKS = (
    ("fused", 3, 2, 24, 24, 1, 0.0, 1),
    ("fused", 3, 4, 24, 48, 4, 0.0, 2),
    ("fused", 3, 4, 48, 64, 4, 0.0, 2),
    ("mbconv", 3, 6, 64, 128, 4, 0.25, 2),
    ("mbconv", 3, 9, 128, 160, 6, 0.25, 1),
    ("mbconv", 3, 15, 160, 256, 6, 0.25, 2),
)  # fmt: skip
_M_BLOCKS = (
    ("fused", 3, 3, 24, 24, 1, 0.0, 1),
    ("fused", 3, 5, 24, 48, 4, 0.0, 2),
    ("fused", 3, 5, 48, 80, 4, 0.0, 2),
    ("mbconv", 3, 7, 80, 160, 4, 0.25, 2),
    ("mbconv", 3, 14, 160, 176, 6, 0.25, 1),
    ("mbconv", 3, 18, 176, 304, 6, 0.25, 2),
    ("mbconv", 3, 5, 304, 512, 6, 0.25, 1),
)  # fmt: skip
_L_BLOCKS = (
    ("fused", 3, 4, 32, 32, 1, 0.0, 1),
    ("fused", 3, 7, 32, 64, 4, 0.0, 2),
    ("fused", 3, 7, 64, 96, 4, 0.0, 2),
    ("mbconv", 3, 10, 96, 192, 4, 0.25, 2),
    ("mbconv", 3, 19, 192, 224, 6, 0.25, 1),
    ("mbconv", 3, 25, 224, 384, 6, 0.25, 2),
    ("mbconv", 3, 7, 384, 640, 6, 0.25, 1),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
    """One Keras application: its table and scaling, default size and published top-1."""

    keras_name: str
    blocks: tuple[tuple, ...]
    width: float
    depth: float
    default_size: int
    imagenet_top1: float

    @property
    def keras_model_name(self) -> str:  # "efficientnetv2-b0": Keras's file names
        return "efficientnetv2-" + self.keras_name.removeprefix("EfficientNetV2").lower()


# Top-1 as https://keras.io/api/applications/ publishes it (78.7% ... 85.7%).
VARIANTS = {
    "b0": Variant("EfficientNetV2B0", _B_BLOCKS, 1.0, 1.0, 224, 0.787),
    "b1": Variant("EfficientNetV2B1", _B_BLOCKS, 1.0, 1.1, 240, 0.798),
    "b2": Variant("EfficientNetV2B2", _B_BLOCKS, 1.1, 1.2, 260, 0.805),
    "b3": Variant("EfficientNetV2B3", _B_BLOCKS, 1.2, 1.4, 300, 0.820),
    "s": Variant("EfficientNetV2S", _S_BLOCKS, 1.0, 1.0, 384, 0.839),
    "m": Variant("EfficientNetV2M", _M_BLOCKS, 1.0, 1.0, 480, 0.853),
    "l": Variant("EfficientNetV2L", _L_BLOCKS, 1.0, 1.0, 480, 0.857),
}


def round_filters(filters: int, width: float, divisor: int = 8, min_depth: int = 8) -> int:
    """Keras's ``round_filters``: scale, then round to the nearest multiple of ``divisor``."""
    filters *= width
    return int(max(min_depth, int(filters + divisor / 2) // divisor * divisor))


def round_repeats(repeats: int, depth: float) -> int:
    """Keras's ``round_repeats``: scale the blocks of a group, rounding up."""
    return math.ceil(depth * repeats)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One (fused-)MBConv block as Keras builds it.

    ``depth_fraction`` is Keras's ``b / blocks``: the block's index over the *unrounded*
    repeat count of the table, so with ``depth > 1`` the last blocks exceed 1; the
    stochastic-depth rate is ``drop_connect_rate * depth_fraction``.
    """

    index: int
    prefix: str
    fused: bool
    kernel_size: int
    in_channels: int
    out_channels: int
    expand_ratio: int
    stride: int
    se_channels: int  # 0: no squeeze-excite
    depth_fraction: float

    @property
    def expanded_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@functools.cache
def block_specs(variant: str) -> tuple[BlockSpec, ...]:
    """Every block of a variant, in order, with the channels Keras computes."""
    config = VARIANTS[variant]
    total = float(sum(row[2] for row in config.blocks))
    specs = []
    for group, (kind, kernel, repeats, cin, cout, expand, se_ratio, stride) in enumerate(
        config.blocks
    ):
        cin, cout = round_filters(cin, config.width), round_filters(cout, config.width)
        for j in range(round_repeats(repeats, config.depth)):
            block_in = cin if j == 0 else cout
            specs.append(BlockSpec(
                index=len(specs), prefix=f"block{group + 1}{chr(ord('a') + j)}_",
                fused=kind == "fused", kernel_size=kernel, in_channels=block_in,
                out_channels=cout, expand_ratio=expand, stride=stride if j == 0 else 1,
                se_channels=max(1, int(block_in * se_ratio)) if 0 < se_ratio <= 1 else 0,
                depth_fraction=len(specs) / total,
            ))  # fmt: skip
    return tuple(specs)


def stem_channels(variant: str) -> int:
    return round_filters(VARIANTS[variant].blocks[0][3], VARIANTS[variant].width)


def top_channels(variant: str) -> int:
    return round_filters(1280, VARIANTS[variant].width)


def stage_names(variant: str) -> tuple[str, ...]:
    """``('stem', 'block1a', ..., 'top')``: stage 0 the stem, one per block, the top last."""
    return ("stem", *(s.prefix.rstrip("_") for s in block_specs(variant)), "top")


STAGE_NAMES = {variant: stage_names(variant) for variant in VARIANTS}


def _block_layers(spec: BlockSpec) -> list[tuple[str, bool]]:
    """A block's Keras layers (name suffix, has weights), in Keras's order."""
    expand = spec.expand_ratio != 1
    names = []
    if expand:
        names += [("expand_conv", True), ("expand_bn", True), ("expand_activation", False)]
    if not spec.fused:
        names += [("dwconv2", True), ("bn", True), ("activation", False)]
    if spec.se_channels:
        names += [("se_squeeze", False), ("se_reshape", False), ("se_reduce", True),
                  ("se_expand", True), ("se_excite", False)]  # fmt: skip
    names += [("project_conv", True), ("project_bn", True)]
    if spec.fused and not expand:
        names.append(("project_activation", False))
    if spec.has_residual:
        # Keras adds the Dropout layer only for a non-zero rate: not in the first block.
        names += [("drop", False)] * (spec.index > 0) + [("add", False)]
    return names


@functools.cache
def keras_layers(include_top: bool = False, variant: str = "b0") -> tuple[KerasLayer, ...]:
    """``keras.applications.EfficientNetV2*(...).layers`` in order, weightless ones included.

    As Keras builds it by default (``include_preprocessing=True``), so index ``i`` is Keras
    layer ``i``: the input, the weightless preprocessing layers (``rescaling`` and, for the
    B variants, ``normalization``) and the stem are stage 0, block ``i`` stage ``i + 1``,
    ``top_conv`` and after the last stage. Pooling layers without the top are not listed.
    """
    specs = block_specs(variant)
    preprocessing = ["rescaling"] + ["normalization"] * variant.startswith("b")
    layers = [KerasLayer(n, 0, False) for n in ("input_1", *preprocessing)]
    layers += [KerasLayer(n, 0, w) for n, w in (("stem_conv", True), ("stem_bn", True),
                                                ("stem_activation", False))]  # fmt: skip
    for spec in specs:
        layers += [KerasLayer(spec.prefix + n, spec.index + 1, w) for n, w in _block_layers(spec)]
    top = [("top_conv", True), ("top_bn", True), ("top_activation", False)]
    if include_top:
        top += [("avg_pool", False), ("top_dropout", False), ("predictions", True)]
    layers += [KerasLayer(n, len(specs) + 1, w) for n, w in top]
    return tuple(layers)


def swish(x: jax.Array) -> jax.Array:
    """Keras's ``activations.swish`` (``tf.nn.silu``)."""
    return x * jax.nn.sigmoid(x)


class EfficientNetV2(nn.Module):
    """EfficientNetV2 (Keras layout and names), NHWC input preprocessed as the variant's
    ``preprocessing`` mode says, logits out.

    Attributes:
      variant: ``'b0'`` ... ``'b3'``, ``'s'``, ``'m'``, ``'l'`` (see ``VARIANTS``).
      include_top: add average pooling, dropout and the ``predictions`` dense layer.
      num_classes: classes of the top (1000 for ImageNet).
      pooling: without the top: ``None`` (feature map), ``'avg'`` or ``'max'`` (vectors).
      dropout_rate: dropout before ``predictions`` (Keras's 0.2), only with ``train=True``.
      drop_connect_rate: stochastic depth of the last block listed in the table (Keras's
        0.2), only with ``train=True``.
      conv_impl: conv formulation, see ``flaxcnn.models.layers``; never changes results.
      fold_batch_norm: with running averages, fold each BatchNorm into the conv before it
        (same variables, equal outputs up to float rounding, one pass fewer).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params and BN statistics stay float32.
    """

    variant: str = "b0"
    include_top: bool = True
    num_classes: int = 1000
    pooling: str | None = None
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    conv_impl: str = "auto"
    fold_batch_norm: bool = True
    dtype: Any = jnp.float32

    def _conv_bn(self, conv: nn.Module, bn_name: str, x: jax.Array, train: bool) -> jax.Array:
        return conv_batch_norm(
            conv, x, name=bn_name, train=train, fold=self.fold_batch_norm, epsilon=BN_EPSILON,
            momentum=BN_MOMENTUM, dtype=self.dtype,
        )  # fmt: skip

    def _conv(self, features: int, kernel_size: int, stride: int, name: str) -> nn.Module:
        if kernel_size == 1 and stride == 1:
            return PointwiseConv(features, conv_impl=self.conv_impl, dtype=self.dtype, name=name)
        return Conv2D(
            features, (kernel_size, kernel_size), strides=(stride, stride), padding="SAME",
            conv_impl=self.conv_impl, dtype=self.dtype, name=name,
        )  # fmt: skip

    def _squeeze_excite(self, spec: BlockSpec, x: jax.Array) -> jax.Array:
        """Keras's ``se_squeeze`` (global mean), ``se_reduce``/``se_expand`` (1x1 convs with
        bias, swish then sigmoid) and ``se_excite`` (the channel-wise product)."""
        pointwise = functools.partial(PointwiseConv, use_bias=True, conv_impl=self.conv_impl,
                                      dtype=self.dtype)  # fmt: skip
        se = jnp.mean(x, axis=(1, 2), keepdims=True)
        se = swish(pointwise(spec.se_channels, name=spec.prefix + "se_reduce")(se))
        se = jax.nn.sigmoid(pointwise(x.shape[-1], name=spec.prefix + "se_expand")(se))
        return x * se

    def _block(self, spec: BlockSpec, x: jax.Array, train: bool) -> jax.Array:
        """A fused-MBConv (3x3 expansion conv) or MBConv (1x1 expansion, depthwise) block."""
        p, k, inputs = spec.prefix, spec.kernel_size, x
        if spec.expand_ratio != 1:
            expand = self._conv(spec.expanded_channels, k if spec.fused else 1,
                                spec.stride if spec.fused else 1, p + "expand_conv")  # fmt: skip
            x = swish(self._conv_bn(expand, p + "expand_bn", x, train))
        if not spec.fused:
            depthwise = DepthwiseConv2D((k, k), strides=(spec.stride, spec.stride),
                                        padding="SAME", conv_impl=self.conv_impl,
                                        dtype=self.dtype, name=p + "dwconv2")  # fmt: skip
            x = swish(self._conv_bn(depthwise, p + "bn", x, train))
        if spec.se_channels:
            x = self._squeeze_excite(spec, x)
        # A fused block without expansion is one k x k conv (stride included) and swish.
        single = spec.fused and spec.expand_ratio == 1
        project = self._conv(spec.out_channels, k if single else 1,
                             spec.stride if single else 1, p + "project_conv")  # fmt: skip
        x = self._conv_bn(project, p + "project_bn", x, train)
        if single:
            x = swish(x)
        if spec.has_residual:
            rate = self.drop_connect_rate * spec.depth_fraction
            # Keras's Dropout(rate, noise_shape=(None, 1, 1, 1)): a whole example's branch.
            drop = nn.Dropout(rate, broadcast_dims=(1, 2, 3), name=p + "drop")
            x = drop(x, deterministic=not train) + inputs
        return x

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, start: int = 0, stop: int | None = None
    ) -> jax.Array:
        """Runs the network, or the stages ``[start, stop)`` of it (see :func:`keras_layers`).

        Args:
          x: images ``[N, H, W, 3]``, ``H, W >= 32``, preprocessed (``'torch'`` for B0-B3,
            ``'tf128'`` for S/M/L); with ``start > 0`` the activation entering that stage.
          train: BatchNorm on batch statistics (pass ``mutable=['batch_stats']``); stochastic
            depth and the top's dropout active (pass ``rngs={'dropout': key}``).
          start: first stage to run.
          stop: stage to stop before (default: all, ``len(stage_names(variant))``); below
            that it returns the activation entering stage ``stop``.

        Returns:
          Logits ``[N, num_classes]`` with the top, else the feature map ``[N, h, w, C]`` or,
          with pooling, features ``[N, C]``; with an earlier ``stop`` the activation.
        """
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; expected one of {', '.join(VARIANTS)}")
        specs = block_specs(self.variant)
        num_stages = len(specs) + 2
        stop = num_stages if stop is None else stop
        name = VARIANTS[self.variant].keras_name
        check_stage_call(name, x, start, stop, num_stages, MIN_INPUT_SIZE)
        runs = lambda stage: start <= stage < stop

        if runs(0):
            stem = self._conv(stem_channels(self.variant), 3, 2, "stem_conv")
            x = swish(self._conv_bn(stem, "stem_bn", x, train))
        for spec in specs:
            if runs(spec.index + 1):
                x = self._block(spec, x, train)
        if not runs(num_stages - 1):
            return x

        top = self._conv(top_channels(self.variant), 1, 1, "top_conv")
        x = swish(self._conv_bn(top, "top_bn", x, train))
        if self.include_top:
            x = jnp.mean(x, axis=(1, 2))
            x = nn.Dropout(self.dropout_rate, name="top_dropout")(x, deterministic=not train)
            return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
        return global_pool(x, self.pooling)


# The published files (``BASE_WEIGHTS_PATH``, ``WEIGHTS_HASHES`` of Keras's
# efficientnet_v2.py): Google's official EfficientNetV2 ImageNet-1k checkpoints converted by
# the Keras team, one with and one without the top per variant, at Keras's ``default_size``.
# The hashes are MD5 (32 digits; keras.utils.get_file tells them apart by length).
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/"
WEIGHTS_HASHES = {  # variant: (with top, without top)
    "b0": ("21ecbf6da12460d5c40bb2f29ceb2188", "893217f2bb855e2983157299931e43ff"),
    "b1": ("069f0534ff22adf035c89e2d9547a9dc", "0e80663031ca32d657f9caa404b6ec37"),
    "b2": ("424e49f28180edbde1e94797771950a7", "1dfe2e7a5d45b6632553a8961ea609eb"),
    "b3": ("1f1fc43bd98a6e4fd8fdfd551e02c7a0", "f6abf7b5849ac99a89b50dd3fd532856"),
    "s": ("e1d88a8495beba45748fedd0cecbe016", "af0682fb74e8c54910f2d4393339c070"),
    "m": ("a3bf6aa3276309f4fc6a34aa114c95cd", "1b8dc055df72dde80d614482840fe342"),
    "l": ("27e6d408b53c7ebc868fefa357689935", "b0b66b5c863aef5b46e8608fe1711615"),
}
WEIGHTS = tuple(
    PretrainedSpec(
        model=f"efficientnet_v2_{variant}",
        url=f"{BASE_URL}{config.keras_model_name}{'.h5' if include_top else '_notop.h5'}",
        input_size=config.default_size,
        include_top=include_top,
        file_hash=WEIGHTS_HASHES[variant][0 if include_top else 1],
    )
    for variant, config in VARIANTS.items()
    for include_top in (True, False)
)

# Fine-tuning starts at the last block group: the stride-32 group of B0-B3 and S (block6),
# and the group after it in M and L (block7), as Keras's EfficientNet fine-tuning example
# unfreezes the top blocks and timm fine-tunes the last stage; the ~first 80% of the blocks
# keep their ImageNet features.
_FINE_TUNE_AT = {"b0": "block6a", "b1": "block6a", "b2": "block6a", "b3": "block6a",
                 "s": "block6a", "m": "block7a", "l": "block7a"}  # fmt: skip

BACKBONES = tuple(
    Backbone(
        name=f"efficientnet_v2_{variant}",
        keras_name=config.keras_name,
        module=functools.partial(EfficientNetV2, variant=variant),
        layers=functools.partial(keras_layers, variant=variant),
        stage_names=STAGE_NAMES[variant],
        # Keras's built-in preprocessing: Rescaling(1/255) + ImageNet Normalization for the B
        # variants, Rescaling(1/128, offset=-1) for S/M/L.
        preprocessing="torch" if variant.startswith("b") else "tf128",
        default_input_size=config.default_size,
        default_fine_tune_at=_FINE_TUNE_AT[variant],
        running_statistics=True,
        weights=tuple(spec for spec in WEIGHTS if spec.model == f"efficientnet_v2_{variant}"),
        min_input_size=MIN_INPUT_SIZE,
        imagenet_top1=config.imagenet_top1,
    )
    for variant, config in VARIANTS.items()
)
