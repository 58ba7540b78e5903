"""Convolutions whose arithmetic formulation is chosen per backend, and BatchNorm folding.

XLA:CPU lowers grouped (depthwise) convolutions to a slow generic loop (a 3x3 depthwise conv
on 32x40x40x192 takes ~0.9 s forward and ~18 s forward+backward as
``lax.conv_general_dilated(feature_group_count=C)`` on a 2-core AMD EPYC), while nine shifted
multiply-adds fuse into one vectorised loop. On GPU/TPU the convolution primitives (cuDNN, the
TPU conv unit) win. So ``conv_impl`` picks one of two exact formulations of the same sums:

``'lax'``
  the XLA convolution primitives (``feature_group_count=C`` for depthwise).
``'unrolled'``
  depthwise as ``kh * kw`` strided slices times per-channel weights, with a hand-written
  backward pass (the input gradient is one correlation of the zero-dilated output gradient
  with the flipped kernel instead of ``kh * kw`` padded copies, which autodiff of the slices
  gives); 1x1 convs as one 2-D matmul (the weight gradient is then a plain ``x.T @ g``, with
  no transpose copy of a 4-D activation). Dense k x k convs keep the convolution primitive
  (with :mod:`flaxcnn.compiler`'s options XLA:CPU runs them as Eigen's threaded
  convolutions, faster than an ``im2col`` weight gradient), except the forward pass of wide
  3x3 stride-1 convs, which is Winograd F(2x2, 3x3): 16 multiplies per 2x2 outputs instead of
  36, 0.60-0.98x the convolution's time (experiments/benchmarks/cpu-2core.md).
``'auto'``
  ``'unrolled'`` on CPU, ``'lax'`` elsewhere.

BatchNorm in inference mode is a per-channel affine map, so :class:`BatchNormAffine` hands
its ``(multiplier, offset)`` to the preceding conv, which applies both in the elementwise pass
after it: one pass over the activation fewer, forward and backward. Max pooling follows
``conv_impl`` too: ``'unrolled'`` takes the maximum of the window's strided slices (one loop
that XLA fuses with the padding before it), ``'lax'`` is ``reduce_window`` (which exporters
map to a pooling op). Parameters keep the names, shapes and initialisers of
``flax.linen.Conv`` / ``BatchNorm`` (``kernel`` of shape ``(kh, kw, 1, C)`` for depthwise,
``(1, 1, Cin, Cout)`` for pointwise; ``scale``, ``bias``, ``mean``, ``var``), so
checkpoints do not depend on the formulation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

CONV_IMPLS = ("auto", "lax", "unrolled")

Padding = str | Sequence[tuple[int, int]]
Pads = tuple[tuple[int, int], tuple[int, int]]
_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_conv_impl(conv_impl: str) -> str:
    """Maps ``'auto'`` to the fastest formulation for the default backend.

    Args:
      conv_impl: ``'auto'``, ``'lax'`` (XLA convolution primitives) or ``'unrolled'``
        (depthwise as shifted multiply-adds, 1x1 convs as matmuls, wide 3x3 convs by
        Winograd; see the module docstring).

    Returns:
      ``'lax'`` or ``'unrolled'``.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}; expected one of {CONV_IMPLS}")
    if conv_impl == "auto":
        # Measured: unrolled ~10x faster on XLA:CPU, 2x slower on an H200 (benchmarks/h200.md).
        return "unrolled" if jax.default_backend() == "cpu" else "lax"
    return conv_impl


def explicit_pads(
    padding: Padding, hw: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int]
) -> Pads:
    """``'SAME'`` / ``'VALID'`` / explicit pairs -> ``((top, bottom), (left, right))``."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(tuple(hw), tuple(kernel_size), tuple(strides), padding)
    else:
        pads = padding
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def _taps(xp: jax.Array, kh: int, kw: int, strides: Sequence[int], out_hw: Sequence[int]):
    """The ``kh * kw`` strided windows of a padded NHWC input that a VALID conv reads."""
    (sh, sw), (oh, ow) = strides, out_hw
    n, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            limit = (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c)
            yield i, j, lax.slice(xp, (0, i, j, 0), limit, (1, sh, sw, 1))


def _out_hw(hw: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Pads):
    return tuple(
        (h + lo + hi - k) // s + 1
        for h, k, s, (lo, hi) in zip(hw, kernel, strides, pads, strict=True)
    )


def _depthwise_taps(xp: jax.Array, kernel: jax.Array, strides, out_hw) -> jax.Array:
    """VALID depthwise conv of a padded input as a sum of weighted windows (one fused loop)."""
    out = None
    for i, j, window in _taps(xp, *kernel.shape[:2], strides, out_hw):
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_unrolled(x: jax.Array, kernel: jax.Array, strides: tuple, pads: Pads) -> jax.Array:
    out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
    return _depthwise_taps(jnp.pad(x, ((0, 0), *pads, (0, 0))), kernel, strides, out_hw)


def _depthwise_unrolled_fwd(x, kernel, strides, pads):
    return _depthwise_unrolled(x, kernel, strides, pads), (x, kernel)


def _depthwise_unrolled_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    n, h, w, c = x.shape
    oh, ow = g.shape[1:3]
    # The transposed conv: g dilated by the stride and zero-padded so that window (i, j) of
    # it, read at input resolution, holds the output gradient that tap (i, j) of every input
    # position contributed to. Then d/dx = sum_ij window_ij * k_ij (one fused loop) and
    # d/dk_ij = sum(window_ij * x): nothing of the forward pass is recomputed or stored.
    top, left = kh - 1 - pads[0][0], kw - 1 - pads[1][0]
    bottom = h + kh - 1 - top - ((oh - 1) * sh + 1)
    right = w + kw - 1 - left - ((ow - 1) * sw + 1)
    zero = jnp.zeros((), g.dtype)
    g_dilated = lax.pad(
        g, zero, ((0, 0, 0), (top, bottom, sh - 1), (left, right, sw - 1), (0, 0, 0))
    )
    dx, products = None, []
    for i in range(kh):
        for j in range(kw):
            start = (0, kh - 1 - i, kw - 1 - j, 0)
            window = lax.slice(g_dilated, start, (n, start[1] + h, start[2] + w, c))
            term = window * kernel[i, j, 0]
            dx = term if dx is None else dx + term
            products.append(window * x)
    # One variadic reduction reads x and g once for all taps (per-tap jnp.sum calls would each
    # materialise their product); spatial sums first, then the batch, for float32 accuracy.
    zeros = tuple(zero for _ in products)
    add = lambda a, b: tuple(p + q for p, q in zip(a, b, strict=True))
    spatial = lax.reduce(tuple(products), zeros, add, (1, 2))
    dk = jnp.stack([jnp.sum(s, axis=0) for s in spatial])
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_unrolled.defvjp(_depthwise_unrolled_fwd, _depthwise_unrolled_bwd)


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Pads, conv_impl: str = "auto"
) -> jax.Array:
    """Depthwise conv (depth multiplier 1) of NHWC ``x`` with a ``(kh, kw, 1, C)`` kernel.

    Args:
      x: ``[N, H, W, C]``.
      kernel: ``[kh, kw, 1, C]``.
      strides: ``(sh, sw)``.
      pads: ``((top, bottom), (left, right))`` zero padding.
      conv_impl: see :func:`resolve_conv_impl`.

    Returns:
      ``[N, H', W', C]``, equal to ``lax.conv_general_dilated(..., feature_group_count=C)``.
    """
    strides = tuple(int(s) for s in strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if resolve_conv_impl(conv_impl) == "lax":
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=_NHWC, feature_group_count=x.shape[-1]
        )
    return _depthwise_unrolled(x, kernel, strides, pads)


def pointwise_conv(x: jax.Array, kernel: jax.Array, conv_impl: str = "auto") -> jax.Array:
    """1x1 conv of NHWC ``x`` with a ``(1, 1, Cin, Cout)`` kernel (``'unrolled'``: a 2-D matmul).

    The matmul runs on ``x`` flattened to ``[N*H*W, Cin]`` so that the weight gradient is a
    plain ``x.T @ g``: on the 4-D activation XLA:CPU materialises a transposed copy of ``g``.
    """
    if resolve_conv_impl(conv_impl) == "lax":
        return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)
    rows = x.reshape(-1, x.shape[-1])
    return (rows @ kernel.reshape(kernel.shape[-2:])).reshape(*x.shape[:-1], kernel.shape[-1])


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 3x3 stride-1 conv over 4x4 input tiles taken
# every 2 pixels, as 16 matmuls over channels (one per tile position) between input transforms
# B^T d B and kernel transforms G g G^T, and the output transform A^T m A: 16 products per 2x2
# outputs instead of 36. The transform matrices hold only 0, +-1 and +-1/2.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
# Where it beats XLA:CPU's convolution (forward at batch 32, 2-core AVX-512 CPU,
# experiments/benchmarks/records-2026-12-03/winograd_shapes.txt): 0.60-0.98x of its time with
# >= 128 channels in and out (the wider, the more it gains); with 64 channels (ResNet's 56x56
# stage) its transforms, 4x the input in memory, cost what the products save or more
# (1.0-1.3x), as with few tiles (batch 1, 49 tiles: 1.5x; 392 tiles still gained, 0.75x, so
# the tile threshold is on the safe side). Odd sides would pad a row and a column of tiles
# (7x7: 1.3x the products, no gain).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_TILES = 512


def _combine(matrix, views: Sequence[jax.Array]) -> list[jax.Array]:
    """``matrix @ views`` for a small constant matrix: sums of (signed) arrays, fused by XLA."""
    out = []
    for row in matrix:
        pairs = [(c, v) for c, v in zip(row, views, strict=True) if c]
        terms = [v if c == 1 else -v if c == -1 else v * c for c, v in pairs]
        out.append(functools.reduce(jnp.add, terms))
    return out


def _strided_views(x: jax.Array, axis: int, count: int) -> list[jax.Array]:
    """Element ``k`` of every 4-tile along ``axis`` taken every 2: ``x[k::2][:count]``, k < 4."""
    return [lax.slice_in_dim(x, k, k + 2 * (count - 1) + 1, 2, axis) for k in range(4)]


def _winograd_applies(x: jax.Array, kernel: jax.Array, strides, pads) -> bool:
    n, h, w, c = x.shape
    return (
        kernel.shape[:2] == (3, 3) and tuple(strides) == (1, 1) and pads == ((1, 1), (1, 1))
        and x.dtype == jnp.float32 and min(c, kernel.shape[-1]) >= WINOGRAD_MIN_CHANNELS
        and h % 2 == 0 and w % 2 == 0 and n * (h // 2) * (w // 2) >= WINOGRAD_MIN_TILES
    )  # fmt: skip


def _conv_primitive(x, kernel, strides, pads):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC)


@jax.custom_vjp
def _winograd_3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 'SAME' 3x3 stride-1 conv of NHWC ``x`` (even sides) by Winograd F(2x2, 3x3)."""
    n, h, w, c = x.shape
    th, tw = h // 2, w // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    v = []
    for rows in _combine(_WINOGRAD_BT, _strided_views(xp, 1, th)):
        v += _combine(_WINOGRAD_BT, _strided_views(rows, 2, tw))
    v = jnp.stack(v).reshape(16, n * th * tw, c)
    u = []
    for rows in _combine(_WINOGRAD_G, list(kernel)):
        u += _combine(_WINOGRAD_G, [rows[j] for j in range(3)])
    m = lax.dot_general(v, jnp.stack(u), (((2,), (1,)), ((0,), (0,))))  # [16, tiles, out]
    m = m.reshape(4, 4, n, th, tw, -1)
    y = [_combine(_WINOGRAD_AT, [r[j] for j in range(4)]) for r in _combine(_WINOGRAD_AT, list(m))]
    y = jnp.stack([jnp.stack(row) for row in y])  # [2, 2, n, th, tw, out]
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, h, w, -1)


def _winograd_3x3_fwd(x, kernel):
    return _winograd_3x3(x, kernel), (x, kernel)


def _winograd_3x3_bwd(residuals, g):
    # The convolution's own gradients: autodiff through the transforms is 1.1-2x slower.
    _, vjp = jax.vjp(lambda a, k: _conv_primitive(a, k, (1, 1), ((1, 1), (1, 1))), *residuals)
    return vjp(g)


_winograd_3x3.defvjp(_winograd_3x3_fwd, _winograd_3x3_bwd)


def conv(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], pads: Pads, conv_impl: str = "auto"
) -> jax.Array:
    """Dense conv of NHWC ``x`` with an HWIO kernel.

    ``'lax'`` is the XLA convolution. ``'unrolled'`` is too, except for float32 3x3 stride-1
    'SAME' convs wide and large enough (:data:`WINOGRAD_MIN_CHANNELS`,
    :data:`WINOGRAD_MIN_TILES`, even sides), whose forward pass is Winograd F(2x2, 3x3) (the
    same sums up to float rounding, ~1e-6 of the output's scale; the backward pass is the
    convolution's).
    """
    strides = tuple(int(s) for s in strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if resolve_conv_impl(conv_impl) == "unrolled" and _winograd_applies(x, kernel, strides, pads):
        return _winograd_3x3(x, kernel)
    return _conv_primitive(x, kernel, strides, pads)


def _fold(kernel: jax.Array, y_fn, multiplier, offset):
    """Applies ``y_fn`` to the kernel, then scales per output channel and adds ``offset``.

    The scale goes on the output, inside the elementwise pass that adds the offset (and that
    XLA fuses with the activation after it), not on the kernel: scaled kernels would cost a
    pass over every weight on each call.
    """
    y = y_fn(kernel)
    if multiplier is not None:
        y = y * multiplier.astype(y.dtype)
    return y if offset is None else y + offset.astype(y.dtype)


def _bias(module: nn.Module, features: int) -> jax.Array | None:
    """The conv's ``bias`` parameter (zeros-initialised, as ``flax.linen.Conv``), if it has one."""
    if not module.use_bias:
        return None
    return module.param("bias", nn.initializers.zeros, (features,), module.param_dtype)


def _with_bias(offset, bias, multiplier):
    """``conv(x) + bias``, then an affine map: the bias folds into the map's offset."""
    if bias is None:
        return offset
    if offset is None:
        return bias
    return offset + bias * (1 if multiplier is None else multiplier)


class Conv2D(nn.Module):
    """Dense 2-D conv, NHWC; parameters as ``flax.linen.Conv``'s.

    Attributes:
      features: output channels.
      kernel_size: spatial size of the filter.
      strides: spatial strides.
      padding: ``'SAME'``, ``'VALID'`` or explicit ``((top, bottom), (left, right))``.
      use_bias: whether to add a bias.
      conv_impl: see :func:`resolve_conv_impl`.
      dtype: computation dtype (``None``: from inputs and params).
      param_dtype: parameter dtype.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    use_bias: bool = False
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, multiplier=None, offset=None) -> jax.Array:
        """Convolves ``x``; ``multiplier``/``offset`` (per output channel) fold a BatchNorm in."""
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = _bias(self, self.features)
        pads = explicit_pads(self.padding, x.shape[1:3], self.kernel_size, self.strides)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        fn = lambda k: conv(x, k.astype(x.dtype), self.strides, pads, self.conv_impl)
        return _fold(kernel, fn, multiplier, _with_bias(offset, bias, multiplier))


class DepthwiseConv2D(nn.Module):
    """Depthwise 2-D convolution (one filter per channel, depth multiplier 1), NHWC.

    Attributes:
      kernel_size: spatial size of the filter.
      strides: spatial strides.
      padding: ``'SAME'``, ``'VALID'`` or explicit ``((top, bottom), (left, right))``.
      use_bias: whether to add a per-channel bias.
      conv_impl: see :func:`resolve_conv_impl`.
      dtype: computation dtype (``None``: from inputs and params).
      param_dtype: parameter dtype.
    """

    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = "SAME"
    use_bias: bool = False
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, multiplier=None, offset=None) -> jax.Array:
        """Convolves ``x``; ``multiplier``/``offset`` (per channel) fold a BatchNorm in."""
        channels = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, 1, channels),
            self.param_dtype,
        )
        bias = _bias(self, channels)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pads = explicit_pads(self.padding, x.shape[1:3], self.kernel_size, self.strides)
        fn = lambda k: depthwise_conv(x, k.astype(x.dtype), self.strides, pads, self.conv_impl)
        return _fold(kernel, fn, multiplier, _with_bias(offset, bias, multiplier))


class PointwiseConv(nn.Module):
    """1x1 convolution, NHWC; ``'unrolled'`` runs it as a matmul over the channel axis.

    Attributes:
      features: output channels.
      use_bias: whether to add a bias.
      conv_impl: see :func:`resolve_conv_impl`.
      dtype: computation dtype (``None``: from inputs and params).
      param_dtype: parameter dtype.
    """

    features: int
    use_bias: bool = False
    conv_impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, multiplier=None, offset=None) -> jax.Array:
        """Convolves ``x``; ``multiplier``/``offset`` (per output channel) fold a BatchNorm in."""
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (1, 1, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = _bias(self, self.features)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        fn = lambda k: pointwise_conv(x, k.astype(x.dtype), self.conv_impl)
        return _fold(kernel, fn, multiplier, _with_bias(offset, bias, multiplier))


class BatchNormAffine(nn.Module):
    """An inference-mode ``flax.linen.BatchNorm`` as its per-channel ``(multiplier, offset)``.

    It declares exactly the variables of ``nn.BatchNorm`` (params ``scale``, ``bias``;
    batch_stats ``mean``, ``var``), so a module can use it under the BatchNorm's name when
    running averages are used, and fold ``y = x * multiplier + offset`` into the preceding
    linear layer: ``multiplier = scale / sqrt(var + epsilon)``,
    ``offset = bias - mean * multiplier`` (Keras's own inference formula).

    Attributes:
      epsilon: added to the variance.
      param_dtype: dtype of ``scale`` and ``bias``.
    """

    epsilon: float = 1e-3
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        shape = (features,)
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
        multiplier = scale * lax.rsqrt(var.value + self.epsilon)
        return multiplier, bias - mean.value * multiplier


def conv_batch_norm(
    conv: nn.Module,
    x: jax.Array,
    *,
    name: str,
    train: bool,
    fold: bool = True,
    epsilon: float = 1e-3,
    momentum: float = 0.99,
    dtype: Any = None,
) -> jax.Array:
    """``conv(x)`` then the Keras ``BatchNormalization`` called ``name``, inside a compact module.

    In training it is ``flax.linen.BatchNorm`` on batch statistics (Keras and Flax share the
    EMA convention for ``momentum``; PyTorch's is reversed). With running averages and
    ``fold`` it is folded into the conv (:class:`BatchNormAffine`): the same variables, the
    same outputs up to float rounding, one pass over the activation fewer.

    Args:
      conv: a :class:`Conv2D`, :class:`DepthwiseConv2D` or :class:`PointwiseConv`.
      x: its input.
      name: the Keras name of the BatchNorm layer.
      train: batch statistics (updating ``batch_stats``) or running averages.
      fold: fold the inference-mode BatchNorm into the conv.
      epsilon: Keras's ``epsilon`` of that layer (Keras's default is 1e-3).
      momentum: Keras's ``momentum`` of that layer (Keras's default is 0.99).
      dtype: computation dtype.
    """
    if train or not fold:
        bn = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                          dtype=dtype, name=name)  # fmt: skip
        return bn(conv(x))
    features = getattr(conv, "features", None) or x.shape[-1]  # depthwise keeps channels
    multiplier, offset = BatchNormAffine(epsilon=epsilon, name=name)(features)
    return conv(x, multiplier, offset)


def max_pool(x: jax.Array, window: int, stride: int, conv_impl: str = "auto") -> jax.Array:
    """A ``window x window`` VALID max pool of NHWC ``x`` with stride ``stride``."""
    if resolve_conv_impl(conv_impl) == "lax":
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")
    shape, strides = (window, window), (stride, stride)
    out_hw = _out_hw(x.shape[1:3], shape, strides, ((0, 0), (0, 0)))
    windows = (w for *_, w in _taps(x, *shape, strides, out_hw))
    return functools.reduce(jnp.maximum, windows)


def global_pool(x: jax.Array, pooling: str | None) -> jax.Array:
    """Keras's ``GlobalAveragePooling2D`` (``'avg'``) or ``GlobalMaxPooling2D`` (``'max'``) of
    an NHWC map, or the map itself (``None``): the ``pooling`` of a model without its top."""
    if pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
    if pooling == "max":
        return jnp.max(x, axis=(1, 2))
    if pooling is None:
        return x
    raise ValueError(f"pooling={pooling!r}; expected None, 'avg' or 'max'")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Keras's ``_make_divisible`` (the MobileNets' channel rounding): the nearest multiple of
    ``divisor``, at least ``divisor``, losing at most 10% of ``value``."""
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
