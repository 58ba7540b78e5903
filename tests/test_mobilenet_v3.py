"""MobileNetV3 Small and Large are Keras's: same layers, same counts, same outputs.

The reference is tf_keras's own ``MobileNetV3Small``/``MobileNetV3Large`` with random,
non-trivial weights (``keras_reference.randomize_weights``) saved in the legacy ``.h5`` layout
that the published files use, and loaded through ``flaxcnn.pretrained.create``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from keras_reference import randomize_weights, save_legacy_h5
from tolerances import F32_EPS, assert_close

from flaxcnn import checkpoints, pretrained
from flaxcnn.data import scale_images
from flaxcnn.models import build_model, get_backbone, random_variables
from flaxcnn.models.mobilenet_v3 import KERAS_NAMES, MobileNetV3, hard_sigmoid, hard_swish
from flaxcnn.weights import WeightsError

VARIANTS = ("small", "large")
# (alpha, minimalistic): the three published pairs, and one without published weights.
OPTION_SETS = ((1.0, False), (0.75, False), (1.0, True), (0.75, True))
# Layers Keras names itself carry a per-session counter (``re_lu_7``); ours are listed without.
_AUTO_NAMED = re.compile(
    r"^(input|rescaling|re_lu|tf\.__operators__\.add|tf\.math\.multiply|multiply|"
    r"global_average_pooling2d|dropout|flatten)(_\d+)?$"
)


def _base_name(name: str) -> str:
    return _AUTO_NAMED.sub(r"\1", name)


def _backbone(variant):
    return get_backbone(f"mobilenet_v3_{variant}")


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _keras_model(variant, alpha, minimalistic, include_top=True, pooling=None, hw=None):
    """tf_keras's model with Keras's defaults (``include_preprocessing=True``: it takes pixels
    in [0, 255]) for inputs of size ``hw`` (``None``: any size), logits out."""
    import tensorflow as tf
    import tf_keras

    tf.config.set_visible_devices([], "GPU")
    build = getattr(tf_keras.applications, KERAS_NAMES[variant])
    return build(input_shape=(*(hw or (None, None)), 3), alpha=alpha, minimalistic=minimalistic,
                 include_top=include_top, pooling=pooling, weights=None,
                 classifier_activation=None)  # fmt: skip


@pytest.fixture(scope="module")
def keras_models():
    """``get(variant, alpha, minimalistic)``: a with-top Keras model with random weights, built
    once per module (building one takes 1-3 s)."""
    built = {}

    def get(variant, alpha, minimalistic):
        key = (variant, alpha, minimalistic)
        if key not in built:
            seed = VARIANTS.index(variant) * 10 + OPTION_SETS.index((alpha, minimalistic))
            built[key] = randomize_weights(_keras_model(*key), seed)
        return built[key]

    return get


@pytest.fixture(scope="module")
def weight_files(keras_models, tmp_path_factory):
    """``get(variant, alpha, minimalistic, include_top, pooling=None, hw=None)``: a Keras model
    holding the random weights of ``keras_models`` and its legacy ``.h5`` file (a no-top model
    writes the no-top files' layout). ``hw``: the model's declared input size (``None``: any).
    """
    root, written = tmp_path_factory.mktemp("mobilenet_v3_h5"), {}

    def get(variant, alpha, minimalistic, include_top, pooling=None, hw=None):
        key = (variant, alpha, minimalistic, include_top, pooling, hw)
        if key not in written:
            model = source = keras_models(variant, alpha, minimalistic)
            if (include_top, pooling, hw) != (True, None, None):
                model = _keras_model(variant, alpha, minimalistic, include_top, pooling, hw)
                # The top's weights come last in Keras's order: a no-top model's are a prefix.
                names = [w.name for w in model.weights]
                assert names == [w.name for w in source.weights][: len(names)]
                model.set_weights(source.get_weights()[: len(names)])
            name = "_".join(map(str, key)).replace(" ", "") + ".h5"
            written[key] = save_legacy_h5(model, root / name), model
        return written[key]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("alpha", "minimalistic"), OPTION_SETS)
def test_layer_list_and_variable_counts_equal_keras(keras_models, variant, alpha, minimalistic):
    keras_model = keras_models(variant, alpha, minimalistic)
    backbone, options = _backbone(variant), {"alpha": alpha, "minimalistic": minimalistic}
    ours, theirs = backbone.layers(True, **options), keras_model.layers
    assert [_base_name(layer.name) for layer in ours] == [_base_name(t.name) for t in theirs]
    assert [layer.weighted for layer in ours] == [bool(t.weights) for t in theirs]
    stages = [layer.stage for layer in ours]
    assert stages == sorted(stages) and set(stages) == set(range(backbone.num_stages))
    no_top = backbone.layers(False, **options)
    assert ours[: len(no_top)] == no_top
    top = [layer.name for layer in ours[len(no_top) :]]
    assert top[:2] == ["global_average_pooling2d", "Conv_2"] and top[-1] == "Predictions"

    for include_top in (True, False):
        module = backbone.build(include_top=include_top, **options)
        shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
        listed = {layer.name for layer in backbone.layers(include_top, **options)}
        expected = sum(layer.count_params() for layer in keras_model.layers if layer.name in listed)
        assert _count(shapes) == expected
        assert set(shapes["params"]) == {layer.name for layer in
                                         backbone.layers(include_top, **options) if layer.weighted}
    if (alpha, minimalistic) == (1.0, False):  # the published totals, for the record
        assert keras_model.count_params() == {"small": 2_554_968, "large": 5_507_432}[variant]


# (variant, alpha, minimalistic, input (h, w), include_top, pooling): every variant with each
# published option pair, the minimum size, odd and non-square sizes, each pooling.
PARITY_CASES = [
    ("small", 1.0, False, (32, 32), True, None),
    ("small", 0.75, False, (57, 75), False, "avg"),
    ("small", 1.0, True, (96, 96), False, None),
    ("large", 1.0, False, (75, 57), True, None),
    ("large", 0.75, False, (32, 48), False, "max"),
    ("large", 1.0, True, (57, 75), True, None),
]
# Parity bound, as a fraction of Keras's largest output magnitude. Both sides run the same
# float32 operations (hard-swish bit for bit: test_hard_swish_is_kerass_bit_for_bit) but sum
# convolutions in other orders (XLA against oneDNN; BatchNorm folded into the kernels here):
# each of the ~60 conv/BN layers rounds differently by a few F32_EPS of its output, and random
# weights (BN variances in [0.5, 1.5]) amplify nothing. Measured <= 1.2e-6 over PARITY_CASES
# and both conv formulations (~10 eps); 1e-5 (~84 eps) leaves 8x for other CPUs' kernels
# (AVX2/AVX-512 pick other summation orders) and is still 100x below what a wrong layer,
# constant, padding or transposed kernel gives (>= 1e-3 of the magnitude).
RANDOM_WEIGHTS_RTOL = 1e-5
assert 80 * F32_EPS < RANDOM_WEIGHTS_RTOL < 100 * F32_EPS


@pytest.mark.parametrize(("variant", "alpha", "minimalistic", "hw", "include_top", "pooling"),
                         PARITY_CASES)  # fmt: skip
def test_outputs_equal_keras(weight_files, variant, alpha, minimalistic, hw, include_top, pooling):
    path, keras_model = weight_files(variant, alpha, minimalistic, include_top, pooling, hw)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, *hw, 3)).astype(np.float32)
    expected = keras_model(pixels, training=False).numpy()  # Keras rescales inside the model
    assert np.abs(expected).mean() > 0.05  # outputs of order 1, not a vanishing signal
    images = scale_images(pixels, pretrained.preprocessing(f"mobilenet_v3_{variant}"))
    for conv_impl in ("lax", "unrolled"):
        model, variables = pretrained.create(
            f"mobilenet_v3_{variant}", weights=path, input_size=hw, include_top=include_top,
            pooling=pooling, conv_impl=conv_impl, alpha=alpha, minimalistic=minimalistic,
        )  # fmt: skip
        got = np.asarray(jax.jit(model.apply)(variables, images))
        assert got.shape == expected.shape
        assert_close(got, expected, RANDOM_WEIGHTS_RTOL, what=f"{variant} {conv_impl}")


def test_odd_sides_follow_kerass_fixed_size_model(weight_files):
    """Keras's ``correct_pad`` sees no size in a model built for any input size (the default
    ``input_shape=None``) and pads every stride-2 depthwise conv as for an even side; built for
    57x75 (``input_shape=(57, 75, 3)``) it pads odd sides on both ends. Ours knows the size, so
    it is the fixed-size model (``test_outputs_equal_keras``); the two Keras models disagree."""
    _, fixed = weight_files("small", 0.75, False, False, "avg", (57, 75))
    _, any_size = weight_files("small", 0.75, False, False, None)
    pixels = np.random.default_rng(0).uniform(0, 255, (1, 57, 75, 3)).astype(np.float32)
    features = any_size(pixels, training=False).numpy()
    # 57x75 -> stem 29x38 -> stride-2 blocks 14x19, 7x9, 3x4, 1x2 (fixed: 15x19, 8x10, 4x5, 2x3)
    assert features.shape == (1, 1, 2, 432)
    model = MobileNetV3(variant="small", alpha=0.75, include_top=False)
    assert jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0),
                          jnp.zeros((1, 57, 75, 3)))[0].shape == (1, 2, 3, 432)  # fmt: skip
    assert fixed.get_layer("avg_pool").input_shape == (None, 2, 3, 432)


def test_hard_swish_is_kerass_bit_for_bit():
    """Keras multiplies by float32(1/6); ``x * relu6(x + 3) / 6`` differs in the last bit for
    a quarter of inputs, so the order of the operations is part of "Keras-exact"."""
    import tensorflow as tf
    import tf_keras

    x = np.random.default_rng(0).normal(0.0, 4.0, 100_000).astype(np.float32)
    gate = tf_keras.layers.ReLU(6.0)(tf.constant(x) + 3.0) * (1.0 / 6.0)
    swish = tf_keras.layers.Multiply()([tf.constant(x), gate])
    np.testing.assert_array_equal(np.asarray(jax.jit(hard_sigmoid)(x)), gate.numpy())
    np.testing.assert_array_equal(np.asarray(jax.jit(hard_swish)(x)), swish.numpy())


@pytest.fixture(scope="module")
def unpublished_options_model():
    """MobileNetV3Small with options Keras publishes no weights for, randomly initialised:
    ``pretrained.create(weights=None)`` compiles the initialiser (~10 s), so it is shared."""
    return pretrained.create("mobilenet_v3_small", weights=None, input_size=32, alpha=0.75,
                             minimalistic=True, include_top=True, num_classes=10)  # fmt: skip


def test_train_mode_updates_batch_stats_and_dropout_needs_train_and_rng(unpublished_options_model):
    model, variables = unpublished_options_model
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1, maxval=1)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    train = lambda seed: apply(variables, x, train=True, mutable=("batch_stats",),
                               rngs={"dropout": jax.random.PRNGKey(seed)})  # fmt: skip
    out_a, updates = train(0)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])  # fmt: skip
    assert all(jax.tree.leaves(moved))
    out_b, _ = train(1)
    assert not np.allclose(out_a, out_b)  # another dropout mask
    eval_out = apply(variables, x)
    np.testing.assert_array_equal(eval_out, apply(variables, x))  # deterministic
    assert not np.allclose(out_a, eval_out)
    with pytest.raises(Exception, match="dropout"):  # training without an rng is an error
        jax.eval_shape(functools.partial(model.apply, train=True, mutable=("batch_stats",)),
                       variables, x)  # fmt: skip


def test_stages_compose_to_the_whole_network(unpublished_options_model):
    """Cutting at a stage and continuing from its activation gives the same logits."""
    model, variables = unpublished_options_model
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 32, 32, 3), minval=-1, maxval=1)
    apply = jax.jit(model.apply, static_argnames=("start", "stop"))
    whole = apply(variables, x)  # compiled by the train-mode test already (same program)
    for stage in (4, 12):  # entering block 3 (the first 5x5 one unless minimalistic); the top
        middle = apply(variables, x, stop=stage)
        assert_close(apply(variables, middle, start=stage), whole, 10 * F32_EPS,
                     what=f"cut at {stage}")  # fmt: skip
    assert apply(variables, x, stop=4).shape == (4, 4, 4, 24)  # 1/8 scale
    assert _backbone("small").stage_of("expanded_conv_3/squeeze_excite/Conv") == 4
    assert _backbone("large").stage_of("Logits") == 16
    with pytest.raises(ValueError, match=r"stages \[5, 3\)"):
        model.apply(variables, x, start=5, stop=3)


def test_small_input_and_wrong_channels_are_rejected():
    model = MobileNetV3(variant="large", include_top=False)
    with pytest.raises(ValueError) as error:
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 64, 3)))
    assert str(error.value) == "MobileNetV3Large needs inputs of at least 32x32, got 31x64"
    with pytest.raises(ValueError, match="NHWC images with 3 channels"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"input_size 31 is too small; .* needs >= 32"):
        pretrained.create("mobilenet_v3_small", weights=None, input_size=31)


def test_unpublished_options_fail_with_imagenet_and_build_without_weights(
    tmp_path, unpublished_options_model
):
    with pytest.raises(WeightsError) as error:
        pretrained.create("mobilenet_v3_small", alpha=0.75, minimalistic=True,
                          cache_dir=tmp_path, download=False)  # fmt: skip
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "no ImageNet weights are published for mobilenet_v3_small with alpha=0.75, "
        "minimalistic=True; published: alpha=0.75, minimalistic=False at 224; "
        "alpha=1.0, minimalistic=False at 224; alpha=1.0, minimalistic=True at 224"
    )
    model, variables = unpublished_options_model  # weights=None builds them
    assert model.alpha == 0.75 and model.minimalistic
    assert not [name for name in variables["params"] if "squeeze_excite" in name]
    with pytest.raises(ValueError, match=r"^alpha=0.5 is not supported by mobilenet_v3_large; "
                                         r"allowed: 1.0, 0.75$"):  # fmt: skip
        pretrained.create("mobilenet_v3_large", weights=None, alpha=0.5)


def test_published_files_are_kerass():
    """Our file names, URLs and MD5s are those tf_keras's ``MobileNetV3`` downloads."""
    from tf_keras.src.applications import mobilenet_v3 as keras_v3

    for variant in VARIANTS:
        backbone = _backbone(variant)
        assert len(backbone.weights) == 6
        for spec in backbone.weights:
            options = dict(spec.options)
            model_name = (f"{variant}{'_minimalistic' if options['minimalistic'] else ''}_224_"
                          f"{options['alpha']}_float")  # fmt: skip
            suffix = "" if spec.include_top else "_no_top_v2"
            filename = f"weights_mobilenet_v3_{model_name}{suffix}.h5"
            assert spec.url == keras_v3.BASE_WEIGHT_PATH + filename
            assert spec.file_hash == keras_v3.WEIGHTS_HASHES[model_name][1 - spec.include_top]
            assert spec.hash_algorithm == "md5" and spec.input_size == 224
            assert backbone.find_weights(224, spec.include_top, **options) == spec


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_fine_tune_point_is_the_last_resolution_stage(variant):
    backbone = _backbone(variant)
    first = {"small": "expanded_conv_8/expand", "large": "expanded_conv_12/expand"}[variant]
    for alpha, minimalistic in OPTION_SETS:
        options = {"alpha": alpha, "minimalistic": minimalistic}
        assert backbone.fine_tune_layer(backbone.default_fine_tune_at, **options) == first
    layers = backbone.layers(False)
    index = [layer.name for layer in layers].index(first)
    assert backbone.fine_tune_layer(index) == first  # --fine-tune-at by Keras layer index
    assert backbone.layers_from(first)[-2:] == ("Conv_2", "Logits")


def test_file_of_another_variant_or_options_is_named(weight_files):
    large, _ = weight_files("large", 1.0, False, True)
    small_minimalistic, _ = weight_files("small", 1.0, True, False)
    cases = [
        (large, {}, "holds MobileNetV3Large weights, not MobileNetV3Small (alpha=1.0, "
                    "minimalistic=False); pass a MobileNetV3Small file, or model "
                    "'mobilenet_v3_large' for this one"),
        (small_minimalistic, {}, "holds MobileNetV3Small (alpha=1.0, minimalistic=True) weights, "
                                 "not MobileNetV3Small (alpha=1.0, minimalistic=False)"),
        (small_minimalistic, {"alpha": 0.75, "minimalistic": True},
         "holds MobileNetV3Small (alpha=1.0, minimalistic=True) weights, not MobileNetV3Small "
         "(alpha=0.75, minimalistic=True)"),
    ]  # fmt: skip
    for path, options, expected in cases:
        with pytest.raises(WeightsError) as error:
            pretrained.create("mobilenet_v3_small", weights=path, input_size=32, **options)
        assert "\n" not in str(error.value) and expected in str(error.value)


def test_file_of_another_family_is_named(shared_weights):
    with pytest.raises(WeightsError) as error:
        pretrained.create("mobilenet_v3_large", weights=shared_weights, input_size=32)
    message = str(error.value)
    assert "\n" not in message
    assert "holds MobileNetV2 weights, not MobileNetV3Large (alpha=1.0, minimalistic=False); " \
        "pass a MobileNetV3Large file, or model 'mobilenet_v2' for this one" in message


def test_new_heads_load_everything_but_the_classifier(weight_files):
    """``Conv_2`` belongs to Keras's top, so a new 5-way top takes it from the with-top file;
    only ``Logits`` (the classifier) starts from random values. A new head on the pooled
    backbone (``num_classes`` without the top) needs no top at all."""
    path, keras_model = weight_files("small", 1.0, False, True)
    _, variables = pretrained.create("mobilenet_v3_small", weights=path, input_size=32,
                                     include_top=True, num_classes=5)  # fmt: skip
    params = variables["params"]
    assert params["Logits"]["kernel"].shape == (1, 1, 1024, 5)
    np.testing.assert_array_equal(params["Conv_2"]["kernel"],
                                  keras_model.get_layer("Conv_2").kernel.numpy())  # fmt: skip
    no_top, _ = weight_files("small", 1.0, False, False)
    with pytest.raises(WeightsError, match="'params/Conv_2/bias' is missing from the file"):
        pretrained.create("mobilenet_v3_small", weights=no_top, input_size=32, include_top=True,
                          num_classes=5)  # fmt: skip
    model, variables = pretrained.create("mobilenet_v3_small", weights=no_top, input_size=32,
                                         num_classes=5)  # fmt: skip
    assert model.backbone.pooling == "avg"
    assert variables["params"]["head"]["kernel"].shape == (576, 5)
    np.testing.assert_array_equal(variables["params"]["backbone"]["Conv_1"]["kernel"],
                                  keras_model.get_layer("Conv_1").kernel.numpy())  # fmt: skip


def test_variables_with_slashes_round_trip_through_orbax(tmp_path):
    """Keras's names hold '/' (``expanded_conv_3/squeeze_excite/Conv``); Orbax keeps them as
    keys, both in an inference checkpoint and in a TrainState (optimizer state included)."""
    import optax
    import orbax.checkpoint as ocp

    from flaxcnn.train import TrainState

    backbone = _backbone("small")
    model = backbone.build(include_top=False, pooling="avg", alpha=0.75)
    variables = random_variables(model, (1, 32, 32, 3), seed=3)
    assert "expanded_conv_3/squeeze_excite/Conv" in variables["params"]
    metadata = {"model": backbone.model_config(include_top=False, pooling="avg", alpha=0.75),
                "image_size": [32, 32], "preprocessing": backbone.preprocessing}  # fmt: skip
    checkpoints.save_variables(tmp_path / "variables", variables, metadata)
    restored_model, restored, restored_metadata = checkpoints.restore(tmp_path / "variables")
    assert restored_model == build_model(metadata["model"]) and restored_metadata == metadata
    jax.tree.map(np.testing.assert_array_equal, restored, variables)  # same keys, same values

    state = TrainState.create(variables, optax.adam(1e-3), jax.random.PRNGKey(0))
    tree = jax.device_get(state.to_checkpoint())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", tree)
    checkpointer.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    back = checkpointer.restore(tmp_path / "state", target)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    assert set(back["opt_state"][0].mu) == set(variables["params"])
