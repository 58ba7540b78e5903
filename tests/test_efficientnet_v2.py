"""EfficientNetV2 B0-B3, S, M, L are Keras's: same layers, same counts, same outputs.

The Keras side is tf_keras with its built-in preprocessing (``include_preprocessing=True``)
fed raw pixels; ours is fed ``flaxcnn.data.scale_images(pixels, backbone.preprocessing)``, so
parity also proves that the preprocessing mode equals Keras's own layers. Keras models are
built once per case (module-scoped) and only what the tests need of them is kept: the big
variants hold 54M (M) and 119M (L) parameters.
"""

from __future__ import annotations

import dataclasses
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
from flaxcnn.models import build_model, get_backbone, random_variables
from flaxcnn.models.efficientnet_v2 import VARIANTS, EfficientNetV2, block_specs
from flaxcnn.weights import WeightsError, read_keras_h5

NAMES = {variant: f"efficientnet_v2_{variant}" for variant in VARIANTS}

# variant, input (height, width), include_top. Every variant once with the top (those Keras
# models also give the counts and layer lists; B0 at the minimum size), and B0 without the top
# at an odd, non-square size with each pooling. S/M/L at small sizes: their layers and code
# paths are B0's, only the table and the preprocessing differ. Both conv formulations run on
# B0 (all four outputs) and S, which between them have every layer kind (3x3 convs at stride
# 1 and 2, fused blocks with and without expansion, 1x1 convs, depthwise at stride 1 and 2,
# squeeze-excite) and every padding case; B1-B3, M and L, the same kinds wider or repeated,
# take one formulation each, alternately, to keep the file's cost near 2 minutes.
PARITY_CASES = [
    ("b0", (32, 32), True),
    ("b0", (75, 61), False),
    ("b1", (35, 48), True),
    ("b2", (33, 33), True),
    ("b3", (41, 41), True),
    ("s", (32, 40), True),
    ("m", (32, 32), True),
    ("l", (32, 32), True),
]
TOP_CASE = {case[0]: case for case in PARITY_CASES if case[2]}
NO_TOP_CASE = ("b0", (75, 61), False)
BOTH = ("lax", "unrolled")
CONV_IMPLS = {"b0": BOTH, "b1": ("unrolled",), "b2": ("lax",), "b3": ("unrolled",), "s": BOTH,
              "m": ("lax",), "l": ("unrolled",)}  # fmt: skip

# Parity bound, as a fraction of the Keras output's largest magnitude. Both sides run the same
# float32 operations in different orders (XLA's kernels against oneDNN's; our BatchNorm folded
# into the conv kernels), so they differ by rounding that the blocks propagate. Random weights
# (BN variances in [0.5, 1.5]) amplify none of it: measured <= 9.5e-7 (~8 eps) over
# PARITY_CASES run with both formulations on every variant, the 79 blocks of L included.
# Keras differs from itself by ~2.3e-5 between its oneDNN and Eigen kernels (see
# test_mobilenet_v2); 1e-5 (~85 eps) leaves a 10x margin for other CPUs (AVX2/AVX-512
# summation orders) and is still 1000x below what a wrong layer, constant, padding or
# transposed weight gives (1e-2 to 1 of the magnitude).
RANDOM_WEIGHTS_RTOL = 1e-5


def _normalised(name: str) -> str:
    """Keras's name without its per-session counter (``input_3``, ``rescaling_2``)."""
    return re.sub(r"_\d+$", "", name)


@dataclasses.dataclass(frozen=True)
class KerasReference:
    """What the tests keep of one random-weights tf_keras model: its outputs are by
    pooling (``None``: the logits with the top, the feature map without)."""

    layer_names: tuple[str, ...]
    count: int
    predictions_count: int
    drop_rates: dict[str, float]
    weights: pathlib.Path
    pixels: np.ndarray
    expected: dict[str | None, np.ndarray]


@pytest.fixture(scope="module")
def keras_reference(tmp_path_factory):
    """``reference(case)``: the Keras model of a parity case, built and run once."""
    import tensorflow as tf
    import tf_keras

    tf.config.set_visible_devices([], "GPU")
    done = {}

    def reference(case) -> KerasReference:
        if case not in done:
            variant, hw, include_top = case
            build = getattr(tf_keras.applications, VARIANTS[variant].keras_name)
            model = build(weights=None, input_shape=(*hw, 3), include_top=include_top,
                          classifier_activation=None)  # fmt: skip
            randomize_weights(model, seed=len(done))
            path = tmp_path_factory.mktemp("keras") / f"{variant}.h5"
            pixels = np.random.default_rng(len(done)).uniform(0, 255, (2, *hw, 3))
            pixels = pixels.astype(np.float32)
            out = model(pixels, training=False)
            expected = {None: out.numpy()}
            if not include_top:  # Keras's own pooling layers, as its pooling= adds them
                expected["avg"] = tf_keras.layers.GlobalAveragePooling2D()(out).numpy()
                expected["max"] = tf_keras.layers.GlobalMaxPooling2D()(out).numpy()
            done[case] = KerasReference(
                layer_names=tuple(_normalised(layer.name) for layer in model.layers),
                count=model.count_params(),
                predictions_count=model.get_layer("predictions").count_params()
                if include_top else 0,
                drop_rates={layer.name: layer.rate for layer in model.layers
                            if layer.name.endswith("_drop")},
                weights=save_legacy_h5(model, path),
                pixels=pixels,
                expected=expected,
            )  # fmt: skip
            del model
            tf_keras.backend.clear_session()
        return done[case]

    return reference


def _count(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))


def _abstract_variables(model, shape=(1, 32, 32, 3)):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_outputs_equal_keras(keras_reference, case):
    variant, hw, include_top = case
    reference = keras_reference(case)
    backbone = get_backbone(NAMES[variant])
    images = data.scale_images(reference.pixels, backbone.preprocessing)
    poolings = list(reference.expected)
    conv_impls = CONV_IMPLS[variant]
    model, variables = pretrained.create(backbone.name, weights=reference.weights,
                                         input_size=hw, include_top=include_top,
                                         conv_impl=conv_impls[0])  # fmt: skip
    for conv_impl in conv_impls:  # the variables do not depend on the formulation
        models = [model.clone(conv_impl=conv_impl, pooling=pooling) for pooling in poolings]
        # One program for every pooling: XLA merges the common backbone, compiled once.
        apply_all = lambda v, x, models=models: [m.apply(v, x) for m in models]
        outputs = jax.jit(apply_all)(variables, images)
        for pooling, got in zip(poolings, outputs, strict=True):
            expected = reference.expected[pooling]
            assert np.abs(expected).mean() > 0.05  # outputs of order 1, not a vanishing signal
            assert got.shape == expected.shape
            assert_close(got, expected, RANDOM_WEIGHTS_RTOL,
                         what=f"{variant} {conv_impl} pooling={pooling}")  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variable_counts_and_layers_equal_keras(keras_reference, variant):
    """Counts with and without the top (without it: all but ``predictions``, the only top
    layer with weights), the layer list, and every block's stochastic-depth rate."""
    reference = keras_reference(TOP_CASE[variant])
    backbone = get_backbone(NAMES[variant])
    variables = _abstract_variables(backbone.build(include_top=True))
    assert _count(variables) == reference.count
    assert _count(variables["params"]["predictions"]) == reference.predictions_count
    assert tuple(map(_normalised, backbone.layer_names(True))) == reference.layer_names
    assert backbone.layer_names(False) == backbone.layer_names(True)[:-3]
    ours = {s.prefix + "drop": 0.2 * s.depth_fraction for s in block_specs(variant)
            if s.has_residual and s.index > 0}  # fmt: skip
    assert ours.keys() == reference.drop_rates.keys()
    np.testing.assert_allclose([ours[k] for k in ours], [reference.drop_rates[k] for k in ours])


def test_no_top_layers_and_counts_equal_keras(keras_reference):
    reference = keras_reference(NO_TOP_CASE)
    backbone = get_backbone(NAMES[NO_TOP_CASE[0]])
    assert tuple(map(_normalised, backbone.layer_names(False))) == reference.layer_names
    assert _count(_abstract_variables(backbone.build(include_top=False))) == reference.count


def test_preprocessing_layers_have_no_weights_in_the_file(keras_reference):
    """Keras's Normalization (mean/variance given) and Rescaling layers are in the file's
    ``layer_names`` but hold no weights, so nothing of them needs converting."""
    for case in (TOP_CASE["b0"], TOP_CASE["s"]):
        path = keras_reference(case).weights
        with h5py.File(path) as f:
            names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
            preprocessing = [n for n in names if n.startswith(("rescaling", "normalization"))]
            assert len(preprocessing) == (2 if case[0] == "b0" else 1)
            assert all(len(f[n].attrs["weight_names"]) == 0 for n in preprocessing)
        assert not any(n.startswith(("rescaling", "normalization")) for n in read_keras_h5(path))


def test_contract():
    for variant, config in VARIANTS.items():
        backbone = get_backbone(config.keras_name)
        assert backbone.name == NAMES[variant]
        assert backbone.preprocessing in data.PREPROCESSING_MODES
        assert backbone.default_input_size == config.default_size
        assert {(s.include_top, s.input_size) for s in backbone.weights} == {
            (True, config.default_size),
            (False, config.default_size),
        }
        assert all(s.hash_algorithm == "md5" for s in backbone.weights)
        first = backbone.fine_tune_layer(backbone.default_fine_tune_at)
        assert first == backbone.default_fine_tune_at + "_expand_conv"
        stages = [layer.stage for layer in backbone.layers(True)]
        assert stages == sorted(stages) and set(stages) == set(range(backbone.num_stages))
    b0 = get_backbone("efficientnet_v2_b0")
    assert b0.find_weights(240, include_top=False).filename == "efficientnetv2-b0_notop.h5"
    assert b0.layer_names()[:4] == ("input_1", "rescaling", "normalization", "stem_conv")
    assert b0.stage_of("block2b_expand_conv") == 3 and b0.num_stages == 23
    assert get_backbone("EfficientNetV2S").preprocessing == "tf128"


def test_stages_compose_to_the_whole_network():
    """Cutting at a stage and continuing from its activation gives the same logits."""
    model = EfficientNetV2(variant="b0", num_classes=5, conv_impl="lax")
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 40, 48, 3), minval=-2, maxval=2)
    variables = random_variables(model, x.shape)
    cuts = (1, 6, 22)  # after the stem, entering a stride-2 MBConv block, entering the top

    @jax.jit
    def pieces(variables, x):
        middles = [model.apply(variables, x, stop=stage) for stage in cuts]
        return (
            model.apply(variables, x),
            middles,
            [model.apply(variables, m, start=s) for s, m in zip(cuts, middles, strict=True)],
        )

    whole, middles, continued = pieces(variables, x)
    for stage, out in zip(cuts, continued, strict=True):
        assert_close(out, whole, 1e-6, what=f"cut at stage {stage}")
    assert [m.shape for m in middles] == [(2, 20, 24, 32), (2, 5, 6, 48), (2, 2, 2, 192)]
    # The ends: nothing before the stem, nothing after the top.
    num_stages = get_backbone("efficientnet_v2_b0").num_stages
    assert model.apply(variables, x, stop=0) is x
    assert model.apply(variables, whole, start=num_stages) is whole
    with pytest.raises(ValueError, match=r"stages \[5, 3\)"):
        model.apply(variables, x, start=5, stop=3)


def test_train_mode_batch_stats_and_stochastic_depth():
    """Training updates every BatchNorm's statistics and drops residual branches as the
    ``'dropout'`` rng draws; inference ignores the rng and is deterministic."""
    # Pooled features without the top: only stochastic depth draws from the rng.
    model = EfficientNetV2(variant="b0", include_top=False, pooling="avg", conv_impl="lax")
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3), minval=-2, maxval=2)
    variables = random_variables(model, x.shape)

    @jax.jit
    def run(variables, key):
        train, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                     mutable=["batch_stats"])  # fmt: skip
        infer = model.apply(variables, x, rngs={"dropout": key})
        return train, updates["batch_stats"], infer, model.apply(variables, x)

    (train_a, stats, infer_a, plain), (train_a2, *_), (train_b, _, infer_b, _) = (
        run(variables, jax.random.PRNGKey(key)) for key in (3, 3, 4)
    )
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], stats)
    assert all(jax.tree.leaves(moved))
    np.testing.assert_array_equal(train_a, train_a2)  # the rng decides, nothing else
    assert not np.allclose(train_a, train_b)  # another rng drops other branches
    np.testing.assert_array_equal(infer_a, infer_b)
    np.testing.assert_array_equal(infer_a, plain)  # no rng needed without training


def test_bad_input_is_one_line():
    model = EfficientNetV2(variant="b0", include_top=False)
    cases = [
        ((1, 31, 64, 3), "EfficientNetV2B0 needs inputs of at least 32x32, got 31x64"),
        ((1, 64, 64, 4), r"expects NHWC images with 3 channels, got \(1, 64, 64, 4\)"),
        ((64, 64, 3), "expects NHWC images with 3 channels"),
    ]
    for shape, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            _abstract_variables(model, shape)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="pooling='mean'; expected None, 'avg' or 'max'"):
        _abstract_variables(EfficientNetV2(include_top=False, pooling="mean"))
    with pytest.raises(ValueError, match="variant='b7'; expected one of b0, b1"):
        _abstract_variables(EfficientNetV2(variant="b7"))
    with pytest.raises(ValueError, match="input_size 16 is too small; EfficientNetV2M needs >= 32"):
        pretrained.create("efficientnet_v2_m", weights=None, input_size=16)


def test_weights_of_another_variant_or_family_are_named(keras_reference, shared_weights):
    b1_file = keras_reference(TOP_CASE["b1"]).weights
    b0_file = keras_reference(TOP_CASE["b0"]).weights
    expected = [
        ("efficientnet_v2_b0", b1_file, True, "holds EfficientNetV2B1 weights, not "
         "EfficientNetV2B0; pass a EfficientNetV2B0 file, or model 'efficientnet_v2_b1'"),
        ("efficientnet_v2_b1", b0_file, False, "holds EfficientNetV2B0 weights, not "
         "EfficientNetV2B1"),
        ("efficientnet_v2_s", b0_file, True, "holds EfficientNetV2B0 weights, not "
         "EfficientNetV2S"),
        ("efficientnet_v2_b0", shared_weights, False, "holds MobileNetV2 weights, not "
         "EfficientNetV2B0"),
    ]  # fmt: skip
    for name, path, include_top, message in expected:
        with pytest.raises(WeightsError, match=re.escape(message)) as error:
            pretrained.create(name, weights=path, input_size=32, include_top=include_top)
        assert "\n" not in str(error.value)
    # The with-top model from a no-top file: the classifier is missing, named.
    no_top_file = keras_reference(NO_TOP_CASE).weights
    with pytest.raises(WeightsError, match="'params/predictions/bias' is missing"):
        pretrained.create("efficientnet_v2_b0", weights=no_top_file, include_top=True)


def test_checkpoint_round_trip(keras_reference, tmp_path):
    """Orbax saves and restores the loaded variables exactly, and rebuilds the same model."""
    reference = keras_reference(TOP_CASE["b0"])
    model, variables = pretrained.create("efficientnet_v2_b0", weights=reference.weights,
                                         input_size=32, include_top=True)  # fmt: skip
    backbone = get_backbone("efficientnet_v2_b0")
    metadata = {"model": backbone.model_config(include_top=True), "image_size": [32, 32],
                "preprocessing": backbone.preprocessing}  # fmt: skip
    checkpoints.save_variables(tmp_path / "ckpt", variables, metadata)
    restored_model, restored, restored_metadata = checkpoints.restore(tmp_path / "ckpt")
    assert restored_metadata == metadata and restored_model == model
    assert restored_model == build_model(metadata["model"])
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), variables)
