"""SimpleCNN: the seed's PyTorch network by default, with a flatten size that follows the input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn.models import SimpleCNN, build_model, random_variables


def _variables(model: SimpleCNN, height: int, width: int, channels: int = 3):
    return jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, height, width, channels))
    )


def _count(variables) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables))


def _expected_count(height, width, channels=3, features=(16, 32), dense=(256,), classes=10):
    """Parameter count written out layer by layer, as one would for the PyTorch net."""
    total, in_channels = 0, channels
    for width_out in features:
        total += 3 * 3 * in_channels * width_out + width_out  # conv3x3 kernel + bias
        in_channels = width_out
        height, width = height // 2, width // 2  # max-pool 2, floor like PyTorch
    in_features = height * width * in_channels  # the flatten size
    for width_out in (*dense, classes):
        total += in_features * width_out + width_out
        in_features = width_out
    return total


def test_default_is_the_seed_pytorch_network():
    # conv 3->16 (448) + conv 16->32 (4,640) + dense 32*8*8->256 (524,544) + dense 256->10 (2,570)
    assert _count(_variables(SimpleCNN(), 32, 32)) == 532_202
    assert _expected_count(32, 32) == 532_202


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 64), (48, 80), (33, 35)])
def test_flatten_size_follows_the_input(height, width):
    variables = _variables(SimpleCNN(), height, width)
    flatten = (height // 4) * (width // 4) * 32
    assert variables["params"]["dense_0"]["kernel"].shape == (flatten, 256)
    assert _count(variables) == _expected_count(height, width)


def test_64x64_has_four_times_the_flatten_inputs():
    # Only dense_0 grows: 32*16*16 = 8,192 inputs instead of 2,048, i.e. 6,144 * 256 more weights.
    assert _count(_variables(SimpleCNN(), 64, 64)) == 532_202 + 6_144 * 256 == 2_105_066


def test_init_gives_finite_logits():
    model = SimpleCNN()
    images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    logits = jax.jit(model.apply)(variables, images)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    assert _count(variables) == 532_202


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 64)])
def test_output_shape(height, width):
    model = SimpleCNN(num_classes=7)
    images = np.random.default_rng(0).uniform(size=(5, height, width, 3)).astype(np.float32)
    logits = jax.jit(model.apply)(random_variables(model, (1, height, width, 3)), images)
    assert logits.shape == (5, 7)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_configurable_widths_and_grayscale_input():
    model = SimpleCNN(num_classes=3, features=(8, 16, 24), dense_features=(64, 32))
    variables = _variables(model, 40, 40, channels=1)
    params = variables["params"]
    assert set(params) == {"conv_0", "conv_1", "conv_2", "dense_0", "dense_1", "predictions"}
    assert params["conv_2"]["kernel"].shape == (3, 3, 16, 24)
    assert params["dense_0"]["kernel"].shape == (5 * 5 * 24, 64)  # 40 -> 20 -> 10 -> 5
    assert params["predictions"]["kernel"].shape == (32, 3)
    expected = _expected_count(40, 40, 1, features=(8, 16, 24), dense=(64, 32), classes=3)
    assert _count(variables) == expected


def test_no_hidden_dense_layer():
    variables = _variables(SimpleCNN(dense_features=()), 32, 32)
    assert variables["params"]["predictions"]["kernel"].shape == (32 * 8 * 8, 10)


def test_dropout_only_in_train_mode():
    model = SimpleCNN(dropout_rate=0.5)
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    variables = random_variables(model, (1, 32, 32, 3))
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply(variables, images)
    eval_b = apply(variables, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(train, eval_a)


def test_build_model_from_json_config():
    """Checkpoint metadata stores lists (JSON); the registry turns them back into tuples."""
    config = {"arch": "simple_cnn", "num_classes": 4, "features": [8, 16], "dense_features": [32]}
    model = build_model(config)
    assert model == SimpleCNN(num_classes=4, features=(8, 16), dense_features=(32,))
    assert _variables(model, 32, 32)["params"]["dense_0"]["kernel"].shape == (16 * 8 * 8, 32)


def test_cli_help_describes_one_phase_from_scratch(capsys):
    from flaxcnn.experiments import simple_cnn

    with pytest.raises(SystemExit) as done:
        simple_cnn.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--head-epochs HEAD_EPOCHS epochs of training: one phase, every parameter " \
        "trainable, from random initialisation" in text
    for transfer_only in ("feature extraction", "backbone", "BatchNorm", "phase 1",
                          "weights were trained"):
        assert transfer_only not in text, transfer_only


def test_cli_run_states_its_one_phase_without_batch_norm(tiny_cats_vs_dogs, tmp_path, capsys):
    import logging

    from flaxcnn.experiments import simple_cnn

    logger = logging.getLogger("flaxcnn")  # the CLI points it at the (captured) stderr
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    try:
        rc = simple_cnn.main(["--data", str(tiny_cats_vs_dogs), "--batch-size", "8",
                              "--head-epochs", "1", "--no-compilation-cache",
                              "--workdir", str(tmp_path / "run")])  # fmt: skip
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    # conv 3->16 (448) + conv 16->32 (4,640) + dense 2048->256 (524,544) + dense 256->2 (514)
    assert ("phase train: 530,146 trainable / 0 frozen parameters; trainable from the input; "
            "no running statistics; learning rate 0.001, augmentation off") in err
    assert "BatchNorm" not in err
