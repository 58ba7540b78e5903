"""flaxcnn.compiler: its options reach the product's compilations, and only those."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from flaxcnn import bench, compiler
from flaxcnn.models.simple_cnn import SimpleCNN

cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _placement(hlo: str) -> dict[str, set[str]]:
    """Where compiled HLO runs each convolution and dot: ``'ynn'`` (in a YNNPACK fusion) or
    ``'xla'`` (XLA:CPU's own thunks: Eigen)."""
    bodies, current, ops = {}, None, []
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = bodies.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    ynn = {re.search(r"calls=%([\w.\-]+)", line).group(1)
           for body in bodies.values() for line in body if '"__ynn_fusion"' in line}  # fmt: skip
    placement = {"convolution": set(), "dot": set()}
    for name, body in bodies.items():
        for line in body:
            ops = re.search(r"\} (convolution|dot)\(", line)
            if ops:
                placement[ops.group(1)].add("ynn" if name in ynn else "xla")
    return placement


def _conv_then_dot(x, kernel, matrix):
    nhwc = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=nhwc)
    return y.reshape(-1, y.shape[-1]) @ matrix


# Big enough for YNNPACK's cost model to take the convolution (it leaves 2x8x8x4 to XLA).
ARGS = (jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((32, 5)))


@cpu_only
def test_convolutions_leave_ynnpack_and_dots_stay():
    if not compiler.options():
        pytest.skip("this jaxlib has no YNNPACK fusion option (nothing to change)")
    plain = _placement(jax.jit(_conv_then_dot).lower(*ARGS).compile().as_text())
    ours = _placement(compiler.jit(_conv_then_dot).lower(*ARGS).compile().as_text())
    # The default that the module exists for; should jaxlib stop handing convolutions to
    # YNNPACK, this fails and the option is to be measured again (cpu-2core.md).
    assert plain == {"convolution": {"ynn"}, "dot": {"ynn"}}
    assert ours == {"convolution": {"xla"}, "dot": {"ynn"}}


@cpu_only
def test_the_product_steps_compile_with_the_options():
    if not compiler.options():
        pytest.skip("this jaxlib has no YNNPACK fusion option (nothing to change)")
    step = bench.build_step("simple_cnn", 32)  # phases.setup -> train.make_steps, as fit runs
    assert _placement(step.compiled.as_text())["convolution"] == {"xla"}
    # The same network and batch under a plain jax.jit: YNNPACK would take its convolutions
    # (those with more than 3 input channels).
    net = SimpleCNN()
    images = jnp.ones((32, bench.SIMPLE_CNN_SIZE, bench.SIMPLE_CNN_SIZE, 3))
    variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), images)
    plain = jax.jit(net.apply).lower(variables, images).compile().as_text()
    assert "ynn" in _placement(plain)["convolution"]


def test_no_options_off_cpu_or_when_xla_flags_set_them(monkeypatch):
    assert compiler.options("gpu") == {} and compiler.options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", f"--{compiler.YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_DOT")
    assert compiler.options("cpu") == {}  # the user's own setting wins


@cpu_only
def test_an_option_this_jaxlib_does_not_know_is_left_out():
    assert not compiler._jaxlib_accepts("xla_cpu_no_such_option", "1")
    assert not compiler._jaxlib_accepts(compiler.YNN_FUSION_OPTION, "NOT_A_FUSION_TYPE")
