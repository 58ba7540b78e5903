"""ConvNeXt (Liu et al., 2022), ported layer for layer from ``keras.applications.convnext``.

"Keras-exact" is a contract on names and constants: every weighted submodule carries the Keras
layer name (``convnext_tiny_stem``, ``convnext_tiny_stage_2_block_4_depthwise_conv``,
``convnext_tiny_downsampling_block_1``, ``convnext_tiny_head_dense``), LayerNorm uses Keras's
epsilon 1e-6 (two-pass variance, as ``tf.nn.moments``), GELU is the exact erf form (Keras's
``'gelu'``; Flax's default is the tanh approximation), LayerScale starts at 1e-6, and the
patchify convs (4x4/4 stem, 2x2/2 downsampling) are VALID, as Keras's default padding.

Keras builds the stem and each downsampling layer as a nested ``Sequential``; here each is a
submodule of the same name holding its two inner layers, which is how the legacy ``.h5``
stores them (see ``flaxcnn.weights.keras_h5``). Keras's ``Dense`` layers on the NHWC map (the
pointwise convs) keep Dense's ``(Cin, Cout)`` kernel, run as 1x1 convs by
``flaxcnn.models.layers.pointwise_conv``.

Without the top Keras pools (``pooling``) and then applies a LayerNormalization it does not
name, so its name carries a per-session counter (``layer_normalization_3``); flaxcnn calls it
``layer_normalization`` and the h5 reader drops the counter. Keras's model also starts with a
``Normalization`` layer (ImageNet mean and std on [0, 255] pixels, no weights in the file);
here that is the ``'torch'`` preprocessing mode, applied outside the module. The module never
touches files; pretrained variables come from :mod:`flaxcnn.pretrained`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxcnn.models.backbone import Backbone, KerasLayer, check_stage_call
from flaxcnn.models.layers import (
    Conv2D,
    DepthwiseConv2D,
    global_pool,
    pointwise_conv,
)
from flaxcnn.weights.registry import PretrainedSpec

MIN_INPUT_SIZE = 32  # Keras's ``min_size``: the 1/32 stage keeps at least one pixel
LAYER_NORM_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6
# Blocks per resolution stage and their channels, as Keras's ``MODEL_CONFIGS``.
MODEL_CONFIGS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
# A block's Keras layers after its prefix, in order: (suffix, has weights). The stochastic
# depth layer (``_identity`` at rate 0) and the residual add follow.
BLOCK_LAYERS = (("_depthwise_conv", True), ("_layernorm", True), ("_pointwise_conv_1", True),
                ("_gelu", False), ("_pointwise_conv_2", True), ("_layer_scale", True))  # fmt: skip
HEAD_LAYERS = (("_head_gap", False), ("_head_layernorm", True), ("_head_dense", True))
NO_TOP_NORM = "layer_normalization"  # Keras's automatic name, without its session counter
POOLING_LAYERS = {None: (), "avg": ("global_average_pooling2d",), "max": ("global_max_pooling2d",)}


def model_name(variant: str) -> str:
    """Keras's ``model_name``, the prefix of every layer: ``'convnext_tiny'``."""
    if variant not in MODEL_CONFIGS:
        raise ValueError(f"unknown ConvNeXt variant {variant!r}; known: {', '.join(MODEL_CONFIGS)}")
    return f"convnext_{variant}"


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One ConvNeXt block: its Keras prefix, channels, and the downsampling layer before it."""

    position: int  # over all blocks: stage ``position + 1``, the stochastic-depth schedule
    prefix: str  # 'convnext_tiny_stage_2_block_0'
    channels: int
    downsampling: str | None  # 'convnext_tiny_downsampling_block_1' before stage 2's block 0


@functools.cache
def block_specs(variant: str) -> tuple[BlockSpec, ...]:
    name, (depths, dims) = model_name(variant), MODEL_CONFIGS[variant]
    specs = []
    for stage, (depth, channels) in enumerate(zip(depths, dims, strict=True)):
        for j in range(depth):
            specs.append(BlockSpec(
                position=len(specs), prefix=f"{name}_stage_{stage}_block_{j}", channels=channels,
                downsampling=f"{name}_downsampling_block_{stage - 1}" if stage and not j else None,
            ))  # fmt: skip
    return tuple(specs)


def num_stages(variant: str) -> int:
    """The stem, one stage per block, the top: 20 (tiny), 38 (the others)."""
    return len(block_specs(variant)) + 2


def stage_names(variant: str) -> tuple[str, ...]:
    """Stem, block prefixes, and the top as the no-top model names it (its final LayerNorm),
    so that every name is a ``--fine-tune-at`` the backbone resolves."""
    return (f"{model_name(variant)}_stem", *(s.prefix for s in block_specs(variant)), NO_TOP_NORM)


def drop_path_rates(variant: str, drop_path_rate: float) -> tuple[float, ...]:
    """Per block, rising linearly from 0 to ``drop_path_rate`` (Keras's and the paper's)."""
    return tuple(float(r) for r in np.linspace(0.0, drop_path_rate, len(block_specs(variant))))


@functools.cache
def keras_layers(
    include_top: bool = False, *, variant: str = "tiny", pooling: str | None = None
) -> tuple[KerasLayer, ...]:
    """``keras.applications.ConvNeXt*(...).layers`` in order, input first.

    As Keras's applications build them (``include_preprocessing=True``: layer 1 is the
    weightless ``Normalization``; their fixed ``drop_path_rate=0``: each block ends in an
    ``_identity`` layer, ``_stochastic_depth`` at a non-zero rate). Layers Keras names itself
    are listed without its per-session counter: the residual adds ``tf.__operators__.add``;
    without the top, ``pooling``'s ``global_average_pooling2d`` or ``global_max_pooling2d``
    and the final ``layer_normalization``.
    """
    name = model_name(variant)
    stem = [("input_1", False), (f"{name}_prestem_normalization", False), (f"{name}_stem", True)]
    stages = [stem]
    for spec in block_specs(variant):
        names = [(spec.downsampling, True)] if spec.downsampling else []
        names += [(spec.prefix + suffix, weighted) for suffix, weighted in BLOCK_LAYERS]
        names += [(spec.prefix + "_identity", False), ("tf.__operators__.add", False)]
        stages.append(names)
    if include_top:
        stages.append([(name + suffix, weighted) for suffix, weighted in HEAD_LAYERS])
    else:
        stages.append([(p, False) for p in POOLING_LAYERS[pooling]] + [(NO_TOP_NORM, True)])
    return tuple(KerasLayer(layer, stage, weighted)
                 for stage, names in enumerate(stages) for layer, weighted in names)  # fmt: skip


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    # Two-pass variance as ``tf.nn.moments`` (Flax's default E[x^2] - E[x]^2 loses digits when
    # the mean is large against the spread, as on the residual stream of a deep stage).
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, dtype=dtype,
                        name=name)  # fmt: skip


class PointwiseDense(nn.Module):
    """Keras's ``Dense`` on an NHWC map: a 1x1 conv keeping Dense's ``(Cin, Cout)`` kernel and bias.

    Attributes:
      features: output channels.
      conv_impl: see ``flaxcnn.models.layers.resolve_conv_impl``.
      dtype: computation dtype (params stay float32).
    """

    features: int
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (x.shape[-1], self.features), jnp.float32)  # fmt: skip
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return pointwise_conv(x, kernel[None, None], self.conv_impl) + bias


class LayerScale(nn.Module):
    """Keras's ``LayerScale``: a learned per-channel factor, starting at ``init_value``.

    Its Keras weight ``gamma`` is the Flax param ``scale`` (as every ``gamma`` in
    ``flaxcnn.weights.keras_h5``).
    """

    init_value: float = LAYER_SCALE_INIT
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],),
                           jnp.float32)  # fmt: skip
        x, scale = nn.dtypes.promote_dtype(x, scale, dtype=self.dtype)
        return x * scale


class Patchify(nn.Module):
    """The stem (conv then LayerNorm) or a downsampling layer (LayerNorm then conv): Keras's
    nested ``Sequential`` of that name, a conv with kernel = stride = ``patch``, VALID.

    Attributes:
      features: output channels.
      patch: kernel size and stride (4 for the stem, 2 for downsampling).
      conv_name, norm_name: the Keras names of the two inner layers.
      norm_first: LayerNorm before the conv (downsampling) or after it (stem).
      conv_impl: see ``flaxcnn.models.layers.resolve_conv_impl``.
      dtype: computation dtype.
    """

    features: int
    patch: int
    conv_name: str
    norm_name: str
    norm_first: bool
    conv_impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = Conv2D(self.features, (self.patch,) * 2, strides=(self.patch,) * 2,
                      padding="VALID", use_bias=True, conv_impl=self.conv_impl, dtype=self.dtype,
                      name=self.conv_name)  # fmt: skip
        norm = _layer_norm(self.norm_name, self.dtype)
        return conv(norm(x)) if self.norm_first else norm(conv(x))


class ConvNeXt(nn.Module):
    """ConvNeXt (Keras layout and names), NHWC input preprocessed as ``'torch'``, logits out.

    Attributes:
      variant: ``'tiny'``, ``'small'``, ``'base'``, ``'large'`` or ``'xlarge'``.
      include_top: add Keras's head (average pooling, LayerNorm, the ``_head_dense`` classifier).
      num_classes: classes of the top (1000 for ImageNet).
      pooling: without the top: ``None`` (feature map), ``'avg'`` or ``'max'`` (vectors), each
        followed by Keras's final LayerNorm.
      drop_path_rate: stochastic depth of the last block (0 in Keras's applications); block
        ``i`` of ``n`` drops its residual branch with probability ``rate * i / (n - 1)``,
        per sample, only with ``train=True`` (needs a ``'dropout'`` rng). Changes no variables.
      conv_impl: conv formulation, see ``flaxcnn.models.layers``; never changes results.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params stay float32 and LayerNorm
        statistics are computed in float32.
    """

    variant: str = "tiny"
    include_top: bool = True
    num_classes: int = 1000
    pooling: str | None = None
    drop_path_rate: float = 0.0
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    def _block(self, spec: BlockSpec, rate: float, x: jax.Array, train: bool) -> jax.Array:
        depthwise, norm, expand, _, project, scale = (spec.prefix + s for s, _ in BLOCK_LAYERS)
        pointwise = functools.partial(PointwiseDense, conv_impl=self.conv_impl, dtype=self.dtype)
        y = DepthwiseConv2D((7, 7), padding="SAME", use_bias=True, conv_impl=self.conv_impl,
                            dtype=self.dtype, name=depthwise)(x)  # fmt: skip
        y = pointwise(4 * spec.channels, name=expand)(_layer_norm(norm, self.dtype)(y))
        y = pointwise(spec.channels, name=project)(nn.gelu(y, approximate=False))
        y = LayerScale(dtype=self.dtype, name=scale)(y)
        if rate:  # Keras's StochasticDepth: the whole branch, per sample, scaled by 1 / keep
            y = nn.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=not train,
                           name=spec.prefix + "_stochastic_depth")(y)  # fmt: skip
        return x + y

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, start: int = 0, stop: int | None = None
    ) -> jax.Array:
        """Runs the network, or the stages ``[start, stop)`` of it (see :func:`keras_layers`).

        Args:
          x: images ``[N, H, W, 3]`` preprocessed as ``'torch'`` (``flaxcnn.data``), ``H, W >=
            32`` (with ``start > 0``: the activation that stage ``start`` takes, as
            ``stop=start`` returns it).
          train: stochastic depth active (with ``drop_path_rate > 0``; pass
            ``rngs={'dropout': key}``). LayerNorm has no training mode, so otherwise the
            same as inference.
          start: first stage to run (0 the stem, ``i + 1`` block ``i``, the last the top).
          stop: stage to stop before; ``None``: through the top (:func:`num_stages`).

        Returns:
          Logits ``[N, num_classes]`` with the top, else the normalised feature map
          ``[N, h, w, C]`` or, with pooling, features ``[N, C]``; with ``stop`` short of the
          top, the activation entering stage ``stop``.
        """
        name, specs = model_name(self.variant), block_specs(self.variant)
        total = len(specs) + 2
        stop = total if stop is None else stop
        check_stage_call("ConvNeXt", x, start, stop, total, MIN_INPUT_SIZE)
        patchify = functools.partial(Patchify, conv_impl=self.conv_impl, dtype=self.dtype)
        runs = lambda stage: start <= stage < stop

        if runs(0):
            channels = MODEL_CONFIGS[self.variant][1][0]
            x = patchify(channels, 4, f"{name}_stem_conv", f"{name}_stem_layernorm",
                         norm_first=False, name=f"{name}_stem")(x)  # fmt: skip
        rates = drop_path_rates(self.variant, self.drop_path_rate)
        for spec, rate in zip(specs, rates, strict=True):
            if not runs(spec.position + 1):
                continue
            if spec.downsampling:
                i = spec.downsampling.rsplit("_", 1)[1]
                x = patchify(spec.channels, 2, f"{name}_downsampling_conv_{i}",
                             f"{name}_downsampling_layernorm_{i}", norm_first=True,
                             name=spec.downsampling)(x)  # fmt: skip
            x = self._block(spec, rate, x, train)

        if not runs(total - 1):
            return x
        if self.include_top:
            _, norm, dense = (name + suffix for suffix, _ in HEAD_LAYERS)
            x = _layer_norm(norm, self.dtype)(jnp.mean(x, axis=(1, 2)))
            return nn.Dense(self.num_classes, dtype=self.dtype, name=dense)(x)
        return _layer_norm(NO_TOP_NORM, self.dtype)(global_pool(x, self.pooling))


# The published files (``BASE_WEIGHTS_PATH`` and ``WEIGHTS_HASHES`` of Keras's convnext.py,
# SHA-256, with top then without): facebookresearch/ConvNeXt checkpoints (MIT licence)
# converted by the Keras team (github.com/sayakpaul/keras-convnext-conversion), all at 224 px.
# Keras's docstring: "The base, large, and xlarge models were first pre-trained on the
# ImageNet-21k dataset and then fine-tuned on the ImageNet-1k dataset"; tiny and small are
# ImageNet-1k only. The conversion fills the no-top files' final ``layer_normalization`` with
# nothing (the ImageNet final norm is ``_head_layernorm``, in the with-top files only), so it
# holds Keras's initial scale 1 and offset 0.
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/convnext/"
WEIGHTS_HASHES = {
    "tiny": ("8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
             "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    "small": ("ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
              "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
    "base": ("52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
             "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"),
    "large": ("070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
              "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd"),
    "xlarge": ("c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
               "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05"),
}  # fmt: skip
WEIGHTS = tuple(
    PretrainedSpec(
        model=model_name(variant),
        url=f"{BASE_URL}{model_name(variant)}{'.h5' if include_top else '_notop.h5'}",
        input_size=224,
        include_top=include_top,
        file_hash=WEIGHTS_HASHES[variant][0 if include_top else 1],
        license="MIT",
    )
    for variant in MODEL_CONFIGS
    for include_top in (True, False)
)
STAGE_NAMES = {variant: stage_names(variant) for variant in MODEL_CONFIGS}
# ImageNet top-1 as https://keras.io/api/applications/ lists it (ConvNeXtTiny ... XLarge).
IMAGENET_TOP1 = {"tiny": 0.813, "small": 0.823, "base": 0.853, "large": 0.863, "xlarge": 0.867}

# Fine-tuning starts at the last resolution stage (its downsampling layer and 3 blocks), as
# timm and the Keras fine-tuning guide unfreeze the top of a network first: at 1/32 of the
# input it is 17% (tiny) or 9% (the others) of the forward multiply-adds at 224 px but holds
# 56% or 31% of the backbone's weights, the most task-specific ones; the three earlier
# stages keep their ImageNet features.
BACKBONES = tuple(
    Backbone(
        name=model_name(variant),
        keras_name=f"ConvNeXt{'XLarge' if variant == 'xlarge' else variant.title()}",
        module=functools.partial(ConvNeXt, variant=variant),
        layers=functools.partial(keras_layers, variant=variant),
        stage_names=STAGE_NAMES[variant],
        preprocessing="torch",  # Keras's built-in Normalization: ImageNet mean/std of x / 255
        default_input_size=224,
        default_fine_tune_at=f"{model_name(variant)}_downsampling_block_2",
        running_statistics=False,
        weights=tuple(spec for spec in WEIGHTS if spec.model == model_name(variant)),
        min_input_size=MIN_INPUT_SIZE,
        classifier=(f"{model_name(variant)}_head_dense",),
        imagenet_top1=IMAGENET_TOP1[variant],
    )
    for variant in MODEL_CONFIGS
)
