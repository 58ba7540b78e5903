"""Test-time augmentation (``flaxcnn.tta``): a mirror-symmetric image predicts as without it, a
real photo gets the mean of its and its mirror's logits, and the cached evaluations (head
phase on features, fine-tuning on frozen activations) equal a full evaluation with the views.

A tiny MobileNetV2 (alpha 0.35, 32 px, random init, 'lax' convolutions) on real photos.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import checkpoints, data, phases, predict, sharding, train, tta
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model, random_variables
from tests.tolerances import assert_close

SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    config = TrainConfig(model_options={"alpha": 0.35}, weights=None, image_size=SIZE,
                         conv_impl="lax", batch_size=8, fine_tune_at="block_15",
                         head_learning_rate=1e-2, weight_decay=0.1, tta="flip")  # fmt: skip
    model = build_model(config.model_config(2), conv_impl="lax")
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    return config, model, variables


def _photos(folder, count=4) -> np.ndarray:
    paths = sorted(folder.glob("validation/*/*.jpg"))[:count]
    return np.concatenate([data.load_images(p, SIZE, "tf") for p in paths])


def test_flip_of_a_mirror_symmetric_image_changes_nothing_bit_for_bit(tiny, tiny_cats_vs_dogs):
    _, model, variables = tiny
    photos = _photos(tiny_cats_vs_dogs)
    symmetric = (photos + photos[:, :, ::-1]) / 2  # x[j] and x[W-1-j]: the same sum
    assert np.array_equal(symmetric, symmetric[:, :, ::-1])
    plain = jax.jit(lambda x: model.apply(variables, x))
    flipped = jax.jit(lambda x: tta.logits(lambda y: model.apply(variables, y), x, "flip"))
    # Each view runs at the plain batch shape, and (a + a) / 2 == a.
    np.testing.assert_array_equal(flipped(symmetric), plain(symmetric))
    assert not np.array_equal(flipped(photos), plain(photos))  # real photos do change


def test_flip_of_a_photo_is_the_mean_of_its_and_its_mirrors_logits(tiny, tiny_cats_vs_dogs):
    _, model, variables = tiny
    photos = _photos(tiny_cats_vs_dogs)
    plain = jax.jit(lambda x: model.apply(variables, x))
    separately = (np.asarray(plain(photos)) + np.asarray(plain(photos[:, :, ::-1]))) / 2
    together = jax.jit(lambda x: tta.logits(lambda y: model.apply(variables, y), x, "flip"))
    np.testing.assert_array_equal(together(photos), separately)  # [measured: bit-equal]
    none = jax.jit(lambda x: tta.logits(lambda y: model.apply(variables, y), x, "none"))
    np.testing.assert_array_equal(none(photos), plain(photos))
    with pytest.raises(ValueError, match="allowed: none, flip"):
        tta.num_views("mirror")


def test_cached_evaluations_with_flip_equal_a_full_evaluation(tiny, tiny_cats_vs_dogs):
    """Head phase: cached features of both views; fine-tuning: cached activations entering
    block_15 of both views. Both equal evaluating the whole network on the images with flip."""
    config, model, variables = tiny
    config = config.replace(data=str(tiny_cats_vs_dogs), download=False)
    dataset = data.open_dataset(config.data, download=False)
    mesh = sharding.make_mesh()
    pipeline = dict(batch_size=8, image_size=(SIZE, SIZE), preprocessing="tf")
    shard = dict(process_index=0, process_count=1)

    def full(mode):
        steps = train.make_steps(model.apply, None, mesh, update_batch_stats=False, tta=mode)
        batches = data.eval_batches(dataset, "validation", **pipeline)
        return train.evaluate(steps, variables, batches, mesh)

    on_images, without = full("flip"), full("none")
    assert on_images["count"] == 16 and on_images["loss"] != without["loss"]
    head, finetune = phases.plan(config)
    assert head.cached_features
    for phase in (head, finetune):
        setup = phases.setup(phase, variables["params"], model, mesh, config, steps_per_epoch=4)
        source = phases.PhaseData.build(phase, dataset, model, variables, mesh, config, pipeline,
                                        shard)  # fmt: skip
        assert source.validation_cache["features"].shape[1] == 2  # both views cached
        cached = source.evaluate(setup.steps, variables)
        assert cached["count"] == 16 and cached["accuracy"] == on_images["accuracy"]
        # The same layers in two programs, cut at the cache [measured: bit-equal].
        assert_close(cached["loss"], on_images["loss"], 1e-5, what=f"{phase.name} val_loss")


def test_predict_uses_the_runs_tta_unless_overridden(tmp_path, tiny_cats_vs_dogs, capsys):
    """A checkpoint records the run's mode; predict averages the mirror's logits with it,
    and ``--tta none`` predicts from the image alone."""
    model_config = {"arch": "simple_cnn", "num_classes": 2, "features": [4], "dense_features": []}
    model = build_model(model_config)
    metadata = {"model": model_config, "image_size": [SIZE, SIZE], "preprocessing": "unit",
                "class_names": ["cat", "dog"], "tta": "flip"}  # fmt: skip
    run = tmp_path / "run"
    checkpoints.save_variables(run / checkpoints.BEST_DIR / "1",
                               random_variables(model, (1, SIZE, SIZE, 3)), metadata)  # fmt: skip
    paths = sorted(tiny_cats_vs_dogs.glob("validation/*/*.jpg"))[:3]
    model, variables, restored = checkpoints.restore(run)
    assert predict.tta_mode(restored) == "flip"
    images = np.concatenate([data.load_images(p, SIZE, "unit") for p in paths])
    plain = lambda x: np.asarray(model.apply(variables, x))
    want = {"flip": jax.nn.softmax((plain(images) + plain(images[:, :, ::-1])) / 2),
            "none": jax.nn.softmax(plain(images))}  # fmt: skip
    assert not np.allclose(want["flip"], want["none"], rtol=0, atol=1e-6)
    for mode, flags in (("flip", []), ("none", ["--tta", "none"])):
        assert predict.main(["--checkpoint", str(run), "--json", *flags, *map(str, paths)]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        got = np.array([[row["probabilities"][c] for c in ("cat", "dog")] for row in rows])
        # Another batch shape than the computation above: a few float32 roundings of 1.0.
        np.testing.assert_allclose(got, want[mode], rtol=0, atol=1e-6)
