"""The training engine: freezing is exact, evaluation counts every example once, resume is exact."""

from __future__ import annotations

import math
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from tolerances import F32_EPS, assert_close, assert_within, max_diff

from flaxcnn import checkpoints, data, optim, phases, report, sharding, train
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model, get_backbone, random_variables
from flaxcnn.run import fit

SIZE = 32
MOBILENET_V2 = get_backbone("mobilenet_v2")


def _transfer_model():
    config = TrainConfig(model_options={"alpha": 0.35}, weights=None, image_size=SIZE)
    # 'lax' convs compile twice as fast; both formulations are checked against Keras elsewhere.
    model = build_model(config.model_config(3), conv_impl="lax")
    return model, random_variables(model, (1, SIZE, SIZE, 3))


def _batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


@pytest.mark.parametrize(
    ("trainable_from", "weight_decay"),
    [(None, 0.0), ("block_14_expand", 1e-2)],
)
def test_frozen_leaves_are_bit_identical_and_trainable_ones_move(trainable_from, weight_decay):
    model, variables = _transfer_model()
    trainable = MOBILENET_V2.layers_from(trainable_from, alpha=0.35) if trainable_from else ()
    rules = optim.transfer_rules(trainable)
    labels = optim.path_labels(variables["params"], rules)
    tx = optim.make_optimizer(1e-2, labels, weight_decay=weight_decay)
    state = train.TrainState.create(variables, tx, jax.random.PRNGKey(1))
    start = jax.tree.map(np.array, state.variables)
    mesh = sharding.make_mesh()
    steps = train.make_steps(model.apply, train.frozen_tree(labels), mesh, update_batch_stats=False)
    for seed in range(3):
        state, _ = steps.train(state, sharding.to_global(_batch(seed), mesh))
    end = jax.tree.map(np.array, state.variables)

    flat_labels = traverse_util.flatten_dict(labels)
    moved = frozen_same = 0
    for key, before in traverse_util.flatten_dict(start["params"]).items():
        after = traverse_util.flatten_dict(end["params"])[key]
        if flat_labels[key] == optim.FROZEN:
            assert before.tobytes() == after.tobytes(), key
            frozen_same += 1
        else:
            assert not np.array_equal(before, after), f"trainable {key} did not move"
            moved += 1
    # BatchNorm statistics of the backbone are never updated (inference-mode BN).
    for key, before in traverse_util.flatten_dict(start["batch_stats"]).items():
        assert before.tobytes() == traverse_util.flatten_dict(end["batch_stats"])[key].tobytes()
    assert moved >= 2 and frozen_same > 100
    if trainable_from is not None:
        assert flat_labels[("backbone", "block_14_expand", "kernel")] == optim.TRAINABLE
        assert flat_labels[("backbone", "block_13_project", "kernel")] == optim.FROZEN


def test_fine_tuning_moves_the_head_at_its_own_learning_rate():
    """Adam's first step moves each leaf by about its learning rate (|m / sqrt(v)| = 1), so
    the largest change per group shows which rate it got."""
    model, variables = _transfer_model()
    rules = optim.transfer_rules(MOBILENET_V2.layers_from("block_14_expand", alpha=0.35),
                                 head_label=optim.HEAD)  # fmt: skip
    labels = optim.path_labels(variables["params"], rules)
    with pytest.raises(ValueError, match="no head_learning_rate"):
        optim.make_optimizer(1e-4, labels)
    tx = optim.make_optimizer(1e-4, labels, head_learning_rate=1e-2)
    state = train.TrainState.create(variables, tx, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh()
    steps = train.make_steps(model.apply, train.frozen_tree(labels), mesh, update_batch_stats=False)
    end, _ = steps.train(state, sharding.to_global(_batch(0), mesh))

    flat_labels = traverse_util.flatten_dict(labels)
    before = traverse_util.flatten_dict(variables["params"])
    after = traverse_util.flatten_dict(jax.tree.map(np.array, end.params))
    largest = {optim.TRAINABLE: 0.0, optim.HEAD: 0.0, optim.FROZEN: 0.0}
    magnitude = dict(largest)
    for key, label in flat_labels.items():
        change = float(np.abs(after[key] - np.asarray(before[key])).max())
        largest[label] = max(largest[label], change)
        magnitude[label] = max(magnitude[label], float(np.abs(before[key]).max()))
    # Adam's first step is lr * m_hat / (sqrt(v_hat) + 1e-8) = lr * (1 - 6.4e-6): the bias
    # correction 1 - 0.999**1 rounds in float32 to 1e-3 * (1 - 1.3e-5) (an ulp more in
    # XLA's pow would make that 3e-5 of lr), and 1e-8/|g| is < 1e-6 for a group's largest
    # gradients. Adding the step to a parameter p rounds to half an ulp of p. So the largest
    # change is lr to 1e-4 of lr plus an ulp of the group's largest parameter (BN scales up
    # to 1.5: 1.2e-7, i.e. 1.2e-3 of lr=1e-4) [measured 5.8e-8 and 1.7e-8 off: 0.06 and 0.13
    # of the bound]. The wrong group's rate would be 100x off.
    for label, rate in ((optim.HEAD, 1e-2), (optim.TRAINABLE, 1e-4)):
        bound = 1e-4 * rate + float(np.spacing(np.float32(magnitude[label])))
        assert_within(abs(largest[label] - rate), 1.0, bound, f"{label} step - lr")
    assert largest[optim.FROZEN] == 0.0
    # The phase's opening line counts the head among the trainable parameters.
    trainable = sum(np.size(before[k]) for k, label in flat_labels.items() if label != "frozen")
    assert optim.count_by_label(variables["params"], labels)[optim.TRAINABLE] == trainable


def test_fine_tuning_above_frozen_stages_runs_them_apart_with_the_same_result():
    """``phases.setup`` computes the whole stages below the first trainable layer apart from
    the differentiated step (train.AfterFrozenStages); the steps then give what one
    computation of the whole model gives."""
    config = TrainConfig(model_options={"alpha": 0.35}, weights=None, image_size=SIZE,
                         fine_tune_at="block_14_expand").resolved()  # fmt: skip
    phase = phases.plan(config)[-1]
    model, variables = _transfer_model()
    mesh = sharding.make_mesh()
    setup = phases.setup(phase, variables["params"], model, mesh, config, 10)
    assert isinstance(setup.steps.train, train.AfterFrozenStages)
    assert phases.frozen_stage_count(phase, config) > 0
    whole = train.make_steps(model.apply, setup.frozen, mesh, update_batch_stats=False)
    runs = {}
    for name, steps in (("apart", setup.steps), ("whole", whole)):
        state, losses = setup.initial_state(variables, jax.random.PRNGKey(1)), []
        for seed in range(3):
            state, sums = steps.train(state, sharding.to_global(_batch(seed), mesh))
            losses.append(float(sums["loss_sum"]))
        runs[name] = losses, jax.tree.map(np.array, state.params)
    # The same float32 operations compiled as two programs instead of one: XLA may fuse and
    # order them otherwise, each loss off by a few roundings of its terms (8 examples, 3
    # classes): 1e-6 [measured: bit-equal here]. A wrong stage or input would be off by O(1).
    assert_close(runs["apart"][0], runs["whole"][0], 1e-6, what="losses")
    # Adam moves each trainable leaf by <= lr per step whatever the gradient's size, so the
    # parameters' difference is bounded by that update: 1e-2 of lr x 3 steps leaves room for
    # gradients whose float rounding differs [measured: bit-equal].
    lr_steps = 3 * config.finetune_learning_rate
    assert_within(max_diff(runs["apart"][1], runs["whole"][1]), 1e-2, lr_steps, "parameters")


def test_fine_tune_at_resolves_keras_index_and_names():
    fine_tune_layer = MOBILENET_V2.fine_tune_layer
    assert fine_tune_layer("100") == "block_11_depthwise"  # layer 100 is a ReLU
    assert fine_tune_layer(1) == "Conv1"
    assert fine_tune_layer("block_11") == "block_11_expand"
    assert fine_tune_layer("block_1") == "block_1_expand"  # not block_10..16
    assert fine_tune_layer("Conv_1") == "Conv_1"
    with pytest.raises(ValueError, match=r"out of range; MobileNetV2 has Keras layers 1\.\.153"):
        fine_tune_layer("154")
    with pytest.raises(ValueError, match="names no MobileNetV2 layer"):
        fine_tune_layer("block_99")


def test_every_parameter_must_match_a_rule():
    with pytest.raises(ValueError, match="matches no freeze rule"):
        optim.path_labels({"head": {"kernel": np.zeros(2)}}, [(r"backbone/.*", optim.FROZEN)])


def test_evaluation_weights_every_example_once():
    """7 examples in batches of 4: the padded 8th must not count; result = per-example mean."""
    model, variables = _transfer_model()
    mesh = sharding.make_mesh()
    labels = optim.path_labels(variables["params"], optim.ALL_TRAINABLE)
    steps = train.make_steps(model.apply, train.frozen_tree(labels), mesh, update_batch_stats=False)
    data = _batch(0, n=7)
    logits = np.asarray(jax.jit(model.apply)(variables, data["image"]))
    log_probs = jax.nn.log_softmax(logits)
    expected_loss = float(-np.mean(log_probs[np.arange(7), data["label"]]))
    expected_acc = float(np.mean(logits.argmax(-1) == data["label"]))

    def batches():
        for start in (0, 4):
            idx = np.arange(start, start + 4)
            mask = idx < 7
            idx = np.where(mask, idx, 0)
            yield {"image": data["image"][idx], "label": data["label"][idx], "mask": mask}

    result = train.evaluate(steps, variables, batches(), mesh)
    assert result["count"] == 7
    # Batches of 4 against one of 7: other conv kernels, the same forward pass up to
    # rounding, which random weights do not amplify (<= 9e-7 of the magnitude in the Keras
    # parity) [measured 1.6e-7]. A padded example counted, or one missed, moves the mean by
    # ~1/7 of a loss.
    assert_close(result["loss"], expected_loss, 1e-5, what="loss")
    assert result["accuracy"] == pytest.approx(expected_acc, rel=F32_EPS)  # k/7 in f32 vs f64


def test_feature_batches_cover_each_example_once_when_evaluating():
    cache = {"features": np.arange(10, dtype=np.float32)[:, None], "label": np.arange(10)}
    batches = list(train.feature_batches(cache, 4, seed=None))
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    seen = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(10))
    train_a = list(train.feature_batches(cache, 4, seed=3, epoch=1))
    train_b = list(train.feature_batches(cache, 4, seed=3, epoch=1, start_batch=1))
    assert len(train_a) == 2 and np.array_equal(train_a[1]["label"], train_b[0]["label"])


def _tiny_config(data_dir, **changes):
    return TrainConfig(
        data=str(data_dir), download=False, model_options={"alpha": 0.35}, weights=None,
        image_size=SIZE,
        batch_size=8, head_epochs=2, finetune_epochs=1, fine_tune_at="block_15",
        head_learning_rate=1e-2, finetune_learning_rate=1e-3, keep_checkpoints=5,
        checkpoint_every_seconds=0,
        conv_impl="lax",
    ).replace(**changes)  # fmt: skip


def _assert_recorded_rates_are_the_rates_used(history, steps_per_epoch, epochs):
    """The learning-rate columns hold the cosine's rate at the epoch's last step, counted from
    the phase's first step: below the peak, above 0, falling within a phase."""
    peaks = {"head": {"learning_rate": 1e-2},
             "finetune": {"learning_rate": 1e-3, "head_learning_rate": 1e-3}}  # fmt: skip
    done = {"head": 0, "finetune": 0}
    previous = {}
    for record in history:
        phase = record["phase"]
        done[phase] += 1
        last_step = done[phase] * steps_per_epoch - 1  # the schedule's count at that step
        total = epochs[phase] * steps_per_epoch
        assert set(peaks[phase]) == {k for k in record if k.endswith("learning_rate")}
        for key, peak in peaks[phase].items():
            used = peak * 0.5 * (1 + math.cos(math.pi * last_step / total))
            # optax computes the cosine in float32: a few ulps of float32 at the peak's scale.
            assert record[key] == pytest.approx(used, rel=0, abs=peak * 2**-21)
            assert 0 < record[key] < peak
            assert record[key] < previous.get((phase, key), math.inf)
            previous[phase, key] = record[key]


def test_curves_have_whole_epochs_on_the_axis():
    history = [{"epoch": e, "phase": "head" if e < 3 else "finetune", "train_loss": 1 / e,
                "val_loss": 1.1 / e, "train_accuracy": 1 - 0.1 / e, "val_accuracy": 1 - 0.2 / e}
               for e in (1, 2, 3)]  # fmt: skip
    figure = report.curves_figure(history)
    figure.canvas.draw()
    for axes in figure.axes:
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        labels = [label.get_text() for label in axes.get_xticklabels() if label.get_text()]
        assert all(label.isdigit() for label in labels), labels


def _comparable(history):
    timing = {"epoch_seconds", "wall_seconds", "images_per_second"}
    return [{k: v for k, v in h.items() if k not in timing} for h in history]


def test_resume_from_mid_run_checkpoint_reaches_identical_results(
    tiny_cats_vs_dogs, tmp_path, caplog
):
    """Head phase on cached features, then fine-tuning on images; resume mid head phase.

    Fine-tuning evaluates from cached activations of its frozen stages: its metrics must
    equal a full evaluation of the same weights on the images."""
    config = _tiny_config(tiny_cats_vs_dogs)
    with caplog.at_level("INFO", logger="flaxcnn"):  # flaxcnn.run and .phases
        full = fit(config, tmp_path / "full")
    assert [h["phase"] for h in full.summary["epochs"]] == ["head", "head", "finetune"]
    assert [h["epoch"] for h in full.summary["epochs"]] == [1, 2, 3]
    _assert_recorded_rates_are_the_rates_used(full.summary["epochs"], steps_per_epoch=4,
                                              epochs={"head": 2, "finetune": 1})  # fmt: skip
    assert "cached the validation activations entering block_15 " in caplog.text
    mesh = sharding.make_mesh()
    steps = train.make_steps(full.model.apply, None, mesh, update_batch_stats=False)
    dataset = data.open_dataset(str(tiny_cats_vs_dogs), download=False)
    batches = data.eval_batches(dataset, "validation", batch_size=8, image_size=SIZE,
                                preprocessing="tf")  # fmt: skip
    on_images = train.evaluate(steps, full.state.variables, batches, mesh)
    last = full.summary["epochs"][-1]
    assert on_images["count"] == 16 and last["val_accuracy"] == on_images["accuracy"]
    # Cached activations of the frozen stages against the whole network: the same layers cut
    # into two programs, which may round differently at the cut [measured: bit-equal].
    assert_close(last["val_loss"], on_images["loss"], 1e-5, what="val_loss")

    # Keep only the checkpoint written after epoch 1, as if the run had died during epoch 2.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "full" / checkpoints.LATEST_DIR, resumed_dir / checkpoints.LATEST_DIR
    )
    steps = checkpoints.complete_steps(resumed_dir / checkpoints.LATEST_DIR)
    assert len(steps) == 3
    for step in steps[1:]:
        shutil.rmtree(resumed_dir / checkpoints.LATEST_DIR / str(step))
    resumed = fit(config, resumed_dir, resume=True)

    assert _comparable(resumed.summary["epochs"]) == _comparable(full.summary["epochs"])
    for a, b in zip(
        jax.tree.leaves(full.state.variables), jax.tree.leaves(resumed.state.variables), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_interval_saves_phase_ends_and_keeps_the_best_epoch(tiny_cats_vs_dogs, tmp_path):
    """Epochs shorter than --checkpoint-every-seconds are saved only at the end of a phase; the
    best epoch is held in memory meanwhile and lands in best/ with its own step."""
    config = _tiny_config(tiny_cats_vs_dogs, head_epochs=4, finetune_epochs=0,
                          checkpoint_every_seconds=3600, head_learning_rate=0.3)  # fmt: skip
    result = fit(config, tmp_path / "run")
    history = result.summary["epochs"]
    steps_per_epoch = int(result.state.step) // len(history)
    assert checkpoints.complete_steps(tmp_path / "run" / checkpoints.LATEST_DIR) == [
        int(result.state.step)
    ]
    accuracies = [h["val_accuracy"] for h in history]
    best_epoch = max(i for i, a in enumerate(accuracies) if a == max(accuracies)) + 1
    best_steps = checkpoints.complete_steps(tmp_path / "run" / checkpoints.BEST_DIR)
    assert best_steps == [best_epoch * steps_per_epoch]
    _, variables, metadata = checkpoints.restore(tmp_path / "run" / checkpoints.BEST_DIR)
    assert metadata["epoch"] == best_epoch and metadata["val_accuracy"] == max(accuracies)
    if best_epoch < len(history):  # an earlier epoch's weights, not the final ones
        head = lambda v: np.asarray(v["params"]["head"]["kernel"])
        assert not np.array_equal(head(variables), head(result.state.variables))

