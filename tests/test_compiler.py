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


def _skip_without_the_option():
    if not compiler.options(differentiated=True):
        pytest.skip("this jaxlib has no YNNPACK fusion option (nothing to change)")


@cpu_only
def test_convolutions_leave_ynnpack_and_only_training_keeps_its_dots():
    _skip_without_the_option()
    compiled = lambda jit, **kw: _placement(jit(_conv_then_dot, **kw).lower(*ARGS).compile()
                                            .as_text())  # fmt: skip
    # The default that the module exists for; should jaxlib stop handing convolutions to
    # YNNPACK, this fails and the options are to be measured again (cpu-2core.md).
    assert compiled(jax.jit) == {"convolution": {"ynn"}, "dot": {"ynn"}}
    assert compiled(compiler.jit, differentiated=True) == {"convolution": {"xla"},
                                                           "dot": {"ynn"}}  # fmt: skip
    assert compiled(compiler.jit) == {"convolution": {"xla"}, "dot": {"xla"}}


@cpu_only
def test_the_product_steps_compile_with_the_options():
    _skip_without_the_option()
    # phases.setup -> train.make_steps, as fit runs: a training step and an evaluation step.
    training = _placement(bench.build_step("simple_cnn", 32).compiled.as_text())
    assert training["convolution"] == {"xla"} and "ynn" in training["dot"]  # small dots: XLA
    evaluation = bench.build_step("inference", 32, model="resnet50", image_size=32)
    assert _placement(evaluation.compiled.as_text()) == {"convolution": {"xla"}, "dot": {"xla"}}
    # Fine-tuning: the frozen stages are an inference computation, the rest a training one.
    finetune = bench.build_step("finetune", 32, model="resnet50", image_size=32).compiled
    assert _placement(finetune.features.as_text()) == {"convolution": {"xla"}, "dot": {"xla"}}
    assert "ynn" in _placement(finetune.step.as_text())["dot"]
    # The same network and batch under a plain jax.jit: YNNPACK would take its convolutions
    # (those with more than 3 input channels).
    net = SimpleCNN()
    images = jnp.ones((32, bench.SIMPLE_CNN_SIZE, bench.SIMPLE_CNN_SIZE, 3))
    variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), images)
    plain = jax.jit(net.apply).lower(variables, images).compile().as_text()
    assert "ynn" in _placement(plain)["convolution"]


def test_no_options_off_cpu_or_when_xla_flags_set_them(monkeypatch):
    for differentiated in (False, True):
        assert compiler.options("gpu", differentiated=differentiated) == {}
        assert compiler.options("tpu", differentiated=differentiated) == {}
    monkeypatch.setenv("XLA_FLAGS", f"--{compiler.YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_DOT")
    for differentiated in (False, True):  # the user's own setting wins
        assert compiler.options("cpu", differentiated=differentiated) == {}


@cpu_only
def test_an_option_this_jaxlib_does_not_know_is_left_out():
    assert not compiler._jaxlib_accepts("xla_cpu_no_such_option", "1")
    assert not compiler._jaxlib_accepts(compiler.YNN_FUSION_OPTION, "NOT_A_FUSION_TYPE")
