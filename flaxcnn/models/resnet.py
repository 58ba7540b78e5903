"""ResNet V1 and V2, ported layer for layer from ``keras.applications`` (ResNet50 ... ResNet152V2).

"Keras-exact" is a contract on names and constants. V1 (He et al., 2015, as Keras builds it):
convs with bias, each followed by BatchNorm (epsilon 1.001e-5, momentum 0.99), a
``conv1_pad`` + 7x7/2 VALID stem, ``pool1_pad`` + 3x3/2 VALID max pool, and bottleneck blocks
``convN_blockM_{0,1,2,3}_{conv,bn}`` whose first block per stage strides its 1x1 convs. V2
(pre-activation, He et al., 2016, Keras's ``stack2``): ``convN_blockM_preact_bn`` before each
block, no BatchNorm after ``_0_conv``/``_3_conv`` (which keep their bias) and ``_1_conv``/
``_2_conv`` without bias, the stride on the 3x3 conv (``_2_pad`` + VALID) of the *last* block
of each stage with a 1x1/2 max pool as its shortcut, and ``post_bn``/``post_relu`` at the end.

The model is a pure definition: it returns logits (Keras applies softmax), never normalises its
input (V1 expects ``'caffe'`` preprocessing, V2 ``'tf'``; see ``flaxcnn.data.scale_images``)
and never touches files; pretrained variables come from :mod:`flaxcnn.pretrained`.
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
    PointwiseConv,
    conv_batch_norm,
    global_pool,
    max_pool,
)
from flaxcnn.weights.registry import PretrainedSpec

# Bottleneck width of the four stages (conv2..conv5; a block outputs 4x as many channels) and
# the blocks per stage of each depth, as Keras's ``stack_fn``s give them.
STAGE_FILTERS = (64, 128, 256, 512)
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
MIN_INPUT_SIZE = 32
BN_EPSILON = 1.001e-5  # every ResNet BatchNorm in Keras; momentum is Keras's default
BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One bottleneck block: Keras name prefix, bottleneck width, stride, kind of shortcut.

    ``shortcut`` is ``'conv'`` (a 1x1 projection, ``_0_conv``), ``'identity'``, or
    ``'subsample'`` (V2's strided blocks: Keras's unnamed ``MaxPooling2D(1, strides=2)``,
    which keeps every other pixel).
    """

    prefix: str
    filters: int
    stride: int
    shortcut: str


@functools.cache
def block_specs(depth: int, preact: bool) -> tuple[BlockSpec, ...]:
    """The blocks in order, strides placed as Keras's ``stack1`` (V1) / ``stack2`` (V2) do."""
    specs = []
    stages = zip(STAGE_FILTERS, STAGE_BLOCKS[depth], strict=True)
    for stage, (filters, blocks) in enumerate(stages, start=2):
        for i in range(1, blocks + 1):
            if preact:  # the projection in the first block, the stride in the last (not conv5)
                stride = 2 if i == blocks and stage < 5 else 1
                shortcut = "conv" if i == 1 else "subsample" if stride == 2 else "identity"
            else:  # the projection and the stride (but conv2's) in the first block
                stride = 2 if i == 1 and stage > 2 else 1
                shortcut = "conv" if i == 1 else "identity"
            specs.append(BlockSpec(f"conv{stage}_block{i}", filters, stride, shortcut))
    return tuple(specs)


def keras_name(depth: int, preact: bool) -> str:
    return f"ResNet{depth}{'V2' if preact else ''}"


def num_stages(depth: int) -> int:
    """The stem, one stage per block, the top."""
    return sum(STAGE_BLOCKS[depth]) + 2


def stage_names(depth: int, preact: bool) -> tuple[str, ...]:
    """``conv1`` (the stem, pool included), ``convN_blockM`` per block, then the top:
    ``post`` (V2's ``post_bn``, ``post_relu`` and after) or ``avg_pool`` (V1)."""
    blocks = tuple(spec.prefix for spec in block_specs(depth, preact))
    return ("conv1", *blocks, "post" if preact else "avg_pool")


def _block_layers(spec: BlockSpec, preact: bool) -> list[tuple[str, bool]]:
    """A block's Keras layers as ``(name, weighted)``, in Keras's (topological) order."""
    p = spec.prefix + "_"
    bottleneck = [(p + "1_conv", True), (p + "1_bn", True), (p + "1_relu", False)]
    if not preact:
        names = [*bottleneck, (p + "2_conv", True), (p + "2_bn", True), (p + "2_relu", False)]
        if spec.shortcut == "conv":
            names += [(p + "0_conv", True), (p + "3_conv", True), (p + "0_bn", True),
                      (p + "3_bn", True)]  # fmt: skip
        else:
            names += [(p + "3_conv", True), (p + "3_bn", True)]
        return [*names, (p + "add", False), (p + "out", False)]
    names = [(p + "preact_bn", True), (p + "preact_relu", False), *bottleneck,
             (p + "2_pad", False), (p + "2_conv", True), (p + "2_bn", True),
             (p + "2_relu", False)]  # fmt: skip
    if spec.shortcut == "conv":
        names.append((p + "0_conv", True))
    elif spec.shortcut == "subsample":
        names.append(("max_pooling2d", False))  # named by Keras's counter: listed without it
    return [*names, (p + "3_conv", True), (p + "out", False)]


@functools.cache
def keras_layers(
    include_top: bool = False, *, depth: int = 50, preact: bool = False
) -> tuple[KerasLayer, ...]:
    """``keras.applications.ResNet{depth}[V2](...).layers`` in order, weightless ones included.

    Index ``i`` is Keras layer index ``i``. Stage 0 is the stem (``conv1_*``, ``pool1_*``),
    stage ``i`` block ``i`` (``conv2_block1`` first), the last one the top. The input layer
    is ``input_1``, as Keras names it first in a session.
    """
    stem = [("input_1", False), ("conv1_pad", False), ("conv1_conv", True)]
    if not preact:
        stem += [("conv1_bn", True), ("conv1_relu", False)]
    stem += [("pool1_pad", False), ("pool1_pool", False)]
    layers = [KerasLayer(name, 0, weighted) for name, weighted in stem]
    for stage, spec in enumerate(block_specs(depth, preact), start=1):
        layers += [KerasLayer(n, stage, w) for n, w in _block_layers(spec, preact)]
    top = [("post_bn", True), ("post_relu", False)] if preact else []
    if include_top:
        top += [("avg_pool", False), ("predictions", True)]
    layers += [KerasLayer(name, num_stages(depth) - 1, weighted) for name, weighted in top]
    return tuple(layers)


class ResNet(nn.Module):
    """ResNet V1 / V2 (Keras layout and names), NHWC input, logits out.

    Attributes:
      depth: 50, 101 or 152 (the blocks per stage, ``STAGE_BLOCKS``).
      preact: ResNet V2 (pre-activation) instead of V1.
      include_top: add global average pooling and the ``predictions`` dense layer.
      num_classes: classes of the top (1000 for ImageNet).
      pooling: without the top: ``None`` (feature map), ``'avg'`` or ``'max'`` (vectors).
      conv_impl: conv formulation, see ``flaxcnn.models.layers``; never changes results.
      fold_batch_norm: with running averages (``train=False``), fold each BatchNorm that
        follows a conv into it (the same variables, equal outputs up to float rounding). V2's
        ``preact_bn``/``post_bn`` follow an addition and stay separate.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); params and BN statistics stay float32.
    """

    depth: int = 50
    preact: bool = False
    include_top: bool = True
    num_classes: int = 1000
    pooling: str | None = None
    conv_impl: str = "auto"
    fold_batch_norm: bool = True
    dtype: Any = jnp.float32

    def _pointwise(self, features: int, name: str, use_bias: bool = True) -> nn.Module:
        return PointwiseConv(features, use_bias=use_bias, conv_impl=self.conv_impl,
                             dtype=self.dtype, name=name)  # fmt: skip

    def _conv(self, features, kernel, strides, padding, name, use_bias=True) -> nn.Module:
        return Conv2D(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                      use_bias=use_bias, conv_impl=self.conv_impl, dtype=self.dtype,
                      name=name)  # fmt: skip

    def _conv_bn(self, conv: nn.Module, bn_name: str, x: jax.Array, train: bool) -> jax.Array:
        return conv_batch_norm(conv, x, name=bn_name, train=train, fold=self.fold_batch_norm,
                               epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                               dtype=self.dtype)  # fmt: skip

    def _bn(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                            epsilon=BN_EPSILON, dtype=self.dtype, name=name)(x)  # fmt: skip

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        conv = self._conv(64, 7, 2, ((3, 3), (3, 3)), "conv1_conv")  # = conv1_pad + VALID
        x = conv(x) if self.preact else nn.relu(self._conv_bn(conv, "conv1_bn", x, train))
        # pool1_pad pads with zeros, which take part in the max (V2's stem has no ReLU, so
        # this differs from -inf padding there).
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return max_pool(x, 3, 2, self.conv_impl)

    def _block_v1(self, spec: BlockSpec, x: jax.Array, train: bool) -> jax.Array:
        p, filters = spec.prefix + "_", spec.filters
        # A 1x1 VALID conv with stride s reads every s-th pixel: subsample once, then matmuls.
        strided = x[:, :: spec.stride, :: spec.stride] if spec.stride > 1 else x
        shortcut = x
        if spec.shortcut == "conv":
            shortcut = self._conv_bn(self._pointwise(4 * filters, p + "0_conv"), p + "0_bn",
                                     strided, train)  # fmt: skip
        y = nn.relu(self._conv_bn(self._pointwise(filters, p + "1_conv"), p + "1_bn",
                                  strided, train))  # fmt: skip
        y = nn.relu(self._conv_bn(self._conv(filters, 3, 1, "SAME", p + "2_conv"), p + "2_bn",
                                  y, train))  # fmt: skip
        y = self._conv_bn(self._pointwise(4 * filters, p + "3_conv"), p + "3_bn", y, train)
        return nn.relu(shortcut + y)

    def _block_v2(self, spec: BlockSpec, x: jax.Array, train: bool) -> jax.Array:
        p, filters = spec.prefix + "_", spec.filters
        preact = nn.relu(self._bn(p + "preact_bn", x, train))
        if spec.shortcut == "conv":
            shortcut = self._pointwise(4 * filters, p + "0_conv")(preact)
        elif spec.shortcut == "subsample":  # MaxPooling2D(1, strides=2): every other pixel
            shortcut = x[:, :: spec.stride, :: spec.stride]
        else:
            shortcut = x
        y = nn.relu(self._conv_bn(self._pointwise(filters, p + "1_conv", use_bias=False),
                                  p + "1_bn", preact, train))  # fmt: skip
        conv = self._conv(filters, 3, spec.stride, ((1, 1), (1, 1)), p + "2_conv", False)
        y = nn.relu(self._conv_bn(conv, p + "2_bn", y, train))  # _2_pad + VALID
        return shortcut + self._pointwise(4 * filters, p + "3_conv")(y)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, start: int = 0, stop: int | None = None
    ) -> jax.Array:
        """Runs the network, or the stages ``[start, stop)`` of it (see :func:`keras_layers`).

        Args:
          x: images ``[N, H, W, 3]`` preprocessed as the weights expect (V1 ``'caffe'``, V2
            ``'tf'``), ``H, W >= 32`` (with ``start > 0``: the activation that stage
            ``start`` takes, as ``stop=start`` returns it).
          train: BatchNorm uses batch statistics and updates ``batch_stats`` (pass
            ``mutable=['batch_stats']``); otherwise it uses the running averages.
          start: first stage to run.
          stop: stage to stop before; ``None`` runs to the end (``num_stages(depth)``: the
            number of stages depends on the depth); a smaller one returns that stage's input.

        Returns:
          Logits ``[N, num_classes]`` with the top, else the feature map ``[N, h, w, 2048]``
          or, with pooling, features ``[N, 2048]``; with ``stop`` before the top, the
          activation.
        """
        name, last = keras_name(self.depth, self.preact), num_stages(self.depth)
        stop = last if stop is None else stop
        check_stage_call(name, x, start, stop, last, MIN_INPUT_SIZE)
        runs = lambda stage: start <= stage < stop

        if runs(0):
            x = self._stem(x, train)
        block = self._block_v2 if self.preact else self._block_v1
        for stage, spec in enumerate(block_specs(self.depth, self.preact), start=1):
            if runs(stage):
                x = block(spec, x, train)

        if not runs(last - 1):
            return x
        if self.preact:
            x = nn.relu(self._bn("post_bn", x, train))
        if self.include_top:
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
        return global_pool(x, self.pooling)


# The published files, as ``keras.applications.resnet`` (``BASE_WEIGHTS_PATH``,
# ``WEIGHTS_HASHES``: MD5 of the file with the top, then of the ``_notop`` one) downloads them.
BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
WEIGHTS_HASHES = {
    "resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    "resnet50v2": ("3ef43a0b657b3be2300d5770ece849e0", "fac2f116257151a9d068a22e544a4917"),
    "resnet101v2": ("6343647c601c52e1368623803854d971", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "resnet152v2": ("a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
}
# Resolutions: V1 at 224. V2 at 299: Keras's own accuracy table (keras-applications README,
# "Input" column) evaluates the V2 files at 299, as TF-slim's README prescribes for its
# resnet_v2 checkpoints ("use input image size of 299"), whose layout (stride in the last
# block, bias on conv1/_0_conv/_3_conv) Keras's V2 reproduces. (Keras's ``default_size`` is
# 224 for all six.)
# Licences: the V1 files are Kaiming He's Caffe models (keras-applications cites the
# ``ResNet-{50,101,152}-deploy.prototxt``), which Keras's README states are released under the
# MIT licence. For V2 Keras states no licence; they follow TF-slim's resnet_v2 (tensorflow/
# models, Apache-2.0), so "Apache-2.0" is inferred, not published.
# ImageNet top-1: keras.io/api/applications (single center crop, TF backend).
VARIANTS = (
    # name, Keras's file prefix, depth, preact, resolution, licence, top-1
    ("resnet50", "resnet50", 50, False, 224, "MIT", 0.749),
    ("resnet101", "resnet101", 101, False, 224, "MIT", 0.764),
    ("resnet152", "resnet152", 152, False, 224, "MIT", 0.766),
    ("resnet50_v2", "resnet50v2", 50, True, 299, "Apache-2.0", 0.760),
    ("resnet101_v2", "resnet101v2", 101, True, 299, "Apache-2.0", 0.772),
    ("resnet152_v2", "resnet152v2", 152, True, 299, "Apache-2.0", 0.780),
)
STAGE_NAMES = {name: stage_names(depth, preact) for name, _, depth, preact, *_ in VARIANTS}


def _weights(name: str, prefix: str, resolution: int, license: str) -> tuple[PretrainedSpec, ...]:
    return tuple(
        PretrainedSpec(
            model=name,
            url=f"{BASE_URL}{prefix}_weights_tf_dim_ordering_tf_kernels"
            f"{'' if include_top else '_notop'}.h5",
            input_size=resolution,
            include_top=include_top,
            file_hash=WEIGHTS_HASHES[prefix][0 if include_top else 1],
            license=license,
        )
        for include_top in (True, False)
    )


WEIGHTS = tuple(spec for name, prefix, _, _, size, lic, _ in VARIANTS
                for spec in _weights(name, prefix, size, lic))  # fmt: skip

BACKBONES = tuple(
    Backbone(
        name=name,
        keras_name=keras_name(depth, preact),
        module=functools.partial(ResNet, depth=depth, preact=preact),
        layers=functools.partial(keras_layers, depth=depth, preact=preact),
        stage_names=STAGE_NAMES[name],
        preprocessing="tf" if preact else "caffe",
        default_input_size=size,
        # The last stage (conv5: its three blocks hold the most task-specific features, at
        # 1/32 resolution), as the Keras blog's fine-tuning recipe (Chollet, "Building
        # powerful image classification models using very little data") unfreezes only the
        # last conv block of a pretrained base.
        default_fine_tune_at="conv5_block1",
        running_statistics=True,
        weights=tuple(spec for spec in WEIGHTS if spec.model == name),
        min_input_size=MIN_INPUT_SIZE,
        imagenet_top1=top1,
    )
    for name, _, depth, preact, size, _, top1 in VARIANTS
)
