"""ResNet V1/V2 are Keras's ResNet50 ... ResNet152V2: same layers, counts and outputs."""

from __future__ import annotations

import functools
import re

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from keras_reference import randomize_weights, save_legacy_h5
from tolerances import assert_close

from flaxcnn import checkpoints, pretrained
from flaxcnn.models import get_backbone, layers, random_variables
from flaxcnn.models.resnet import ResNet, num_stages
from flaxcnn.weights import WeightsError, read_keras_h5

VARIANTS = ("resnet50", "resnet101", "resnet152", "resnet50_v2", "resnet101_v2", "resnet152_v2")
# The 50s run at several sizes (a no-top Keras model of any size); the deeper ones, the same
# blocks repeated, with the top at the minimum size, where one forward pass costs little.
SMALL = ("resnet50", "resnet50_v2")
TOP_SIZE = (32, 32)  # Keras builds the top for one static input size
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def _images(name: str, shape, seed: int = 0) -> np.ndarray:
    """Random pixels preprocessed as the variant expects (V1 'caffe', V2 'tf')."""
    pixels = np.random.default_rng(seed).uniform(0, 255, (2, *shape, 3)).astype(np.float32)
    if get_backbone(name).preprocessing == "caffe":
        return pixels[..., ::-1] - CAFFE_MEAN_BGR
    return pixels / 127.5 - 1.0


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, size=(32, 32)):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))


def _base_name(name: str) -> str:
    """Keras numbers the layers it names itself (``input_2``, ``max_pooling2d_3``)."""
    return re.sub(r"^(input|max_pooling2d)(_\d+)?$", r"\1", name)


class KerasReference:
    """A tf_keras model of one variant with the top (built at ``TOP_SIZE``) and random
    non-trivial weights; for the 50s also a no-top model of any input size with the same
    weights; their ``.h5`` files in the published layouts, written when first asked for."""

    def __init__(self, name: str, folder):
        import tf_keras

        application = getattr(tf_keras.applications, get_backbone(name).keras_name)
        self.folder = folder
        self.top = application(weights=None, input_shape=(*TOP_SIZE, 3), include_top=True,
                               classifier_activation=None)  # fmt: skip
        randomize_weights(self.top, seed=VARIANTS.index(name))
        last = "post_relu" if name.endswith("_v2") else "conv5_block3_out"
        self.features = tf_keras.Model(self.top.input, self.top.get_layer(last).output)
        self.any_size = None
        if name in SMALL:
            self.any_size = application(weights=None, input_shape=(None, None, 3),
                                        include_top=False)  # fmt: skip
            for layer in self.any_size.layers:
                if layer.weights:  # the weightless input and max pools have numbered names
                    layer.set_weights(self.top.get_layer(layer.name).get_weights())

    @functools.cached_property
    def top_file(self):
        return save_legacy_h5(self.top, self.folder / "top.h5")

    @functools.cached_property
    def notop_file(self):
        return save_legacy_h5(self.any_size or self.features, self.folder / "notop.h5")


@pytest.fixture(scope="module")
def keras_reference(tmp_path_factory):
    """``keras_reference(name)``: the variant's :class:`KerasReference`, memoised (building
    a ResNet152 costs seconds)."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    built = {}

    def build(name):
        if name not in built:
            built[name] = KerasReference(name, tmp_path_factory.mktemp(name))
        return built[name]

    return build


@pytest.mark.parametrize("name", VARIANTS)
def test_layers_and_variable_counts_equal_keras(keras_reference, name):
    backbone, reference = get_backbone(name), keras_reference(name)
    keras_layers = reference.top.layers
    ours = backbone.layers(True)
    assert [_base_name(layer.name) for layer in keras_layers] == [
        _base_name(layer.name) for layer in ours
    ]
    assert [bool(layer.weights) for layer in keras_layers] == [layer.weighted for layer in ours]
    no_top = [layer.name for layer in keras_layers if layer.name not in ("avg_pool", "predictions")]
    assert [_base_name(n) for n in no_top] == [_base_name(n) for n in backbone.layer_names(False)]
    # Keras's count, with the top and without it (the same layers less the classifier).
    keras_no_top = sum(layer.count_params() for layer in keras_layers[:-2])
    assert _count(_abstract(backbone.build(include_top=True))) == reference.top.count_params()
    assert _count(_abstract(backbone.build(include_top=False))) == keras_no_top
    # The file lists Keras's layers, and holds exactly our weighted ones.
    with h5py.File(reference.top_file) as f:
        file_names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
    assert [_base_name(n) for n in file_names] == [_base_name(n.name) for n in ours]
    weighted = set(_abstract(backbone.build(include_top=True))["params"])
    assert weighted == set(read_keras_h5(reference.top_file))


# Variable counts as keras.io's table publishes them (include_top=True).
PUBLISHED_COUNTS = {"resnet50": 25_636_712, "resnet101": 44_707_176, "resnet152": 60_419_944,
                    "resnet50_v2": 25_613_800, "resnet101_v2": 44_675_560,
                    "resnet152_v2": 60_380_648}  # fmt: skip


@pytest.mark.parametrize("name", VARIANTS)
def test_contract(name):
    backbone = get_backbone(name)
    assert _count(_abstract(backbone.build(include_top=True))) == PUBLISHED_COUNTS[name]
    assert get_backbone(backbone.keras_name) is backbone
    assert backbone.num_stages == num_stages(int(re.findall(r"\d+", name)[0]))
    stages = [layer.stage for layer in backbone.layers(True)]
    assert stages == sorted(stages) and set(stages) == set(range(backbone.num_stages))
    first = backbone.fine_tune_layer(backbone.default_fine_tune_at)
    assert first.startswith("conv5_block1_") and backbone.stage_of(first) == backbone.num_stages - 4
    prefix = name.replace("_", "")
    for spec in backbone.weights:
        suffix = "" if spec.include_top else "_notop"
        assert spec.filename == f"{prefix}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
        assert spec.hash_algorithm == "md5"
        assert spec.input_size == backbone.default_input_size
    assert sorted(spec.include_top for spec in backbone.weights) == [False, True]


PARITY_CASES = [
    # name, input size (the minimum, odd, non-square), include_top, pooling
    ("resnet50", (32, 32), True, None),
    ("resnet50", (57, 41), False, None),
    ("resnet50", (96, 96), False, "max"),
    ("resnet50_v2", (32, 32), True, None),
    ("resnet50_v2", (41, 57), False, "avg"),
    ("resnet50_v2", (96, 96), False, None),
    ("resnet101", (32, 32), True, None),
    ("resnet152", (32, 32), True, None),
    ("resnet101_v2", (32, 32), True, None),
    ("resnet152_v2", (32, 32), True, None),
]

# Parity bound, as a fraction of the Keras output's largest magnitude. Both sides run the same
# float32 operations in other orders (XLA's kernels against oneDNN's; jit-fused or op by op),
# so they differ by rounding that the layers propagate; random weights (norm variances in
# [0.5, 1.5]) amplify none of it. Measured <= 1.9e-6 (~16 eps) over PARITY_CASES and both
# formulations on a 2-core AVX-512 AMD EPYC, the deepest (ResNet152V2) the worst, and 6e-7
# between folded and unfolded BatchNorm. 3e-5 leaves 15x for kernels that sum in other orders
# or by other algorithms (AVX2, Winograd 3x3 convs in oneDNN); it is the size of Keras's own
# oneDNN-vs-Eigen spread on real features (~2.3e-5), while a wrong layer, constant, padding
# or transposed weight is off by 1e-2 to 1 of the magnitude.
RANDOM_WEIGHTS_RTOL = 3e-5


@pytest.mark.parametrize(("name", "size", "include_top", "pooling"), PARITY_CASES)
def test_outputs_equal_keras(keras_reference, name, size, include_top, pooling):
    import tf_keras

    reference = keras_reference(name)
    images = _images(name, size, seed=sum(size))
    if include_top:
        expected = reference.top(images, training=False).numpy()
    else:
        expected = reference.any_size(images, training=False)
        pool = {"avg": tf_keras.layers.GlobalAveragePooling2D,
                "max": tf_keras.layers.GlobalMaxPooling2D}.get(pooling)  # fmt: skip
        expected = (pool()(expected) if pool else expected).numpy()
    assert np.abs(expected).mean() > 0.05 * np.abs(expected).max()  # a signal, not a few spikes
    weights = reference.top_file if include_top else reference.notop_file
    for conv_impl in ("lax", "unrolled"):
        model, variables = pretrained.create(name, weights=weights, input_size=size,
                                             include_top=include_top, pooling=pooling,
                                             conv_impl=conv_impl)  # fmt: skip
        # The deep ones op by op: each op compiles once and the blocks repeat its shapes,
        # where jit would compile a 100- or 150-layer program per formulation (~10 s each).
        apply = jax.jit(model.apply) if name in SMALL else model.apply
        got = np.asarray(apply(variables, images))
        assert got.shape == expected.shape
        assert_close(got, expected, RANDOM_WEIGHTS_RTOL, what=f"{name} {conv_impl}")


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
def test_winograd_convs_equal_keras(keras_reference, monkeypatch, name):
    """With Winograd F(2x2, 3x3) for every 3x3 stride-1 conv wide enough (at 96 px conv3's
    12x12 and conv4's 6x6 maps; the batch of 2 has fewer tiles than the CPU threshold, which
    is lowered here), the outputs are still Keras's."""
    monkeypatch.setattr(layers, "WINOGRAD_MIN_TILES", 1)
    reference = keras_reference(name)
    images = _images(name, (96, 96), seed=5)
    expected = reference.any_size(images, training=False).numpy()
    model, variables = pretrained.create(name, weights=reference.notop_file, input_size=96,
                                         conv_impl="unrolled")  # fmt: skip
    calls = str(jax.make_jaxpr(model.apply)(variables, images)).count("name=_winograd_3x3")
    # V1: conv3's 4 blocks and conv4's 6; V2 strides the last block's 3x3 of a stage: 3 + 5.
    assert calls == {"resnet50": 10, "resnet50_v2": 8}[name]
    got = np.asarray(jax.jit(model.apply)(variables, images))
    assert_close(got, expected, RANDOM_WEIGHTS_RTOL, what=f"{name} Winograd")


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
def test_any_size_from_the_minimum_has_keras_output_shape(keras_reference, name):
    """Odd, even and non-square sizes: the stride-2 paddings give Keras's feature map sizes."""
    model = get_backbone(name).build(include_top=False)
    for size in ((32, 33), (35, 37), (63, 64), (97, 50)):
        expected = keras_reference(name).any_size(np.zeros((1, *size, 3), np.float32)).shape
        assert jax.eval_shape(model.apply, _abstract(model, size),
                              jnp.zeros((1, *size, 3))).shape == tuple(expected)  # fmt: skip


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
def test_stages_compose_to_the_whole_network(name):
    """Cutting at a stage and continuing from its activation gives the same logits."""
    backbone = get_backbone(name)
    model = backbone.build(include_top=True, num_classes=5, conv_impl="lax")
    x = jnp.asarray(_images(name, (40, 48), seed=3))
    variables = random_variables(model, x.shape)
    whole = model.apply(variables, x)  # eagerly: each op compiles once, shapes repeat
    last = backbone.num_stages
    for stage in (0, 1, 3, 4, last - 1, last):  # the ends, the stem, strided blocks, the top
        middle = model.apply(variables, x, stop=stage)
        assert_close(model.apply(variables, middle, start=stage), whole, 1e-6, what=str(stage))
    # Unfolded BatchNorm (the same variables): equal up to rounding, as Keras is.
    unfolded = model.clone(fold_batch_norm=False).apply(variables, x)
    assert_close(unfolded, whole, RANDOM_WEIGHTS_RTOL, what="fold_batch_norm=False")
    assert model.apply(variables, x, stop=1).shape == (2, 10, 12, 64)  # after pool1: 1/4
    assert model.apply(variables, x, stop=last - 1).shape == (2, 2, 2, 2048)
    with pytest.raises(ValueError, match=r"stages \[5, 3\)"):
        model.apply(variables, x, start=5, stop=3)


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2"])
def test_train_mode_updates_batch_stats_and_eval_mode_is_deterministic(name):
    model = get_backbone(name).build(include_top=False, pooling="avg")
    x = jnp.asarray(_images(name, (32, 32), seed=4))
    variables = random_variables(model, x.shape)
    train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])  # fmt: skip
    assert all(jax.tree.leaves(moved)) and set(moved) == set(variables["batch_stats"])
    eval_out = model.apply(variables, x)
    np.testing.assert_array_equal(eval_out, model.apply(variables, x))
    assert not np.allclose(train_out, eval_out)


def test_pool1_pads_with_zeros_that_take_part_in_the_max():
    """V2's stem has no ReLU: with a negative conv1 output, the border windows of pool1_pool
    see Keras's zero padding (0), the inner ones only the conv output (-1)."""
    model = get_backbone("resnet50_v2").build(include_top=False)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.tree.map(np.asarray, random_variables(model, x.shape))
    variables["params"]["conv1_conv"] = {"kernel": np.zeros((7, 7, 3, 64), np.float32),
                                         "bias": -np.ones(64, np.float32)}  # fmt: skip
    pooled = np.asarray(model.apply(variables, x, stop=1))[0, :, :, 0]
    assert pooled.shape == (8, 8)
    assert (pooled[0, :] == 0).all() and (pooled[:, 0] == 0).all()
    assert (pooled[1:, 1:] == -1).all()  # the bottom/right windows end inside the 16x16 map


def test_bad_inputs_give_one_line_errors():
    model = ResNet(depth=50, include_top=False)
    cases = [
        (jnp.zeros((1, 31, 64, 3)), "ResNet50 needs inputs of at least 32x32, got 31x64"),
        (jnp.zeros((1, 64, 64, 1)), "ResNet50 expects NHWC images with 3 channels"),
    ]
    for x, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="pooling='sum'"):
        _abstract(ResNet(depth=50, include_top=False, pooling="sum"))
    with pytest.raises(ValueError, match="ResNet152V2 needs >= 32"):
        pretrained.create("resnet152_v2", weights=None, input_size=(31, 40))


def _weights_error(name, path, **kwargs) -> str:
    with pytest.raises(WeightsError) as error:
        pretrained.create(name, weights=path, input_size=32, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_file_of_another_variant_is_named(keras_reference):
    message = _weights_error("resnet50", keras_reference("resnet101").top_file, include_top=True)
    assert "holds ResNet101 weights, not ResNet50;" in message
    message = _weights_error("resnet50", keras_reference("resnet50_v2").notop_file)
    assert "holds ResNet50V2 weights, not ResNet50;" in message
    message = _weights_error("resnet152_v2", keras_reference("resnet50").notop_file)
    assert "holds ResNet50 weights, not ResNet152V2;" in message
    message = _weights_error("resnet50", keras_reference("resnet50").notop_file, include_top=True)
    assert "'params/predictions/bias' is missing from the file" in message


def test_a_file_of_another_family_is_named(shared_weights):
    message = _weights_error("resnet50_v2", shared_weights)
    assert "holds MobileNetV2 weights, not ResNet50V2;" in message


def test_new_head_loads_everything_else(keras_reference):
    reference = keras_reference("resnet50")
    _, loaded = pretrained.create("resnet50", weights=reference.top_file, input_size=32,
                                  include_top=True)  # fmt: skip
    _, variables = pretrained.create("resnet50", weights=reference.top_file, input_size=32,
                                     include_top=True, num_classes=3)  # fmt: skip
    assert variables["params"]["predictions"]["kernel"].shape == (2048, 3)
    for collection in ("params", "batch_stats"):
        for layer, leaves in loaded[collection].items():
            if layer != "predictions":
                for key, value in leaves.items():
                    np.testing.assert_array_equal(variables[collection][layer][key], value)


def test_checkpoint_round_trip(tmp_path):
    backbone = get_backbone("resnet50_v2")
    model = backbone.build(include_top=False, pooling="avg")
    variables = random_variables(model, (1, 32, 32, 3))
    metadata = {"model": backbone.model_config(include_top=False, pooling="avg"),
                "image_size": [32, 32], "preprocessing": backbone.preprocessing}  # fmt: skip
    checkpoints.save_variables(tmp_path / "ckpt", variables, metadata)
    restored_model, restored, restored_metadata = checkpoints.restore(tmp_path / "ckpt")
    assert restored_metadata == metadata
    assert restored_model == model  # the same fields: depth, preact, top, pooling, ...
    assert (restored_model.depth, restored_model.preact) == (50, True)
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
