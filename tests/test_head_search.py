"""The head phase's recipe search (``flaxcnn.head_search``): on a constructed case where one grid
point must win, it wins; the winner's head is the head trained alone with its recipe; the same
seed gives the same pick; flags fix their axes.

The features are constructed (two Gaussian classes along one of 16 dimensions), the head is
the real ``TransferClassifier`` head (dropout + dense) with its real train step.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from flaxcnn import head_search, metrics, optim, phases, sharding, train
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model
from tests.tolerances import F32_EPS, assert_close

EPOCHS, BATCH = 10, 16
# Too low a rate barely leaves the random init; 100 with Adam flings every weight by ~100 per
# step (a huge validation loss), and with a decay of 5 also diverges (NaN: lr x decay > 2);
# a decay of 5 at 0.1 halves the kernel every step, so the head underfits.
LEARNING_RATES, WEIGHT_DECAYS = (1e-4, 0.1, 100.0), (0.0, 5.0)
WINNER = head_search.Recipe(0.1, 0.0)


def _features(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x[:, 0] += np.where(label == 1, 2.0, -2.0)
    return {"features": x, "label": label.astype(np.int32)}


@pytest.fixture(scope="module")
def case():
    model = build_model(TrainConfig(model_options={"alpha": 0.35}).model_config(2))
    train_cache, validation_cache = _features(96, 0), _features(64, 1)
    rng = jax.random.PRNGKey(0)
    head = model.init(rng, train_cache["features"][:1], method=model.classify_features)["params"]
    phase = phases.Phase("head", EPOCHS, 0.0, (), None, True, False)
    steps_per_epoch = len(train_cache["label"]) // BATCH
    schedule = lambda rate: phases.learning_rate_schedule(rate, phase, "cosine", steps_per_epoch)
    return dict(apply_fn=phases.head_apply(model), head_params=head,
                rng=jax.random.fold_in(rng, 2), train_cache=train_cache,
                validation_cache=validation_cache, epochs=EPOCHS, batch_size=BATCH, seed=0,
                schedule=schedule, class_weights=None, mesh=sharding.make_mesh())  # fmt: skip


def _search(case, recipes=None):
    recipes = recipes or [head_search.Recipe(lr, wd) for lr in LEARNING_RATES
                          for wd in WEIGHT_DECAYS]  # fmt: skip
    return head_search.train_heads(recipes=recipes, **case)


def test_the_search_picks_the_one_grid_point_that_fits(case):
    run = _search(case)
    results = {recipe: r for recipe, r in zip(run.recipes, run.results, strict=True)}
    assert run.recipes[run.best] == WINNER
    # Each other point fails as constructed (so the pick is not a near tie).
    assert results[head_search.Recipe(1e-4, 0.0)]["val_loss"] > 1.0  # barely trained
    assert results[head_search.Recipe(0.1, 5.0)]["val_loss"] > 3 * results[WINNER]["val_loss"]
    assert results[head_search.Recipe(100.0, 0.0)]["val_loss"] > 5.0  # flung about
    assert np.isnan(results[head_search.Recipe(100.0, 5.0)]["val_loss"])  # diverged
    lines = head_search.table_lines(head_search.payload(run, EPOCHS))
    assert len(lines) == 1 + len(run.recipes)
    assert [line.endswith("<- picked") for line in lines[1:]] == [
        r == WINNER for r in run.recipes]  # fmt: skip
    config = head_search.picked_config(TrainConfig(head_learning_rate=None, weight_decay=None),
                                       run)  # fmt: skip
    assert (config.head_learning_rate, config.weight_decay) == (0.1, 0.0)


def test_a_grid_where_every_head_diverged_stops_the_run_in_one_line():
    nan = float("nan")
    run = head_search.GridRun([head_search.Recipe(1.0, 0.0), head_search.Recipe(10.0, 0.0)], {},
                              [{"train_loss": nan, "train_accuracy": 0.5, "val_loss": nan,
                                "val_accuracy": 0.5}] * 2, 0.1)  # fmt: skip
    with pytest.raises(metrics.NonFiniteLossError) as error:
        _ = run.best
    assert str(error.value) == ("every head of the recipe search diverged (2 grid points); "
                                "pass --head-learning-rate and --weight-decay")  # fmt: skip


def test_the_winner_is_the_head_trained_alone_with_its_recipe(case):
    """The head phase's own steps (``train.make_steps`` on cached features, the epochs of
    ``train.feature_batches``) with the winner's recipe give the search's winning head."""
    run = _search(case)
    labels = jax.tree.map(lambda _: optim.TRAINABLE, case["head_params"])
    tx = optim.make_optimizer(case["schedule"](WINNER.learning_rate), labels,
                              weight_decay=WINNER.weight_decay)  # fmt: skip
    mesh = case["mesh"]
    steps = train.make_steps(case["apply_fn"], train.frozen_tree(labels), mesh,
                             update_batch_stats=False, input_key="features")  # fmt: skip
    state = sharding.replicate(
        train.TrainState.create({"params": case["head_params"]}, tx, case["rng"]), mesh)
    for epoch in range(1, EPOCHS + 1):
        batches = train.feature_batches(case["train_cache"], BATCH, seed=0, epoch=epoch)
        state, _ = train.run_epoch_in_memory(steps, state, batches, mesh)
    alone = jax.device_get(state.params)
    # The same steps, except that vmap batches the head's matrix products, which may round
    # differently [measured: 1.3e-7 of the kernel's largest entry, not bit-equal]. Adam moves
    # a parameter by at most ~lr per step: the bound is rounding-sized against lr x steps.
    steps_taken = EPOCHS * (len(case["train_cache"]["label"]) // BATCH)
    assert_close(run.head(run.best), alone, 1e3 * F32_EPS,
                 scale=WINNER.learning_rate * steps_taken, what="winner vs alone")  # fmt: skip
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), alone, case["head_params"])
    assert min(jax.tree.leaves(moved)) > 0.01  # it trained


def test_same_seed_same_pick_and_the_same_numbers(case):
    first, second = _search(case), _search(case)
    assert first.best == second.best
    table = lambda run: np.array([list(r.values()) for r in run.results])
    np.testing.assert_array_equal(table(first), table(second))  # NaN rows equal too
    for a, b in zip(jax.tree.leaves(first.heads), jax.tree.leaves(second.heads), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_given_value_fixes_its_axis_and_all_given_skip_the_search():
    searched = TrainConfig(head_learning_rate=None, weight_decay=None)
    assert searched.searches_head_recipe
    assert len(head_search.grid(searched)) == (
        len(head_search.LEARNING_RATES) * len(head_search.WEIGHT_DECAYS))
    rate_given = searched.replace(head_learning_rate=0.05)
    assert {r.learning_rate for r in head_search.grid(rate_given)} == {0.05}
    assert {r.weight_decay for r in head_search.grid(rate_given)} == set(head_search.WEIGHT_DECAYS)
    given = TrainConfig(head_learning_rate=0.05, weight_decay=0.2)
    assert not given.searches_head_recipe
    # Where the head cannot train on cached features, unset values are the fixed defaults.
    uncached = searched.replace(feature_cache="off").resolved()
    assert not uncached.searches_head_recipe
    assert (uncached.head_learning_rate, uncached.weight_decay) == (1e-2, 0.1)
    # A searched decay is the head phase's; fine-tuning keeps its own unless one is given.
    assert searched.resolved().finetune_weight_decay == 0.1
    assert searched.replace(weight_decay=0.3).resolved().finetune_weight_decay == 0.3
    assert searched.replace(finetune_weight_decay=0.0).resolved().finetune_weight_decay == 0.0


def test_a_config_written_before_the_search_reads_as_what_ran():
    """Old config.json files have an explicit head rate and decay: nothing to search, and the
    decay was both phases'."""
    old = TrainConfig(head_learning_rate=1e-2, weight_decay=0.1).to_json()
    values = json.loads(old)
    for new_field in ("tta", "class_weight", "finetune_weight_decay"):
        del values[new_field]
    values["weight_decay"] = 0.3  # then the decay of both phases
    config = TrainConfig.from_json(json.dumps(values))
    assert not config.searches_head_recipe
    assert (config.head_learning_rate, config.weight_decay, config.finetune_weight_decay,
            config.tta) == (1e-2, 0.3, 0.3, "none")  # fmt: skip


def test_a_run_searches_records_the_pick_and_a_resume_keeps_it(tiny_cats_vs_dogs, tmp_path,
                                                                caplog):  # fmt: skip
    """A run with the recipe unset searches it once: the table in the log and in
    head_search.json, the pick in config.json and the checkpoints, the head phase trained with
    it; resumed mid head phase, it takes the pick from its record (no second search) and ends
    bit-identical to the uninterrupted run. With ``tta='flip'`` (the search then validates on
    both views): the checkpoints record it, and the error analysis and the test results of the
    best checkpoint (its test split is a copy of validation) score as its validation did."""
    import shutil

    from flaxcnn import checkpoints
    from flaxcnn.run import fit

    folder = tmp_path / "data"
    shutil.copytree(tiny_cats_vs_dogs, folder)
    shutil.copytree(folder / "validation", folder / "test")
    config = TrainConfig(
        data=str(folder), download=False, model_options={"alpha": 0.35},
        weights=None, image_size=32, batch_size=8, head_epochs=2, finetune_epochs=1,
        fine_tune_at="block_16", conv_impl="lax", keep_checkpoints=5,
        checkpoint_every_seconds=0, head_learning_rate=None, weight_decay=None,
        tta="flip")  # fmt: skip
    with caplog.at_level("INFO", logger="flaxcnn"):
        full = fit(config, tmp_path / "full")
    assert caplog.text.count("head recipe search (") == 1
    results = json.loads((tmp_path / "full" / head_search.RESULTS_FILE).read_text())
    assert len(results["grid"]) == len(head_search.LEARNING_RATES) * len(head_search.WEIGHT_DECAYS)
    picked = results["picked"]
    best = min(results["grid"], key=lambda row: row["val_loss"])
    assert (best["learning_rate"], best["weight_decay"]) == (
        picked["learning_rate"], picked["weight_decay"])  # fmt: skip
    for line in head_search.table_lines(results):
        assert line in caplog.text
    recorded = TrainConfig.from_json((tmp_path / "full" / "config.json").read_text())
    assert (recorded.head_learning_rate, recorded.weight_decay) == (
        picked["learning_rate"], picked["weight_decay"])  # fmt: skip
    assert recorded.finetune_weight_decay == 0.1  # fine-tuning keeps its own
    metadata = checkpoints.read_metadata(tmp_path / "full" / checkpoints.LATEST_DIR)
    assert metadata["config"]["head_learning_rate"] == picked["learning_rate"]
    assert checkpoints.read_metadata(tmp_path / "full")["tta"] == "flip"  # best/: predict's
    best_epoch = checkpoints.read_metadata(tmp_path / "full")["epoch"]
    val_loss = full.summary["epochs"][best_epoch - 1]["val_loss"]
    rows = (tmp_path / "full" / "analysis" / "validation" / "predictions.csv").read_text()
    losses = [float(row.split(",")[-1]) for row in rows.splitlines()[1:]]
    # predictions.csv rounds each loss to 1e-6; the same images and weights with both views
    # [measured: 8.6e-8 apart; without the mirror in the analysis: 5.4e-6].
    assert abs(np.mean(losses) - val_loss) <= 1e-6
    assert abs(full.summary["test_best"]["loss"] - val_loss) <= 1e-6
    assert full.summary["analysis"]["validation"]["accuracy"] == full.summary["best_val_accuracy"]
    head_epoch = full.summary["epochs"][0]
    cosine = 0.5 * (1 + np.cos(np.pi * 3 / 8))  # the rate at the epoch's last step (4 of 8)
    assert head_epoch["learning_rate"] == pytest.approx(picked["learning_rate"] * cosine, 1e-6)

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    latest = resumed_dir / checkpoints.LATEST_DIR
    for step in checkpoints.complete_steps(latest)[1:]:  # as if it died during epoch 2
        shutil.rmtree(latest / str(step))
    caplog.clear()
    with caplog.at_level("INFO", logger="flaxcnn"):
        resumed = fit(config, resumed_dir, resume=True)
    assert "head recipe search (" not in caplog.text
    again = TrainConfig.from_json((resumed_dir / "config.json").read_text())
    assert (again.head_learning_rate, again.weight_decay) == (
        recorded.head_learning_rate, recorded.weight_decay)  # fmt: skip
    comparable = lambda h: [{k: v for k, v in r.items() if "second" not in k} for r in h]
    assert comparable(resumed.summary["epochs"]) == comparable(full.summary["epochs"])
    for a, b in zip(jax.tree.leaves(full.state.variables),
                    jax.tree.leaves(resumed.state.variables), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
