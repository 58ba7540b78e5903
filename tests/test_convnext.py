"""ConvNeXt is Keras's ConvNeXt: same layers, same counts, same outputs, for all five variants.

Keras's models are expensive (XLarge: 350M weights, a 1.4 GB ``.h5``), so each is built once,
with random non-trivial weights, for one (variant, top, pooling) case; what the tests need from
it (the file, inputs and outputs, ``count_params()``, layer names) is kept and the model freed.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import pathlib
import re

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from keras_reference import randomize_weights, save_legacy_h5
from tolerances import assert_close

from flaxcnn import checkpoints, data, pretrained
from flaxcnn.models import convnext, get_backbone, random_variables
from flaxcnn.models.convnext import ConvNeXt, LayerScale, num_stages
from flaxcnn.weights import WeightsError, load_keras_h5, read_keras_h5

VARIANTS = tuple(convnext.MODEL_CONFIGS)
BACKBONES = {variant: get_backbone(f"convnext_{variant}") for variant in VARIANTS}

# (variant, include_top, pooling, input (height, width)): the minimum, odd and non-square
# sizes, with and without the top, every pooling; one Keras model per variant.
PARITY_CASES = [
    ("tiny", True, None, (32, 32)),
    ("tiny", False, None, (57, 77)),
    ("small", False, "max", (32, 40)),
    ("base", False, "avg", (33, 32)),
    ("large", True, None, (32, 32)),
    ("xlarge", False, "avg", (32, 32)),
]
# One forward pass each (CPU's default formulation); their .h5 files (0.8 and 1.4 GB) are
# deleted once compared. The formulations differ in no way that depends on the width or depth
# (tiny, small and base test both), and compiling a 38-stage net twice costs ~10 s more.
BIG = {"large": ("unrolled",), "xlarge": ("unrolled",)}

# Parity bound, as a fraction of the Keras output's largest magnitude. Both sides run the same
# float32 operations in other orders (XLA's kernels against oneDNN's), so they differ by
# rounding; LayerNorm renormalises the residual stream in every block, so nothing amplifies
# it (no BatchNorm dividing by small variances). Measured <= 2.7e-6 over PARITY_CASES and both
# formulations (~23 float32 eps, the most for XLarge's 8192-term pointwise sums); 2e-5 (~170
# eps) leaves a 7x margin for other CPUs' kernels and sits below Keras's own oneDNN-vs-Eigen
# spread on real MobileNetV2 features (2.3e-5). A wrong layer, weight or padding is off by
# >1e-2 of the magnitude, the tanh GELU by 3e-4; LayerNorm's epsilon (1e-5 instead of 1e-6:
# 2.5e-5 here) and variance formula are checked directly in test_layer_norm_is_keras_s.
RTOL = 2e-5


@dataclasses.dataclass
class KerasCase:
    """What one Keras model gave: its weights file, inputs, outputs, counts and layer names."""

    variant: str
    include_top: bool
    pooling: str | None
    path: pathlib.Path
    pixels: np.ndarray
    expected: np.ndarray
    count_params: int
    layer_names: list[str]
    head_dense_params: int  # Keras's Dense(1000) on the last stage's channels


def _keras_case(variant, include_top, pooling, hw, directory, seed) -> KerasCase:
    import tensorflow as tf
    import tf_keras

    tf.config.set_visible_devices([], "GPU")
    application = getattr(tf_keras.applications, BACKBONES[variant].keras_name)
    # The default include_preprocessing=True: the model takes pixels in [0, 255].
    model = application(weights=None, include_top=include_top, pooling=pooling,
                        input_shape=(*hw, 3) if include_top else (None, None, 3),
                        classifier_activation=None)  # fmt: skip
    randomize_weights(model, seed)
    path = save_legacy_h5(model, directory / f"{variant}_{include_top}_{pooling}.h5")
    pixels = np.random.default_rng(seed).uniform(0, 255, (2, *hw, 3)).astype(np.float32)
    head = tf_keras.layers.Dense(1000)
    head.build((None, convnext.MODEL_CONFIGS[variant][1][-1]))
    case = KerasCase(variant, include_top, pooling, path, pixels,
                     model(pixels, training=False).numpy(), model.count_params(),
                     [layer.name for layer in model.layers], head.count_params())  # fmt: skip
    del model
    gc.collect()
    return case


@pytest.fixture(scope="module")
def keras_case(tmp_path_factory):
    """``keras_case(variant, include_top, pooling, hw)``: memoised :class:`KerasCase`."""
    directory, made = tmp_path_factory.mktemp("convnext"), {}

    def get(variant, include_top, pooling, hw):
        key = (variant, include_top, pooling, hw)
        if key not in made:
            made[key] = _keras_case(*key, directory, seed=len(made))
        return made[key]

    return get


def _case_of(variant: str) -> tuple:
    return next(c for c in PARITY_CASES if c[0] == variant)


def _without_counter(name: str) -> str:
    """Keras's per-session numbering of the layers it names itself, removed (the input layer
    is listed as a fresh session's ``input_1``, as for MobileNetV2)."""
    name = re.sub(r"^input_\d+$", "input_1", name)
    auto_named = r"tf\.__operators__\.add|layer_normalization|global_(average|max)_pooling2d"
    return re.sub(rf"^({auto_named})_\d+$", r"\1", name)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, hw=(32, 32)):
    model = model.clone(conv_impl="lax")  # the same variables; tracing 49-tap loops is slower
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *hw, 3)))


@pytest.mark.parametrize(("variant", "include_top", "pooling", "hw"), PARITY_CASES)
def test_outputs_equal_keras(keras_case, variant, include_top, pooling, hw):
    case = keras_case(variant, include_top, pooling, hw)
    assert np.abs(case.expected).mean() > 0.1  # outputs of order 1, not a vanishing signal
    images = data.scale_images(case.pixels, get_backbone(f"convnext_{variant}").preprocessing)
    try:
        for conv_impl in BIG.get(variant, ("lax", "unrolled")):
            model, variables = pretrained.create(
                f"convnext_{variant}", weights=case.path, input_size=hw, include_top=include_top,
                pooling=pooling, conv_impl=conv_impl)  # fmt: skip
            got = np.asarray(jax.jit(model.apply)(variables, images))
            assert got.shape == case.expected.shape
            assert_close(got, case.expected, RTOL, what=f"{variant} {conv_impl}")
            del variables
    finally:
        if variant in BIG:
            case.path.unlink()


@pytest.mark.parametrize("variant", VARIANTS)
def test_variable_counts_and_layers_equal_keras(keras_case, variant):
    """Counts with and without the top (one from the Keras model of the variant's case, the
    other from it and Keras's own Dense(1000): the two Keras models differ by that layer, the
    top's LayerNorm and the no-top one having the same size); layer lists modulo counters."""
    _, include_top, pooling, hw = _case_of(variant)
    case = keras_case(variant, include_top, pooling, hw)
    with_top = case.count_params + (0 if include_top else case.head_dense_params)
    counts = {True: with_top, False: with_top - case.head_dense_params}
    for top in (True, False):
        abstract = _abstract(ConvNeXt(variant=variant, include_top=top))
        assert set(abstract) == {"params"}  # LayerNorm: no running statistics, nothing else
        assert _count(abstract) == counts[top]
    ours = BACKBONES[variant].layers(include_top) if pooling is None else (
        convnext.keras_layers(include_top, variant=variant, pooling=pooling))  # fmt: skip
    assert [layer.name for layer in ours] == [_without_counter(n) for n in case.layer_names]


def test_tiny_counts_and_published_sizes(keras_case):
    case = keras_case(*_case_of("tiny"))
    assert case.count_params == 28_589_128  # keras.io: 28.6M
    layers = BACKBONES["tiny"].layers(False)
    assert len(layers) == 151 and layers[-1] == ("layer_normalization", 19, True)
    assert BACKBONES["tiny"].stage_of("convnext_tiny_downsampling_block_1") == 7
    assert [num_stages(v) for v in VARIANTS] == [20, 38, 38, 38, 38]


def test_h5_layout_nested_stem_weightless_normalization_and_counter(keras_case):
    """The nested Sequential's weights sit in one group, named after its inner layers; the
    Normalization layer writes nothing; the no-top LayerNorm carries Keras's session counter
    in some files, and loads under its base name from every one."""
    no_top = [keras_case(*c) for c in PARITY_CASES[1:4]]  # tiny, small, base
    with h5py.File(no_top[0].path) as f:
        assert list(f["convnext_tiny_prestem_normalization"].attrs["weight_names"]) == []
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
    raw = read_keras_h5(no_top[0].path)
    assert "convnext_tiny_prestem_normalization" not in raw
    assert set(raw["convnext_tiny_stem"]) == {
        "convnext_tiny_stem_conv/kernel", "convnext_tiny_stem_conv/bias",
        "convnext_tiny_stem_layernorm/gamma", "convnext_tiny_stem_layernorm/beta"}  # fmt: skip
    params = load_keras_h5(no_top[0].path)["params"]
    assert set(params["convnext_tiny_stem"]["convnext_tiny_stem_layernorm"]) == {"scale", "bias"}
    assert params["convnext_tiny_stage_0_block_0_depthwise_conv"]["kernel"].shape == (7, 7, 1, 96)
    assert params["convnext_tiny_stage_0_block_0_pointwise_conv_1"]["kernel"].shape == (96, 384)
    assert names == no_top[0].layer_names
    final = {case.layer_names[-1] for case in no_top}
    assert any(re.fullmatch(r"layer_normalization_\d+", n) for n in final), final
    for case in no_top:
        assert "layer_normalization" in load_keras_h5(case.path)["params"]


def test_auto_named_layers_keep_their_counter_when_two_share_a_class(tmp_path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = names = ["layer_normalization_2", "layer_normalization_3"]
        for name in names:
            f.create_group(name).attrs["weight_names"] = [f"{name}/gamma:0"]
            f[name][f"{name}/gamma:0"] = np.ones(3, np.float32)
    assert set(load_keras_h5(path)["params"]) == {"layer_normalization_2", "layer_normalization_3"}


def test_stages_compose_to_the_whole_network():
    """Cutting at a stage and continuing from its activation gives the same logits."""
    model = ConvNeXt(variant="tiny", include_top=True, num_classes=5, conv_impl="lax")
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 32, 3))
    variables = random_variables(model, x.shape)
    cuts = (1, 7, 19)  # after the stem; entering a block that downsamples; the top

    @jax.jit
    def whole_and_cuts(variables, x):
        middles = [model.apply(variables, x, stop=k) for k in cuts]
        ends = [model.apply(variables, m, start=k) for k, m in zip(cuts, middles, strict=True)]
        return model.apply(variables, x), middles, ends

    whole, middles, ends = whole_and_cuts(variables, x)
    for end in ends:
        np.testing.assert_allclose(end, whole, rtol=0, atol=1e-5 * float(jnp.abs(whole).max()))
    assert [m.shape for m in middles] == [(2, 16, 8, 96), (2, 8, 4, 192), (2, 2, 1, 768)]
    assert model.apply(variables, x, stop=0) is x
    with pytest.raises(ValueError, match=r"stages \[5, 3\)"):
        model.apply(variables, x, start=5, stop=3)


def test_stochastic_depth_only_in_training_with_a_dropout_rng():
    """Run on the last stage and the top (blocks 15-17 of 18: drop rates 0.44-0.5), which is
    where the schedule drops the most, and cheap to compile."""
    model = ConvNeXt(variant="tiny", include_top=False, pooling="avg", conv_impl="lax",
                     drop_path_rate=0.5)  # fmt: skip
    variables = random_variables(model, (1, 32, 32, 3))
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 2, 2, 384))  # entering stage 16
    evaluate = jax.jit(functools.partial(model.apply, start=16))
    eval_out = evaluate(variables, x)
    np.testing.assert_array_equal(eval_out, evaluate(variables, x))  # deterministic
    # At rate 0 (Keras's applications) the same variables give the same output: the rate
    # changes no weights, and inference skips the drop entirely.
    plain = ConvNeXt(variant="tiny", include_top=False, pooling="avg", conv_impl="lax")
    np.testing.assert_array_equal(jax.jit(functools.partial(plain.apply, start=16))(
        variables, x), eval_out)  # fmt: skip
    train = jax.jit(functools.partial(model.apply, start=16, train=True))
    rngs = lambda seed: {"dropout": jax.random.PRNGKey(seed)}
    train_a, train_b = train(variables, x, rngs=rngs(0)), train(variables, x, rngs=rngs(1))
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, train(variables, x, rngs=rngs(0)))
    with pytest.raises(Exception, match="dropout"):  # flax: no 'dropout' rng was given
        jax.eval_shape(functools.partial(model.apply, start=16, train=True), variables, x)


def test_keras_constants():
    """Exact (erf) GELU as Keras's 'gelu', not Flax's tanh default; LayerScale starts at 1e-6."""
    import tf_keras

    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    keras_gelu = tf_keras.activations.get("gelu")(x).numpy()
    assert np.abs(np.asarray(jax.nn.gelu(x, approximate=False)) - keras_gelu).max() < 1e-6
    assert np.abs(np.asarray(jax.nn.gelu(x)) - keras_gelu).max() > 1e-4
    variables = LayerScale().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    np.testing.assert_array_equal(variables["params"]["scale"], np.full(4, 1e-6, np.float32))


def test_layer_norm_is_keras_s():
    """Epsilon 1e-6 and the two-pass variance of ``tf.nn.moments``, where they matter: a
    spread of 1e-3 (variance = epsilon) around a mean of 10 (E[x^2] - E[x]^2 in float32 loses
    all of the variance's digits)."""
    import tf_keras

    x = (10 + np.random.default_rng(0).normal(0, 1e-3, (8, 64))).astype(np.float32)
    want = tf_keras.layers.LayerNormalization(epsilon=1e-6)(x).numpy()
    norm = convnext._layer_norm("norm", jnp.float32)
    got = np.asarray(norm.apply(norm.init(jax.random.PRNGKey(0), x), x))
    # Measured 5.8e-4 (both round the mean of 10); epsilon 1e-5 or E[x^2] - E[x]^2: > 0.5.
    assert_close(got, want, 1e-2, what="LayerNorm")


def test_bad_inputs_are_one_line_errors():
    model = ConvNeXt(variant="tiny", include_top=False)
    with pytest.raises(ValueError, match="at least 32x32, got 31x64"):
        _abstract(model, (31, 64))
    with pytest.raises(ValueError, match="NHWC images with 3 channels"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="pooling='mean'"):
        _abstract(ConvNeXt(variant="tiny", include_top=False, pooling="mean"))
    with pytest.raises(ValueError, match="unknown ConvNeXt variant 'huge'"):
        _abstract(ConvNeXt(variant="huge"))
    with pytest.raises(ValueError, match="ConvNeXtTiny needs >= 32"):
        pretrained.create("convnext_tiny", weights=None, input_size=(31, 40))


def _one_line_error(**create_args) -> str:
    with pytest.raises(WeightsError) as error:
        pretrained.create(**create_args)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_wrong_files_name_what_they_hold(keras_case, shared_weights):
    small = keras_case(*_case_of("small"))
    tiny_top = keras_case(*_case_of("tiny"))
    tiny_no_top = keras_case(*PARITY_CASES[1])
    message = _one_line_error(name="convnext_tiny", weights=small.path, input_size=32)
    assert "holds ConvNeXtSmall weights, not ConvNeXtTiny" in message
    message = _one_line_error(name="convnext_tiny", weights=shared_weights, input_size=32)
    assert "holds MobileNetV2 weights, not ConvNeXtTiny" in message
    message = _one_line_error(name="mobilenet_v2", weights=tiny_no_top.path, input_size=32)
    assert "holds ConvNeXtTiny weights, not MobileNetV2" in message
    # The top's final LayerNorm is not the no-top one (Keras's files differ in it too).
    message = _one_line_error(name="convnext_tiny", weights=tiny_top.path, input_size=32)
    assert re.search(r"'params/layer_normalization/\w+' is missing from the file", message)
    message = _one_line_error(name="convnext_tiny", weights=tiny_no_top.path, input_size=32,
                              include_top=True)  # fmt: skip
    assert re.search(r"'params/convnext_tiny_head_dense/\w+' is missing", message)


def test_new_head_keeps_the_top_layernorm_and_replaces_only_the_classifier(keras_case):
    case = keras_case(*_case_of("tiny"))
    _, variables = pretrained.create("convnext_tiny", weights=case.path, include_top=True,
                                     num_classes=3, input_size=32)  # fmt: skip
    head = variables["params"].pop("convnext_tiny_head_dense")
    assert head["kernel"].shape == (768, 3)
    reference = load_keras_h5(case.path)
    del reference["params"]["convnext_tiny_head_dense"]
    jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_checkpoint_round_trip(tmp_path):
    backbone = BACKBONES["tiny"]
    model = backbone.build(include_top=False, pooling="avg", conv_impl="lax")
    variables = random_variables(model, (1, 32, 32, 3))
    metadata = {"model": backbone.model_config(include_top=False, pooling="avg"),
                "image_size": [32, 32], "preprocessing": backbone.preprocessing}  # fmt: skip
    checkpoints.save_variables(tmp_path / "ckpt", variables, metadata)
    restored_model, restored, restored_metadata = checkpoints.restore(tmp_path / "ckpt",
                                                                      conv_impl="lax")  # fmt: skip
    assert restored_model == model
    assert restored_metadata["preprocessing"] == "torch"
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
