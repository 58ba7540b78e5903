"""Every conv formulation computes lax.conv_general_dilated's sums, forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
from tolerances import assert_close

from flaxcnn.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")
# Bounds relative to the reference's largest magnitude (tests/tolerances.py). Each output is
# the same sum of products in another order: a sum of n float32 terms rounds to ~eps*sqrt(n)
# of the terms' scale. Forward sums have n <= 27 (3x3x3): 1e-6 (8 eps) [measured <= 2.4e-8;
# most formulations bit-equal]. Gradients with respect to a kernel sum over batch x output
# positions, n <= 200: eps*sqrt(200) = 1.7e-6, bound 1e-5 [measured <= 3.2e-7, 31x below]. A
# wrong tap, stride, pad or transpose is off by ~1/sqrt(n), i.e. 7e-2 or more.
FORWARD_RTOL = 1e-6
GRAD_RTOL = 1e-5


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _check_fn_and_grads(fn, reference, x, kernel):
    """Outputs and d(sum(out * r))/d(x, kernel) of ``fn`` equal those of ``reference``."""

    def outputs_and_grads(f, r):
        out, vjp = jax.vjp(f, x, kernel)
        return out, vjp(r)  # a random cotangent, so that every output position counts

    shape = jax.eval_shape(reference, x, kernel).shape
    r = _random(shape, 7)
    want, want_grads = jax.jit(lambda r: outputs_and_grads(reference, r))(r)
    got, got_grads = jax.jit(lambda r: outputs_and_grads(fn, r))(r)
    assert_close(got, want, FORWARD_RTOL, what="forward")
    for name, g, w in zip(("d/dx", "d/dkernel"), got_grads, want_grads, strict=True):
        assert_close(g, w, GRAD_RTOL, what=name)


DEPTHWISE_CASES = [
    # (N, H, W, C), kernel, strides, padding
    ((2, 8, 8, 5), (3, 3), (1, 1), "SAME"),
    ((2, 9, 7, 4), (3, 3), (1, 1), "SAME"),
    ((2, 8, 8, 5), (3, 3), (2, 2), ((0, 1), (0, 1))),  # Keras correct_pad, even size
    ((1, 9, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # Keras correct_pad, odd size
    ((2, 10, 7, 6), (3, 3), (2, 2), "SAME"),
    ((2, 7, 8, 3), (3, 3), (2, 1), "VALID"),
    ((1, 9, 9, 4), (5, 5), (2, 2), ((2, 1), (0, 3))),
    ((1, 6, 5, 2), (1, 3), (1, 1), "SAME"),
]


@pytest.mark.parametrize(("shape", "kernel_size", "strides", "padding"), DEPTHWISE_CASES)
@pytest.mark.parametrize("conv_impl", ["lax", "unrolled"])
def test_depthwise_equals_grouped_conv(shape, kernel_size, strides, padding, conv_impl):
    x = _random(shape, 0)
    kernel = _random((*kernel_size, 1, shape[-1]), 1)
    pads = layers.explicit_pads(padding, shape[1:3], kernel_size, strides)
    reference = lambda a, k: lax.conv_general_dilated(
        a, k, strides, pads, dimension_numbers=NHWC, feature_group_count=shape[-1],
        precision=lax.Precision.HIGHEST,
    )  # fmt: skip
    fn = lambda a, k: layers.depthwise_conv(a, k, strides, pads, conv_impl)
    _check_fn_and_grads(fn, reference, x, kernel)


@pytest.mark.parametrize("conv_impl", ["lax", "unrolled"])
def test_pointwise_equals_1x1_conv(conv_impl):
    x, kernel = _random((2, 5, 7, 6), 0), _random((1, 1, 6, 9), 1)
    reference = lambda a, k: lax.conv_general_dilated(
        a, k, (1, 1), "VALID", dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
    )
    _check_fn_and_grads(lambda a, k: layers.pointwise_conv(a, k, conv_impl), reference, x, kernel)


@pytest.mark.parametrize(
    ("shape", "strides", "padding"),
    [
        ((2, 10, 10, 3), (2, 2), "SAME"),
        ((2, 9, 8, 3), (2, 2), "SAME"),
        ((1, 7, 9, 2), (1, 1), "VALID"),
    ],
)
@pytest.mark.parametrize("conv_impl", ["lax", "unrolled"])
def test_dense_conv_equals_conv(shape, strides, padding, conv_impl):
    x, kernel = _random(shape, 0), _random((3, 3, shape[-1], 8), 1)
    pads = layers.explicit_pads(padding, shape[1:3], (3, 3), strides)
    reference = lambda a, k: lax.conv_general_dilated(
        a, k, strides, pads, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
    )
    _check_fn_and_grads(
        lambda a, k: layers.conv(a, k, strides, pads, conv_impl), reference, x, kernel
    )


# Winograd F(2x2, 3x3) computes each output from 16 products of transformed 4x4 tiles and
# kernels, summed over C channels: the transforms add up to 4 input values and 9 kernel taps
# (halved) and the output transform 9 products, so rounding errors carry up to ~8x a plain
# product's size: ~eps * 8 * sqrt(9 * C) = 3e-5 of one product for C = 128, while the output's
# largest magnitude is a few times sqrt(9 * C) = 34 products (random signs), i.e. ~1e-6 of it.
# Bound 1e-5 [measured 4.8e-7 here; 4.3e-7 to 7.6e-7 over the shapes of
# records-2026-12-03/winograd_shapes.txt]. A wrong tile offset or coefficient is off by 1e-1.
WINOGRAD_RTOL = 1e-5


def test_winograd_conv_equals_conv_and_takes_its_gradients():
    """The 3x3 stride-1 convs that qualify run Winograd F(2x2, 3x3) forward (the jaxpr holds
    it) and give the convolution's outputs; their gradients are the convolution's own."""
    shape, pads = (8, 16, 12, 128), ((1, 1), (1, 1))  # 8 * 8 * 6 = 384 tiles
    x, kernel = _random(shape, 0), _random((3, 3, 128, 136), 1) / 30
    reference = lambda a, k: lax.conv_general_dilated(
        a, k, (1, 1), pads, dimension_numbers=NHWC, precision=lax.Precision.HIGHEST
    )
    fn = lambda a, k: layers.conv(a, k, (1, 1), pads, "unrolled")
    assert "_winograd_3x3" not in str(jax.make_jaxpr(fn)(x, kernel))  # below WINOGRAD_MIN_TILES
    x = jnp.concatenate([x, x[::-1] * 0.5])  # 768 tiles
    assert "_winograd_3x3" in str(jax.make_jaxpr(fn)(x, kernel))
    want, want_vjp = jax.jit(lambda a, k: jax.vjp(reference, a, k))(x, kernel)
    got, got_vjp = jax.jit(lambda a, k: jax.vjp(fn, a, k))(x, kernel)
    assert_close(got, want, WINOGRAD_RTOL, what="forward")
    r = _random(want.shape, 7)
    for name, g, w in zip(("d/dx", "d/dkernel"), got_vjp(r), want_vjp(r), strict=True):
        assert_close(g, w, GRAD_RTOL, what=name)


@pytest.mark.parametrize(
    ("shape", "strides", "pads", "dtype"),
    [
        ((16, 15, 16, 128), (1, 1), ((1, 1), (1, 1)), jnp.float32),  # odd side
        ((16, 16, 16, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32),  # too few channels
        ((16, 16, 16, 128), (2, 2), ((1, 1), (1, 1)), jnp.float32),  # strided
        ((16, 16, 16, 128), (1, 1), ((0, 0), (0, 0)), jnp.float32),  # VALID
        ((16, 16, 16, 128), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16),  # transforms would round
    ],
)
def test_winograd_only_where_it_applies(shape, strides, pads, dtype):
    x, kernel = jnp.zeros(shape, dtype), jnp.zeros((3, 3, shape[-1], 128), dtype)
    for impl in ("unrolled", "lax"):
        jaxpr = jax.make_jaxpr(lambda a, k, impl=impl: layers.conv(a, k, strides, pads, impl))
        assert "_winograd_3x3" not in str(jaxpr(x, kernel))
    assert "_winograd_3x3" in str(jax.make_jaxpr(
        lambda a, k: layers.conv(a, k, (1, 1), ((1, 1), (1, 1)), "unrolled")
    )(jnp.zeros((16, 16, 16, 128)), jnp.zeros((3, 3, 128, 128))))  # fmt: skip


def test_auto_resolves_per_backend():
    expected = "unrolled" if jax.default_backend() == "cpu" else "lax"
    assert layers.resolve_conv_impl("auto") == expected
    assert layers.resolve_conv_impl("lax") == "lax"
    with pytest.raises(ValueError, match="conv_impl='cudnn'"):
        layers.resolve_conv_impl("cudnn")


def test_modules_match_flax_parameter_layout():
    x = _random((1, 6, 6, 4), 0)
    rng = jax.random.PRNGKey(0)
    init = lambda module, *args: jax.jit(module.init)(rng, *args)
    ours = init(layers.Conv2D(8, (3, 3), strides=(2, 2)), x)
    flax_conv = init(nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False), x)
    np.testing.assert_array_equal(ours["params"]["kernel"], flax_conv["params"]["kernel"])
    shapes = lambda module: jax.tree.map(
        lambda a: a.shape, jax.eval_shape(module.init, rng, x)["params"]
    )
    assert shapes(layers.DepthwiseConv2D()) == {"kernel": (3, 3, 1, 4)}
    assert shapes(layers.PointwiseConv(7, use_bias=True)) == {"kernel": (1, 1, 4, 7), "bias": (7,)}


def test_batch_norm_affine_has_batch_norm_variables_and_folds_exactly():
    x = _random((2, 6, 6, 4), 0)
    bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3)
    reference_vars = jax.jit(bn.init)(jax.random.PRNGKey(0), x)
    ours = jax.jit(layers.BatchNormAffine(epsilon=1e-3).init, static_argnums=1)(
        jax.random.PRNGKey(0), 4
    )
    assert jax.tree.structure(ours) == jax.tree.structure(reference_vars)
    for want, got in zip(jax.tree.leaves(reference_vars), jax.tree.leaves(ours), strict=True):
        np.testing.assert_array_equal(got, want)

    rng = np.random.default_rng(3)
    variables = {
        "params": {"scale": rng.uniform(0.5, 1.5, 4), "bias": rng.normal(0, 0.1, 4)},
        "batch_stats": {"mean": rng.normal(0, 0.1, 4), "var": rng.uniform(0.5, 1.5, 4)},
    }
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    conv = layers.DepthwiseConv2D(conv_impl="unrolled", use_bias=True)
    conv_vars = {"params": {"kernel": _random((3, 3, 1, 4), 1), "bias": _random((4,), 2)}}

    @jax.jit
    def folded_and_unfolded(x):
        multiplier, offset = layers.BatchNormAffine(epsilon=1e-3).apply(variables, 4)
        folded = conv.apply(conv_vars, x, multiplier, offset)
        return folded, bn.apply(variables, conv.apply(conv_vars, x))

    # Folding reassociates ~4 roundings per output (scale, offset, rsqrt, the add), each of
    # <= eps/2 of the output's magnitude: 1e-6 (8 eps) [measured 1.2e-7].
    assert_close(*folded_and_unfolded(x), 1e-6, what="folded BatchNorm")


POOL_CASES = [((13, 11), 3, 2), ((8, 8), 2, 2), ((9, 7), 3, 1)]  # odd, even, stride 1


@pytest.mark.parametrize(("hw", "window", "stride"), POOL_CASES)
def test_unrolled_max_pool_equals_reduce_window(hw, window, stride):
    """The maximum of the strided windows is ``reduce_window``'s, bit for bit (a max does not
    round), and so is its gradient: with continuous random inputs a window has no ties, so
    both send each output's cotangent to the same input element."""
    x = _random((2, *hw, 5), 0)
    pools = {impl: jax.jit(lambda x, impl=impl: layers.max_pool(x, window, stride, impl))
             for impl in ("lax", "unrolled")}  # fmt: skip
    outs = {impl: jax.vjp(fn, x) for impl, fn in pools.items()}
    r = _random(outs["lax"][0].shape, 1)
    np.testing.assert_array_equal(outs["unrolled"][0], outs["lax"][0])
    np.testing.assert_array_equal(outs["unrolled"][1](r)[0], outs["lax"][1](r)[0])
    assert outs["lax"][0].shape == (2, (hw[0] - window) // stride + 1,
                                    (hw[1] - window) // stride + 1, 5)  # fmt: skip
