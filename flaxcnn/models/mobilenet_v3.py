"""MobileNetV3 Small and Large, ported layer for layer from ``keras.applications.mobilenet_v3``.

Howard et al., 2019, as tf_keras builds it: the layer names are Keras's, ``/`` included
(``expanded_conv_3/depthwise/BatchNorm``, ``expanded_conv_3/squeeze_excite/Conv_1``), so the
published ``.h5`` files load by name. Flax takes such module names, the strict merge keeps
variable paths as tuples, and Orbax saves and restores them unchanged
(tests/test_mobilenet_v3.py), so no name mapping is needed. Constants as Keras's: BatchNorm
epsilon 1e-3 and momentum 0.999, ``_depth`` rounding (``make_divisible``), hard-swish as
``x * (relu6(x + 3) * (1 / 6))`` in that order, squeeze-and-excite on the expanded channels
with a hard-sigmoid gate, stride-2 depthwise convs with ``correct_pad`` then VALID.
``minimalistic`` drops squeeze-and-excite, 5x5 kernels and hard-swish (ReLU instead).

Keras builds its input scaling into the model (``Rescaling(1 / 127.5, offset=-1)``); here it is
preprocessing mode ``'tf'`` outside the module, as for every family. The module returns logits
(Keras's ``Predictions`` layer applies softmax) and never touches files.
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

ALPHAS = (1.0, 0.75)  # those Keras publishes weights for, the default first
MINIMALISTIC = (False, True)
MIN_INPUT_SIZE = 32
SE_RATIO = 0.25
# The variant's kernel (5) and activation (hard-swish) in BLOCKS; 3 and ReLU when minimalistic.
K, HS = "k", "hs"

# Keras's stack_fn calls, one row per inverted residual block: (expansion, filters, kernel,
# stride, squeeze-excite, activation). Expansions are Keras's float expressions, so that
# ``_depth(in_channels * expansion)`` rounds exactly as Keras's does.
BLOCKS = {
    "small": (
        (1, 16, 3, 2, True, "relu"),
        (72.0 / 16, 24, 3, 2, False, "relu"),
        (88.0 / 24, 24, 3, 1, False, "relu"),
        (4, 40, K, 2, True, HS),
        (6, 40, K, 1, True, HS),
        (6, 40, K, 1, True, HS),
        (3, 48, K, 1, True, HS),
        (3, 48, K, 1, True, HS),
        (6, 96, K, 2, True, HS),
        (6, 96, K, 1, True, HS),
        (6, 96, K, 1, True, HS),
    ),
    "large": (
        (1, 16, 3, 1, False, "relu"),
        (4, 24, 3, 2, False, "relu"),
        (3, 24, 3, 1, False, "relu"),
        (3, 40, K, 2, True, "relu"),
        (3, 40, K, 1, True, "relu"),
        (3, 40, K, 1, True, "relu"),
        (6, 80, 3, 2, False, HS),
        (2.5, 80, 3, 1, False, HS),
        (2.3, 80, 3, 1, False, HS),
        (2.3, 80, 3, 1, False, HS),
        (6, 112, 3, 1, True, HS),
        (6, 112, 3, 1, True, HS),
        (6, 160, K, 2, True, HS),
        (6, 160, K, 1, True, HS),
        (6, 160, K, 1, True, HS),
    ),
}
LAST_POINT_CHANNELS = {"small": 1024, "large": 1280}  # ``Conv_2``, the top's 1x1 conv
KERAS_NAMES = {"small": "MobileNetV3Small", "large": "MobileNetV3Large"}
STEM_CHANNELS = 16  # not scaled by alpha, as in Keras


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """Keras's ``ReLU(6.0)(x + 3.0) * (1.0 / 6.0)``: a multiply by float32(1/6), not a divide."""
    return jnp.minimum(nn.relu(x + 3.0), 6.0) * (1.0 / 6.0)


def hard_swish(x: jax.Array) -> jax.Array:
    """Keras's ``Multiply()([x, hard_sigmoid(x)])``."""
    return x * hard_sigmoid(x)


ACTIVATIONS = {"relu": nn.relu, "hard_swish": hard_swish}
# The weightless layers Keras creates for an activation, by their base names (Keras numbers
# them per session: ``re_lu_7``, ``tf.__operators__.add_3``, ``multiply_2``).
_HARD_SIGMOID_LAYERS = (("tf.__operators__.add", False), ("re_lu", False),
                        ("tf.math.multiply", False))  # fmt: skip
_ACTIVATION_LAYERS = {
    "relu": (("re_lu", False),),
    "hard_swish": (*_HARD_SIGMOID_LAYERS, ("multiply", False)),
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block as Keras's ``_inverted_res_block`` builds it."""

    block_id: int
    prefix: str  # 'expanded_conv/', 'expanded_conv_1/', ...
    in_channels: int
    expanded_channels: int | None  # None: block 0 has no expansion conv
    out_channels: int
    kernel: int
    stride: int
    se_channels: int | None  # squeeze-and-excite bottleneck, None without SE
    activation: str  # 'relu' or 'hard_swish'

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@functools.cache
def block_specs(variant: str, alpha: float, minimalistic: bool) -> tuple[BlockSpec, ...]:
    """A variant's blocks for the options, channels computed as Keras does."""
    specs, channels = [], STEM_CHANNELS
    for block_id, (expansion, filters, kernel, stride, se, act) in enumerate(BLOCKS[variant]):
        expanded = make_divisible(channels * expansion)
        depthwise_channels = expanded if block_id else channels
        specs.append(BlockSpec(
            block_id=block_id,
            prefix=f"expanded_conv_{block_id}/" if block_id else "expanded_conv/",
            in_channels=channels,
            expanded_channels=expanded if block_id else None,
            out_channels=make_divisible(filters * alpha),
            kernel=(3 if minimalistic else 5) if kernel == K else kernel,
            stride=stride,
            se_channels=make_divisible(depthwise_channels * SE_RATIO)
            if se and not minimalistic else None,
            activation="relu" if act == "relu" or minimalistic else "hard_swish",
        ))  # fmt: skip
        channels = specs[-1].out_channels
    return tuple(specs)


def top_channels(variant: str, alpha: float) -> tuple[int, int]:
    """``(Conv_1, Conv_2)`` channels: six times the last block's, and 1024/1280 (scaled by
    ``alpha`` only above 1, as in Keras)."""
    last = LAST_POINT_CHANNELS[variant]
    last = make_divisible(last * alpha) if alpha > 1.0 else last
    return make_divisible(make_divisible(BLOCKS[variant][-1][1] * alpha) * 6), last


def num_stages(variant: str) -> int:
    """The stem, one stage per block, the top (``Conv_1`` and after): 13 (Small), 17 (Large)."""
    return len(BLOCKS[variant]) + 2


def stage_names(variant: str) -> tuple[str, ...]:
    blocks = [f"expanded_conv_{i}" if i else "expanded_conv" for i in range(len(BLOCKS[variant]))]
    return ("Conv", *blocks, "Conv_1")


@functools.cache
def keras_layers(
    variant: str, include_top: bool = False, alpha: float = 1.0, minimalistic: bool = False
) -> tuple[KerasLayer, ...]:
    """``keras.applications.MobileNetV3{Small,Large}(...).layers`` in order, input first.

    As Keras builds them by default (``include_preprocessing=True``: layer 1 is ``rescaling``,
    weightless here since the scaling is preprocessing; ``dropout_rate=0.2``). Without the top,
    Keras's ``avg_pool``/``max_pool`` of ``pooling`` would follow the last layer listed.
    """
    act = _ACTIVATION_LAYERS["relu" if minimalistic else "hard_swish"]
    stem = [("input_1", False), ("rescaling", False), ("Conv", True), ("Conv/BatchNorm", True),
            *act]  # fmt: skip
    stages = [stem]
    for spec in block_specs(variant, alpha, minimalistic):
        p, block_act = spec.prefix, _ACTIVATION_LAYERS[spec.activation]
        names = []
        if spec.expanded_channels is not None:
            names += [(p + "expand", True), (p + "expand/BatchNorm", True), *block_act]
        if spec.stride == 2:
            names.append((p + "depthwise/pad", False))
        names += [(p + "depthwise", True), (p + "depthwise/BatchNorm", True), *block_act]
        if spec.se_channels is not None:
            se = p + "squeeze_excite/"
            names += [(se + "AvgPool", False), (se + "Conv", True), (se + "Relu", False),
                      (se + "Conv_1", True), *_HARD_SIGMOID_LAYERS,
                      (se + "Mul", False)]  # fmt: skip
        names += [(p + "project", True), (p + "project/BatchNorm", True)]
        if spec.has_residual:
            names.append((p + "Add", False))
        stages.append(names)
    top = [("Conv_1", True), ("Conv_1/BatchNorm", True), *act]
    if include_top:
        top += [("global_average_pooling2d", False), ("Conv_2", True), *act, ("dropout", False),
                ("Logits", True), ("flatten", False), ("Predictions", False)]  # fmt: skip
    stages.append(top)
    return tuple(KerasLayer(name, stage, weighted)
                 for stage, names in enumerate(stages) for name, weighted in names)  # fmt: skip


class MobileNetV3(nn.Module):
    """MobileNetV3 (Keras layout and names), NHWC input scaled to [-1, 1], logits out.

    Attributes:
      variant: ``'small'`` or ``'large'`` (Keras's ``MobileNetV3Small``/``Large``).
      alpha: width multiplier; Keras publishes ImageNet weights for ``ALPHAS``.
      minimalistic: no squeeze-and-excite, 3x3 kernels only, ReLU instead of hard-swish.
      include_top: add the top: pooling, ``Conv_2`` (1x1, bias) + activation, dropout and the
        ``Logits`` 1x1 conv. ``Conv_2`` is part of Keras's top, so only the with-top files hold it.
      num_classes: classes of the top (1000 for ImageNet).
      pooling: without the top: ``None`` (feature map), ``'avg'`` or ``'max'`` (vectors).
      dropout_rate: dropout before ``Logits`` when ``train=True`` (Keras's default 0.2).
      conv_impl: conv formulation, see ``flaxcnn.models.layers``; never changes results.
      fold_batch_norm: with running averages, fold each BatchNorm into the conv before it.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params and BN statistics stay float32.
    """

    variant: str = "large"
    alpha: float = 1.0
    minimalistic: bool = False
    include_top: bool = True
    num_classes: int = 1000
    pooling: str | None = None
    dropout_rate: float = 0.2
    conv_impl: str = "auto"
    fold_batch_norm: bool = True
    dtype: Any = jnp.float32

    def _conv_bn(self, conv: nn.Module, x: jax.Array, train: bool) -> jax.Array:
        return conv_batch_norm(conv, x, name=conv.name + "/BatchNorm", train=train,
                               fold=self.fold_batch_norm, epsilon=1e-3, momentum=0.999,
                               dtype=self.dtype)  # fmt: skip

    def _squeeze_excite(self, x: jax.Array, spec: BlockSpec) -> jax.Array:
        """Global mean -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> hard sigmoid gate."""
        conv = functools.partial(PointwiseConv, use_bias=True, conv_impl=self.conv_impl,
                                 dtype=self.dtype)  # fmt: skip
        prefix = spec.prefix + "squeeze_excite/"
        gate = jnp.mean(x, axis=(1, 2), keepdims=True)
        gate = nn.relu(conv(spec.se_channels, name=prefix + "Conv")(gate))
        gate = hard_sigmoid(conv(x.shape[-1], name=prefix + "Conv_1")(gate))
        return x * gate

    def _block(self, x: jax.Array, spec: BlockSpec, train: bool) -> jax.Array:
        p, act = spec.prefix, ACTIVATIONS[spec.activation]
        pointwise = functools.partial(PointwiseConv, conv_impl=self.conv_impl, dtype=self.dtype)
        inputs = x
        if spec.expanded_channels is not None:
            x = act(self._conv_bn(pointwise(spec.expanded_channels, name=p + "expand"), x, train))
        stride = spec.stride
        padding = correct_pad(*x.shape[1:3], spec.kernel) if stride == 2 else "SAME"
        depthwise = DepthwiseConv2D((spec.kernel, spec.kernel), strides=(stride, stride),
                                    padding=padding, conv_impl=self.conv_impl, dtype=self.dtype,
                                    name=p + "depthwise")  # fmt: skip
        x = act(self._conv_bn(depthwise, x, train))
        if spec.se_channels is not None:
            x = self._squeeze_excite(x, spec)
        x = self._conv_bn(pointwise(spec.out_channels, name=p + "project"), x, train)
        return inputs + x if spec.has_residual else x

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, start: int = 0, stop: int | None = None
    ) -> jax.Array:
        """Runs the network, or its stages ``[start, stop)`` (see :func:`keras_layers`).

        Args:
          x: images ``[N, H, W, 3]`` scaled to [-1, 1], ``H, W >= 32`` (with ``start > 0``:
            the activation entering stage ``start``, as ``stop=start`` returns it).
          train: BatchNorm uses batch statistics and updates ``batch_stats`` (pass
            ``mutable=['batch_stats']``), and the top's dropout is active (it needs a
            ``'dropout'`` rng); otherwise running averages, deterministic.
          start: first stage to run.
          stop: stage to stop before; ``None``: through the top (:func:`num_stages` is 13 for
            Small, 17 for Large).

        Returns:
          Logits ``[N, num_classes]`` with the top, else the feature map ``[N, h, w, C]`` or,
          with pooling, features ``[N, C]``; with ``stop`` before the top, the activation.
        """
        name, total = KERAS_NAMES[self.variant], num_stages(self.variant)
        stop = total if stop is None else stop
        check_stage_call(name, x, start, stop, total, MIN_INPUT_SIZE)
        act = ACTIVATIONS["relu" if self.minimalistic else "hard_swish"]
        runs = lambda stage: start <= stage < stop

        if runs(0):
            stem = Conv2D(STEM_CHANNELS, (3, 3), strides=(2, 2), padding="SAME",
                          conv_impl=self.conv_impl, dtype=self.dtype, name="Conv")  # fmt: skip
            x = act(self._conv_bn(stem, x, train))
        for spec in block_specs(self.variant, self.alpha, self.minimalistic):
            if runs(spec.block_id + 1):
                x = self._block(x, spec, train)
        if not runs(total - 1):
            return x

        last_conv, last_point = top_channels(self.variant, self.alpha)
        pointwise = functools.partial(PointwiseConv, conv_impl=self.conv_impl, dtype=self.dtype)
        x = act(self._conv_bn(pointwise(last_conv, name="Conv_1"), x, train))
        if self.include_top:
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
            x = act(pointwise(last_point, use_bias=True, name="Conv_2")(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
            x = pointwise(self.num_classes, use_bias=True, name="Logits")(x)
            return x.reshape(x.shape[0], -1)
        return global_pool(x, self.pooling)


# The published files: TF-slim checkpoints converted by the Keras team, all at 224 px, with the
# top and without (``_no_top_v2``), for the (alpha, minimalistic) pairs in Keras's
# ``WEIGHTS_HASHES`` (copied as published: MD5 digests, with top first, checked by ``get_file``).
BASE_WEIGHT_PATH = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
WEIGHTS_HASHES = {
    "large_224_0.75_float": (
        "765b44a33ad4005b3ac83185abf1d0eb", "40af19a13ebea4e2ee0c676887f69a2e"),
    "large_224_1.0_float": (
        "59e551e166be033d707958cf9e29a6a7", "07fb09a5933dd0c8eaafa16978110389"),
    "large_minimalistic_224_1.0_float": (
        "675e7b876c45c57e9e63e6d90a36599c", "ec5221f64a2f6d1ef965a614bdae7973"),
    "small_224_0.75_float": (
        "cb65d4e5be93758266aa0a7f2c6708b7", "ebdb5cc8e0b497cd13a7c275d475c819"),
    "small_224_1.0_float": (
        "8768d4c2e7dee89b9d02b2d03d65d862", "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "small_minimalistic_224_1.0_float": (
        "99cd97fb2fcdad2bf028eb838de69e37", "cde8136e733e811080d9fcd8a252f7e4"),
}  # fmt: skip
PUBLISHED_OPTIONS = ((1.0, False), (0.75, False), (1.0, True))  # (alpha, minimalistic)


def _spec(variant: str, alpha: float, minimalistic: bool, include_top: bool) -> PretrainedSpec:
    """One published file, named as Keras's ``MobileNetV3(weights='imagenet')`` names it."""
    model_name = f"{variant}{'_minimalistic' if minimalistic else ''}_224_{alpha}_float"
    filename = f"weights_mobilenet_v3_{model_name}{'' if include_top else '_no_top_v2'}.h5"
    return PretrainedSpec(
        model=f"mobilenet_v3_{variant}",
        url=BASE_WEIGHT_PATH + filename,
        input_size=224,
        include_top=include_top,
        file_hash=WEIGHTS_HASHES[model_name][0 if include_top else 1],
        options=(("alpha", alpha), ("minimalistic", minimalistic)),
    )


WEIGHTS = {
    variant: tuple(
        _spec(variant, alpha, minimalistic, include_top)
        for alpha, minimalistic in PUBLISHED_OPTIONS
        for include_top in (True, False)
    )
    for variant in BLOCKS
}
STAGE_NAMES = {variant: stage_names(variant) for variant in BLOCKS}
# Top-1 of the default options (alpha 1.0, not minimalistic) at 224 px, as Keras publishes it
# in the MobileNetV3 docstring table (rendered at https://keras.io/api/applications/mobilenet/;
# the https://keras.io/api/applications/ index table has no MobileNetV3 row).
IMAGENET_TOP1 = {"small": 0.681, "large": 0.756}
# Fine-tuning starts at the last resolution stage (1/32 scale: the last three blocks and the
# top), the "unfreeze the top blocks" recipe of Keras's fine-tuning guide, as MobileNetV2's
# tutorial point (block_11 of 17) is. A block name, since indices shift with minimalistic.
DEFAULT_FINE_TUNE_AT = {"small": "expanded_conv_8", "large": "expanded_conv_12"}

BACKBONES = tuple(
    Backbone(
        name=f"mobilenet_v3_{variant}",
        keras_name=KERAS_NAMES[variant],
        module=functools.partial(MobileNetV3, variant=variant),
        layers=functools.partial(keras_layers, variant),
        stage_names=STAGE_NAMES[variant],
        preprocessing="tf",
        default_input_size=224,
        default_fine_tune_at=DEFAULT_FINE_TUNE_AT[variant],
        running_statistics=True,
        weights=WEIGHTS[variant],
        options={"alpha": ALPHAS, "minimalistic": MINIMALISTIC},
        min_input_size=MIN_INPUT_SIZE,
        classifier=("Logits",),
        imagenet_top1=IMAGENET_TOP1[variant],
    )
    for variant in ("small", "large")
)
