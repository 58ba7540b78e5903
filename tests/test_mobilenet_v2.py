"""MobileNetV2 is Keras's MobileNetV2: same layers, same counts, same outputs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from keras_reference import keras_mobilenet_v2, save_legacy_h5
from tolerances import assert_close, assert_within, max_diff

from flaxcnn import pretrained
from flaxcnn.models import get_backbone, random_variables
from flaxcnn.models.mobilenet_v2 import NUM_STAGES, MobileNetV2
from flaxcnn.weights import WeightsError, read_keras_h5

BACKBONE = get_backbone("mobilenet_v2")
keras_layer_names = lambda alpha, include_top: BACKBONE.layer_names(include_top, alpha=alpha)
stage_of_layer = BACKBONE.stage_of


def _count(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))


def _abstract_variables(model, size=(32, 32)):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))


@pytest.mark.parametrize(
    ("include_top", "expected"), [(False, 2_257_984), (True, 3_538_984)]
)
def test_variable_count_alpha_1(include_top, expected):
    variables = _abstract_variables(MobileNetV2(alpha=1.0, include_top=include_top))
    assert _count(variables) == expected


@pytest.mark.parametrize("alpha", [0.35, 0.5, 0.75, 1.3, 1.4])
def test_variable_count_matches_keras(alpha):
    keras_model = keras_mobilenet_v2(alpha, (32, 32, 3), include_top=True)
    variables = _abstract_variables(MobileNetV2(alpha=alpha, include_top=True))
    assert _count(variables) == keras_model.count_params()


def test_layer_names_follow_keras_order(shared_weights):
    """Our Keras layer list equals the file's ``layer_names`` (weightless layers included)."""
    import h5py

    with h5py.File(shared_weights) as f:
        file_names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
    ours = list(keras_layer_names(1.0, include_top=False))
    assert ours[1:] == file_names[1:]  # [0] is the input layer, whose name Keras numbers
    assert len(ours) == 154 and ours[100] == "block_11_expand_relu"
    weighted = set(_abstract_variables(MobileNetV2(include_top=False))["params"])
    assert weighted == set(read_keras_h5(shared_weights))


PARITY_CASES = [
    # alpha, input shape (incl. odd and non-square), include_top, pooling
    (1.0, (96, 96, 3), True, None),
    (0.35, (64, 64, 3), False, "avg"),
    (0.5, (75, 61, 3), False, None),
    (0.75, (32, 48, 3), False, "max"),
    (1.4, (64, 64, 3), True, None),
    (1.3, (57, 57, 3), False, "avg"),
]


# Parity bounds, as fractions of the Keras output's largest magnitude. The two sides run the
# same float32 operations in different orders (XLA's kernels against oneDNN's), so they differ
# by rounding, which the 50 layers propagate and, with trained weights, amplify: BatchNorm
# divides by sqrt(moving_variance + 1e-3) with variances down to ~1e-3, scaling a layer's
# rounding up by ~30x. Random weights (variances in [0.5, 1.5]) amplify nothing: measured
# <= 9.0e-7 over PARITY_CASES and both formulations, so 1e-5 (~80 eps) leaves a 10x margin.
# With the ImageNet weights on photos: measured <= 2.2e-5 (unpooled features, max 6.0, at
# 96/160/224 px) -- the order of Keras against itself, whose oneDNN and Eigen kernels differ
# by 1.25e-5 here (test_keras_differs_from_itself_as_much). 1e-4 leaves 4.5x over the worst
# case and 8x over Keras's own spread. A wrong layer, constant, padding or transposed weight
# is off by 1e-2 to 1 of the magnitude.
RANDOM_WEIGHTS_RTOL = 1e-5
IMAGENET_WEIGHTS_RTOL = 1e-4
REAL_PHOTO_SIZES = (96, 160, 224)


@pytest.mark.parametrize(("alpha", "shape", "include_top", "pooling"), PARITY_CASES)
def test_outputs_equal_keras(tmp_path, alpha, shape, include_top, pooling):
    keras_model = keras_mobilenet_v2(alpha, shape, include_top, pooling, seed=int(alpha * 100))
    weights = save_legacy_h5(keras_model, tmp_path / "random.h5")
    images = np.random.default_rng(0).uniform(-1, 1, (3, *shape)).astype(np.float32)
    expected = keras_model(images, training=False).numpy()
    assert np.abs(expected).mean() > 0.05  # outputs of order 1, not a vanishing signal
    for conv_impl in ("lax", "unrolled"):
        model, variables = pretrained.mobilenet_v2(
            alpha, shape[:2], include_top, pooling=pooling, weights=weights, conv_impl=conv_impl
        )
        got = np.asarray(jax.jit(model.apply)(variables, images))
        assert got.shape == expected.shape
        assert_close(got, expected, RANDOM_WEIGHTS_RTOL, what=conv_impl)


@pytest.fixture(scope="module")
def real_features(shared_weights, cats_vs_dogs_dir, tmp_path_factory):
    """``features(size)``: (photos, Keras's, ours) for 8 validation photos at ``size`` px,
    unpooled (the last ReLU6's [8, s, s, 1280] output: the largest values, the most of them).
    Memoised: the yardstick test reuses the 160 px ones."""
    import tensorflow as tf

    files = sorted((cats_vs_dogs_dir / "validation" / "cat").glob("*.jpg"))[:4]
    files += sorted((cats_vs_dogs_dir / "validation" / "dog").glob("*.jpg"))[:4]
    done = {}

    def features(size):
        if size not in done:
            images = np.stack([tf.image.resize(tf.io.decode_jpeg(f.read_bytes(), channels=3),
                                               (size, size)) for f in files])  # fmt: skip
            images = (images / 127.5 - 1.0).astype(np.float32)
            keras_model = keras_mobilenet_v2(1.0, (size, size, 3), False, weights=shared_weights)
            expected = keras_model(images, training=False).numpy()
            model, variables = pretrained.mobilenet_v2(1.0, size, include_top=False,
                                                       weights=shared_weights)  # fmt: skip
            done[size] = images, expected, np.asarray(jax.jit(model.apply)(variables, images))
        return done[size]

    return features


@pytest.mark.parametrize("size", REAL_PHOTO_SIZES)
def test_real_weights_on_real_photos_equal_keras(real_features, size):
    _, expected, got = real_features(size)
    assert got.shape == expected.shape == (8, -(-size // 32), -(-size // 32), 1280)
    assert_close(got, expected, IMAGENET_WEIGHTS_RTOL, what=f"{size} px")
    # Real ImageNet features: ReLU6 output, sparse and spread, not random-init activations.
    assert got.min() >= 0 and got.max() <= 6 and got.mean(axis=(1, 2)).std() > 0.3


# Keras's features from a fresh process with oneDNN off (its Eigen kernels).
_KERAS_WITHOUT_ONEDNN = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from keras_reference import keras_mobilenet_v2
images = np.load(sys.argv[2])
model = keras_mobilenet_v2(1.0, images.shape[1:], False, weights=sys.argv[3])
np.save(sys.argv[4], model(images, training=False).numpy())
"""


def test_keras_differs_from_itself_as_much(real_features, shared_weights, tmp_path):
    """The yardstick of "Keras-exact": Keras with oneDNN (this process) against Keras with its
    Eigen kernels (TF_ENABLE_ONEDNN_OPTS=0) differs by 1.25e-5 of the magnitude on these photos
    (2.3e-5 on others); ours against Keras by 2.2e-5. Ours stays within 5x of that spread."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        pytest.skip("this process runs Keras without oneDNN too: nothing to compare")
    images, expected, got = real_features(160)
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    tests_dir, out = pathlib.Path(__file__).parent, tmp_path / "eigen.npy"
    argv = [sys.executable, "-c", _KERAS_WITHOUT_ONEDNN, str(tests_dir),
            str(tmp_path / "images.npy"), str(shared_weights), str(out)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    eigen = np.load(out)
    keras_spread = max_diff(eigen, expected)
    if keras_spread == 0:
        pytest.skip("Keras's oneDNN and Eigen kernels agree bit for bit on this CPU: no yardstick")
    assert_close(eigen, expected, IMAGENET_WEIGHTS_RTOL, what="Keras Eigen vs oneDNN")
    assert_within(max_diff(got, expected), 5.0, keras_spread, "ours vs Keras's own spread")


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
    model = MobileNetV2(alpha=0.35, include_top=False, pooling="avg")
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3), minval=-1, maxval=1)
    variables = random_variables(model, x.shape)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    train_out, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
    assert all(jax.tree.leaves(moved))
    eval_out = apply(variables, x, train=False)
    assert not np.allclose(train_out, eval_out)


def test_stages_compose_to_the_whole_network():
    """Cutting at any stage and continuing from its activation gives the same logits."""
    model = MobileNetV2(alpha=0.35, include_top=True, num_classes=5, conv_impl="lax")
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 48, 40, 3), minval=-1, maxval=1)
    variables = random_variables(model, x.shape)
    apply = jax.jit(model.apply, static_argnames=("start", "stop"))
    whole = apply(variables, x)
    for stage in (0, 1, 12, NUM_STAGES - 1, NUM_STAGES):  # ends, first block, a middle one
        middle = apply(variables, x, stop=stage)
        # The same operations in two programs: XLA fuses around the cut differently, which
        # may reorder a few roundings. Measured: bit-equal here; bounded by what reordering
        # every layer's sums gives (the Keras parity: <= 9e-7 on random weights).
        got = apply(variables, middle, start=stage)
        assert_close(got, whole, RANDOM_WEIGHTS_RTOL, what=f"stage {stage}")
    assert apply(variables, x, stop=12).shape == (2, 3, 3, 32)  # entering block 11: 1/16 scale
    with pytest.raises(ValueError, match=r"stages \[5, 3\)"):
        model.apply(variables, x, start=5, stop=3)


def test_every_keras_layer_has_a_stage_in_network_order():
    names = keras_layer_names(1.0, include_top=True)
    stages = [stage_of_layer(n) for n in names]
    assert stages == sorted(stages) and set(stages) == set(range(NUM_STAGES))
    assert stage_of_layer("block_11_depthwise") == 12
    with pytest.raises(ValueError, match="not a MobileNetV2 layer"):
        stage_of_layer("head")


def test_small_input_is_rejected():
    model = MobileNetV2(include_top=False)
    with pytest.raises(ValueError, match="at least 32x32"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 64, 3)))


def test_truncated_file_gives_clear_error(tmp_path, shared_weights):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(shared_weights.read_bytes()[: 3_000_000])
    with pytest.raises(WeightsError, match=r"truncated\.h5 is not a readable Keras HDF5 file"):
        pretrained.mobilenet_v2(1.0, 96, include_top=False, weights=truncated)


def test_other_alpha_names_the_files_alpha_and_the_fix(shared_weights):
    with pytest.raises(WeightsError) as error:
        pretrained.mobilenet_v2(0.5, 96, include_top=False, weights=shared_weights)
    message = str(error.value)
    assert "\n" not in message
    assert "holds MobileNetV2 (alpha=1.0)" in message and "not MobileNetV2 (alpha=0.5)" in message
    assert "--alpha 1.0" in message


def test_top_requested_from_no_top_file_is_missing_predictions(shared_weights):
    with pytest.raises(WeightsError, match="'params/predictions/bias' is missing"):
        pretrained.mobilenet_v2(1.0, 96, include_top=True, weights=shared_weights)


def test_new_head_leaves_only_the_classifier_unloaded(shared_weights):
    _, reference = pretrained.mobilenet_v2(1.0, 96, include_top=False, weights=shared_weights)
    _, variables = pretrained.mobilenet_v2(
        1.0, 96, include_top=True, num_classes=5, weights=shared_weights
    )
    assert variables["params"]["predictions"]["kernel"].shape == (1280, 5)
    for collection in ("params", "batch_stats"):
        for layer, leaves in reference[collection].items():
            for name, value in leaves.items():
                np.testing.assert_array_equal(variables[collection][layer][name], value)
    # The new classifier starts exactly where the whole model's random init puts it (it is
    # initialised alone, without compiling the backbone's initialisers).
    _, random_init = pretrained.mobilenet_v2(1.0, 96, include_top=True, num_classes=5,
                                             weights=None)  # fmt: skip
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(variables["params"]["predictions"][name],
                                      random_init["params"]["predictions"][name])  # fmt: skip
