"""MobileNetV2, ported layer for layer from ``keras.applications.MobileNetV2``.

"Keras-exact" is a contract on names and constants (Sandler et al., 2018, as Keras builds it):
every submodule carries the Keras layer name (``Conv1``, ``bn_Conv1``,
``expanded_conv_depthwise``, ``block_{i}_expand_BN``, ``Conv_1``, ``predictions`` ...), BatchNorm
uses epsilon 1e-3 and momentum 0.999 (Keras and Flax share the EMA convention), activations are
ReLU6, and stride-2 depthwise convs use Keras's asymmetric ``correct_pad`` zero padding followed
by VALID. Given the same weights the outputs equal Keras's (tests/test_parity_keras.py).

The model is a pure definition: it returns logits (Keras applies softmax), does not normalise
its input (feed images scaled to [-1, 1], see ``flaxcnn.data.scale_images``) and never touches
files; pretrained variables come from :mod:`flaxcnn.pretrained`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.models.layers import BatchNormAffine, Conv2D, DepthwiseConv2D, PointwiseConv

ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MIN_INPUT_SIZE = 32

# (output filters, stride, expansion) of the 17 inverted residual blocks, as in Keras.
BLOCKS = (
    (16, 1, 1),
    (24, 2, 6), (24, 1, 6),
    (32, 2, 6), (32, 1, 6), (32, 1, 6),
    (64, 2, 6), (64, 1, 6), (64, 1, 6), (64, 1, 6),
    (96, 1, 6), (96, 1, 6), (96, 1, 6),
    (160, 2, 6), (160, 1, 6), (160, 1, 6),
    (320, 1, 6),
)  # fmt: skip


def make_divisible(value: float, divisor: int = 8) -> int:
    """Keras's ``_make_divisible``: round to a multiple of ``divisor``, losing at most 10%."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def correct_pad(height: int, width: int, kernel_size: int = 3) -> tuple[tuple[int, int], ...]:
    """Keras's ``imagenet_utils.correct_pad``: the zero padding before a stride-2 conv.

    Even sizes get one row/column at the bottom/right only; odd sizes one on each side.
    """
    half = kernel_size // 2
    return ((half - (1 - height % 2), half), (half - (1 - width % 2), half))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block: Keras name prefix, channels, stride, residual add."""

    block_id: int
    prefix: str
    in_channels: int
    expanded_channels: int | None  # None: block 0 has no expansion conv
    out_channels: int
    stride: int

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@functools.cache
def block_specs(alpha: float) -> tuple[BlockSpec, ...]:
    """The 17 blocks' channel plan for a width multiplier, computed as Keras does."""
    channels = make_divisible(32 * alpha, 8)
    specs = []
    for block_id, (filters, stride, expansion) in enumerate(BLOCKS):
        out_channels = make_divisible(int(filters * alpha), 8)
        specs.append(
            BlockSpec(
                block_id=block_id,
                prefix=f"block_{block_id}_" if block_id else "expanded_conv_",
                in_channels=channels,
                expanded_channels=expansion * channels if block_id else None,
                out_channels=out_channels,
                stride=stride,
            )
        )
        channels = out_channels
    return tuple(specs)


def last_conv_channels(alpha: float) -> int:
    """``Conv_1`` has 1280 channels, scaled only when ``alpha > 1`` (as in the paper)."""
    return make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280


NUM_STAGES = len(BLOCKS) + 2  # the stem, the 17 blocks, the top (``Conv_1`` and after)


def stage_of_layer(name: str) -> int:
    """The stage a Keras layer name belongs to: 0 the stem, ``i + 1`` block ``i``, 18 the top.

    Stages are where the network can be cut: ``MobileNetV2(...)(x, stop=k)`` returns the input
    of stage ``k`` and ``(..., start=k)`` continues from it.
    """
    if name.startswith("expanded_conv_"):
        return 1
    if name.startswith("block_"):
        return int(name.split("_")[1]) + 1
    if name in ("input_1", "Conv1", "bn_Conv1", "Conv1_relu"):
        return 0
    if name in ("Conv_1", "Conv_1_bn", "out_relu", "global_average_pooling2d", "predictions"):
        return NUM_STAGES - 1
    raise ValueError(f"{name!r} is not a MobileNetV2 layer name")


def keras_layer_names(alpha: float = 1.0, include_top: bool = False) -> tuple[str, ...]:
    """Names of ``keras.applications.MobileNetV2(...).layers`` in order, weightless ones included.

    Index ``i`` of this tuple is Keras layer index ``i``, so the TensorFlow tutorial's
    ``fine_tune_at = 100`` can be translated to a module name (``block_11_expand_relu``).
    """
    names = ["input_1", "Conv1", "bn_Conv1", "Conv1_relu"]
    for spec in block_specs(alpha):
        p = spec.prefix
        if spec.expanded_channels is not None:
            names += [p + "expand", p + "expand_BN", p + "expand_relu"]
        if spec.stride == 2:
            names.append(p + "pad")
        names += [p + "depthwise", p + "depthwise_BN", p + "depthwise_relu"]
        names += [p + "project", p + "project_BN"]
        if spec.has_residual:
            names.append(p + "add")
    names += ["Conv_1", "Conv_1_bn", "out_relu"]
    if include_top:
        names += ["global_average_pooling2d", "predictions"]
    return tuple(names)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Keras layout and names), NHWC input scaled to [-1, 1], logits out.

    Attributes:
      alpha: width multiplier; Keras publishes ImageNet weights for ``ALPHAS``.
      include_top: add global average pooling and the ``predictions`` dense layer.
      num_classes: classes of the top (1000 for ImageNet).
      pooling: without the top: ``None`` (feature map), ``'avg'`` or ``'max'`` (vectors).
      conv_impl: conv formulation, see ``flaxcnn.models.layers``; never changes results.
      fold_batch_norm: with running averages (``train=False``), fold each BatchNorm into the
        conv before it (kernel times ``scale / sqrt(var + eps)``, plus an offset): the same
        variables, equal outputs up to float rounding, one pass over each activation fewer.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params and BN statistics stay float32.
    """

    alpha: float = 1.0
    include_top: bool = True
    num_classes: int = 1000
    pooling: str | None = None
    conv_impl: str = "auto"
    fold_batch_norm: bool = True
    dtype: Any = jnp.float32

    def _conv_bn(self, conv: nn.Module, bn_name: str, x: jax.Array, train: bool) -> jax.Array:
        """``conv`` then the BatchNorm ``bn_name``; folded into the conv at inference."""
        if train or not self.fold_batch_norm:
            bn = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.999,
                epsilon=1e-3,
                dtype=self.dtype,
                name=bn_name,
            )
            return bn(conv(x))
        features = getattr(conv, "features", None) or x.shape[-1]  # depthwise keeps channels
        multiplier, offset = BatchNormAffine(epsilon=1e-3, name=bn_name)(features)
        return conv(x, multiplier, offset)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, start: int = 0, stop: int = NUM_STAGES
    ) -> jax.Array:
        """Runs the network, or the stages ``[start, stop)`` of it (see :func:`stage_of_layer`).

        Args:
          x: images ``[N, H, W, 3]`` scaled to [-1, 1], ``H, W >= 32`` (with ``start > 0``:
            the activation that stage ``start`` takes, as ``stop=start`` returns it).
          train: BatchNorm uses batch statistics and updates ``batch_stats`` (pass
            ``mutable=['batch_stats']``); otherwise it uses the running averages.
          start: first stage to run. Fine-tuning evaluates from the first stage that trains,
            on activations of the frozen stages computed once.
          stop: stage to stop before; ``< NUM_STAGES`` returns that stage's input.

        Returns:
          Logits ``[N, num_classes]`` with the top, else the feature map ``[N, h, w, C]`` or,
          with pooling, features ``[N, C]``; with ``stop < NUM_STAGES`` the activation.
        """
        if not 0 <= start <= stop <= NUM_STAGES:
            raise ValueError(f"stages [{start}, {stop}) are not within [0, {NUM_STAGES}]")
        if start == 0 and (x.ndim != 4 or x.shape[-1] != 3):
            raise ValueError(f"MobileNetV2 expects NHWC images with 3 channels, got {x.shape}")
        if start == 0 and min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"MobileNetV2 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, "
                f"got {x.shape[1]}x{x.shape[2]}"
            )
        if self.pooling not in (None, "avg", "max"):
            raise ValueError(f"pooling={self.pooling!r}; expected None, 'avg' or 'max'")
        relu6 = lambda y: jnp.minimum(nn.relu(y), 6.0)
        pointwise = functools.partial(PointwiseConv, conv_impl=self.conv_impl, dtype=self.dtype)
        runs = lambda stage: start <= stage < stop

        if runs(0):
            stem = Conv2D(
                make_divisible(32 * self.alpha, 8),
                (3, 3),
                strides=(2, 2),
                padding="SAME",
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name="Conv1",
            )
            x = relu6(self._conv_bn(stem, "bn_Conv1", x, train))

        for spec in block_specs(self.alpha):
            if not runs(spec.block_id + 1):
                continue
            p = spec.prefix
            inputs = x
            if spec.expanded_channels is not None:
                expand = pointwise(spec.expanded_channels, name=p + "expand")
                x = relu6(self._conv_bn(expand, p + "expand_BN", x, train))
            padding = correct_pad(*x.shape[1:3]) if spec.stride == 2 else "SAME"
            depthwise = DepthwiseConv2D(
                strides=(spec.stride, spec.stride),
                padding=padding,
                conv_impl=self.conv_impl,
                dtype=self.dtype,
                name=p + "depthwise",
            )
            x = relu6(self._conv_bn(depthwise, p + "depthwise_BN", x, train))
            project = pointwise(spec.out_channels, name=p + "project")
            x = self._conv_bn(project, p + "project_BN", x, train)
            if spec.has_residual:
                x = inputs + x

        if not runs(NUM_STAGES - 1):
            return x
        top_conv = pointwise(last_conv_channels(self.alpha), name="Conv_1")
        x = relu6(self._conv_bn(top_conv, "Conv_1_bn", x, train))

        if self.include_top:
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        if self.pooling == "max":
            return jnp.max(x, axis=(1, 2))
        return x
