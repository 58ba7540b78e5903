"""Convolutions whose arithmetic formulation is chosen per backend.

XLA:CPU lowers grouped (depthwise) convolutions to a slow generic loop: a 3x3 depthwise conv
on 32x40x40x192 takes ~220 ms as ``lax.conv_general_dilated(feature_group_count=C)`` and
~25 ms as nine shifted multiply-adds, and a 1x1 conv runs about twice as fast as a matmul.
On GPU/TPU the convolution primitives (cuDNN, the TPU conv unit) win. Both formulations
compute the same sums, keep the same parameter names and shapes as ``flax.linen.Conv``
(``kernel`` of shape ``(kh, kw, 1, C)`` for depthwise, ``(1, 1, Cin, Cout)`` for pointwise),
so checkpoints do not depend on which one ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

CONV_IMPLS = ("auto", "lax", "unrolled")

Padding = str | Sequence[tuple[int, int]]


def resolve_conv_impl(conv_impl: str) -> str:
    """Maps ``'auto'`` to the fastest formulation for the default backend.

    Args:
      conv_impl: ``'auto'``, ``'lax'`` (XLA convolution primitives) or ``'unrolled'``
        (depthwise as shifted multiply-adds, 1x1 as matmul).

    Returns:
      ``'lax'`` or ``'unrolled'``.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}; expected one of {CONV_IMPLS}")
    if conv_impl == "auto":
        return "unrolled" if jax.default_backend() == "cpu" else "lax"
    return conv_impl


def _depthwise_unrolled(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """VALID depthwise conv of an already padded NHWC input as kh*kw strided slices."""
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    n, h, w, c = x.shape
    out_h = (h - kh) // sh + 1
    out_w = (w - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(
                x,
                (0, i, j, 0),
                (n, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c),
                (1, sh, sw, 1),
            )
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


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
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, 1, channels),
            self.param_dtype,
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if isinstance(self.padding, str):
            pads = lax.padtype_to_pads(x.shape[1:3], self.kernel_size, self.strides, self.padding)
        else:
            pads = tuple(self.padding)
        if resolve_conv_impl(self.conv_impl) == "lax":
            y = lax.conv_general_dilated(
                x,
                kernel,
                window_strides=self.strides,
                padding=pads,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )
        else:
            if any(p != (0, 0) for p in pads):
                x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
            y = _depthwise_unrolled(x, kernel, self.strides)
        return y if bias is None else y + bias


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
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (1, 1, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if resolve_conv_impl(self.conv_impl) == "lax":
            y = lax.conv_general_dilated(
                x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            y = lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias
