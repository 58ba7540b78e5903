"""Imbalanced folders: ``--class-weight balanced`` weighs the training loss by Keras's and
scikit-learn's n / (classes x count), and the start of a run warns when the training classes'
counts differ by more than 3x. The folder is built from the tiny real photos (16 cats, 4 dogs).
"""

from __future__ import annotations

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn import data, metrics, phases, sharding
from flaxcnn.config import TrainConfig
from flaxcnn.experiments import transfer
from flaxcnn.models import build_model

SIZE = 32


@pytest.fixture(scope="module")
def imbalanced(tiny_cats_vs_dogs, tmp_path_factory):
    """train: 16 cats, 4 dogs (4x apart); validation: 8 of each."""
    root = tmp_path_factory.mktemp("imbalanced")
    for split, keep in (("train", {"cat": 16, "dog": 4}), ("validation", {"cat": 8, "dog": 8})):
        for label, count in keep.items():
            (root / split / label).mkdir(parents=True)
            for f in sorted((tiny_cats_vs_dogs / split / label).glob("*.jpg"))[:count]:
                shutil.copy(f, root / split / label / f.name)
    return root


def test_balanced_weights_are_n_over_classes_times_count(imbalanced):
    counts = data.class_counts(data.open_dataset(str(imbalanced), download=False), "train")
    np.testing.assert_array_equal(counts, [16, 4])
    weights = metrics.class_weights_for("balanced", counts)
    np.testing.assert_allclose(weights, [20 / (2 * 16), 20 / (2 * 4)], rtol=1e-7)
    assert np.dot(weights, counts) / counts.sum() == pytest.approx(1.0)  # the loss keeps its scale
    assert metrics.class_weights_for("none", counts) is None
    assert metrics.imbalance_warning(["cat", "dog"], [16, 6], "none") is None  # 2.7x: no line
    line = metrics.imbalance_warning(["cat", "dog"], counts, "none")
    assert "cat has 16 images, dog 4 (4.0x apart)" in line and "--class-weight balanced" in line


def test_the_training_loss_is_class_weighted():
    """The head phase's own train step: its loss sum is each example's cross-entropy times its
    class's weight (what the gradient descends), its count and accuracy unweighted."""
    config = TrainConfig(model_options={"alpha": 0.35}, weights=None, image_size=SIZE,
                         head_learning_rate=1e-2, weight_decay=0.0)  # fmt: skip
    model = build_model(config.model_config(2))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    head = phases.plan(config)[0]
    mesh = sharding.make_mesh()
    weights = np.array([0.625, 2.5], np.float32)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 1280)).astype(np.float32)
    batch = {"features": features, "label": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int32)}
    sums = {}
    for name, class_weights in (("weighted", weights), ("plain", None)):
        setup = phases.setup(head, variables["params"], model, mesh, config, 4, class_weights)
        state = sharding.replicate(setup.initial_state(variables, jax.random.PRNGKey(1)), mesh)
        state, sums[name] = jax.device_get(setup.steps.train(state, sharding.to_global(batch,
                                                                                        mesh)))
    # The loss of the weights the step started from, dropout included: recompute it.
    dropout = jax.random.fold_in(jax.random.PRNGKey(1), 0)
    logits = model.apply(variables, features, train=True, rngs={"dropout": dropout},
                         method=model.classify_features)  # fmt: skip
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    np.testing.assert_allclose(sums["weighted"]["loss_sum"],
                               np.sum(losses * weights[batch["label"]]), rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(sums["plain"]["loss_sum"], np.sum(losses), rtol=1e-5)
    assert sums["weighted"]["count"] == 8
    assert sums["weighted"]["correct"] == sums["plain"]["correct"]  # accuracy is not weighted


def test_a_run_on_an_imbalanced_folder_warns_and_weighs_its_loss(imbalanced, tmp_path, capsys):
    argv = ["--data", str(imbalanced), "--no-download", "--weights", "none", "--alpha", "0.35",
            "--image-size", str(SIZE), "--batch-size", "4", "--conv-impl", "lax",
            "--head-epochs", "1", "--finetune-epochs", "0", "--head-learning-rate", "1e-2",
            "--weight-decay", "0.1", "--class-weight", "balanced",
            "--workdir", str(tmp_path / "run"), "--no-compilation-cache"]  # fmt: skip
    flaxcnn_log = logging.getLogger("flaxcnn")
    handlers = list(flaxcnn_log.handlers)
    try:  # the CLI logs to (captured) stderr through a handler of its own
        assert transfer.main(argv) == 0
    finally:
        flaxcnn_log.handlers[:] = handlers
        flaxcnn_log.propagate = True
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "classes are imbalanced" in line]
    assert len(lines) == 1, lines
    assert "warning: the training classes are imbalanced: cat has 16 images, dog 4 (4.0x " in (
        lines[0])  # fmt: skip
    assert "weighted (balanced: cat 0.625, dog 2.5; the reported train loss" in lines[0]
    config = TrainConfig.from_json((tmp_path / "run" / "config.json").read_text())
    assert config.class_weight == "balanced"
