"""MobileNetV2, ported layer for layer from ``keras.applications.MobileNetV2``.

"Keras-exact" is a contract on names and constants (Sandler et al., 2018, as Keras builds it):
every submodule carries the Keras layer name (``Conv1``, ``bn_Conv1``,
``expanded_conv_depthwise``, ``block_{i}_expand_BN``, ``Conv_1``, ``predictions`` ...), BatchNorm
uses epsilon 1e-3 and momentum 0.999 (Keras and Flax share the EMA convention), activations are
ReLU6, and stride-2 depthwise convs use Keras's asymmetric ``correct_pad`` zero padding followed
by VALID. Given the same weights the outputs equal Keras's (tests/test_mobilenet_v2.py).

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

from flaxcnn.models.backbone import Backbone, KerasLayer, check_stage_call
from flaxcnn.models.layers import (
    Conv2D,
    DepthwiseConv2D,
    PointwiseConv,
    conv_batch_norm,
    correct_pad,
    global_pool,
    make_divisible,
)
from flaxcnn.weights.registry import PretrainedSpec

ALPHAS = (1.0, 0.35, 0.5, 0.75, 1.3, 1.4)  # the default first
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
STAGE_NAMES = ("Conv1", "expanded_conv", *(f"block_{i}" for i in range(1, len(BLOCKS))), "Conv_1")


@functools.cache
def keras_layers(include_top: bool = False, alpha: float = 1.0) -> tuple[KerasLayer, ...]:
    """``keras.applications.MobileNetV2(...).layers`` in order, weightless ones included.

    Index ``i`` is Keras layer index ``i``, so the TensorFlow tutorial's ``fine_tune_at = 100``
    is ``block_11_expand_relu``. Stage 0 is the stem, ``i + 1`` block ``i``, 18 the top.
    """
    layers = [KerasLayer("input_1", 0, False)]
    layers += [KerasLayer(n, 0, w) for n, w in (("Conv1", True), ("bn_Conv1", True),
                                                ("Conv1_relu", False))]  # fmt: skip
    for spec in block_specs(alpha):
        p, stage = spec.prefix, spec.block_id + 1
        names = []
        if spec.expanded_channels is not None:
            names += [(p + "expand", True), (p + "expand_BN", True), (p + "expand_relu", False)]
        if spec.stride == 2:
            names.append((p + "pad", False))
        names += [(p + "depthwise", True), (p + "depthwise_BN", True),
                  (p + "depthwise_relu", False), (p + "project", True), (p + "project_BN", True)]
        if spec.has_residual:
            names.append((p + "add", False))
        layers += [KerasLayer(n, stage, w) for n, w in names]
    top = [("Conv_1", True), ("Conv_1_bn", True), ("out_relu", False)]
    if include_top:
        top += [("global_average_pooling2d", False), ("predictions", True)]
    layers += [KerasLayer(n, NUM_STAGES - 1, w) for n, w in top]
    return tuple(layers)


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
        return conv_batch_norm(conv, x, name=bn_name, train=train, fold=self.fold_batch_norm,
                               epsilon=1e-3, momentum=0.999, dtype=self.dtype)  # fmt: skip

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, start: int = 0, stop: int = NUM_STAGES
    ) -> jax.Array:
        """Runs the network, or the stages ``[start, stop)`` of it (see :func:`keras_layers`).

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
        check_stage_call("MobileNetV2", x, start, stop, NUM_STAGES, MIN_INPUT_SIZE)
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
        return global_pool(x, self.pooling)


# The published files: TF-slim ``mobilenet_v2_{alpha}_{rows}`` checkpoints converted by the
# Keras team, alphas 0.35-1.0 at 96-224 px and 1.3/1.4 at 224 only, with and without the top.
# Keras publishes no hash for them (``keras.applications.mobilenet_v2`` downloads unchecked).
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
RESOLUTIONS = {alpha: (96, 128, 160, 192, 224) if alpha <= 1.0 else (224,) for alpha in ALPHAS}
WEIGHTS = tuple(
    PretrainedSpec(
        model="mobilenet_v2",
        url=f"{BASE_URL}mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}"
        f"{'' if include_top else '_no_top'}.h5",
        input_size=rows,
        include_top=include_top,
        options=(("alpha", alpha),),
    )
    for alpha in sorted(ALPHAS)
    for rows in RESOLUTIONS[alpha]
    for include_top in (True, False)
)

BACKBONES = (
    Backbone(
        name="mobilenet_v2",
        keras_name="MobileNetV2",
        module=MobileNetV2,
        layers=keras_layers,
        stage_names=STAGE_NAMES,
        preprocessing="tf",
        default_input_size=224,
        default_fine_tune_at="100",  # the TensorFlow transfer-learning tutorial's
        running_statistics=True,
        weights=WEIGHTS,
        options={"alpha": ALPHAS},
        min_input_size=MIN_INPUT_SIZE,
        imagenet_top1=0.713,
    ),
)
