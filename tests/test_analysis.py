"""Error analysis: the report's numbers equal a computation by hand from the predictions, the
figures are real PNGs of the promised size with no overlapping text, and the predictions are
the model's own outputs for the examples they name."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flaxcnn import analysis, analysis_figures, checkpoints, data, sharding
from flaxcnn.models import build_model, random_variables

# A 3-class case built by hand: confusion matrix [true, predicted] ...
CONFUSION = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
NAMES = ("ant", "bee", "cat")
# ... each correct example sure of itself except four, the four wrong ones unsure.
SURE, UNSURE = 0.95, 0.62


def _logits_with_top(predicted: int, confidence: float, k: int = 3) -> np.ndarray:
    """Logits whose softmax gives ``predicted`` probability ``confidence``, the rest equal."""
    p = np.full(k, (1 - confidence) / (k - 1))
    p[predicted] = confidence
    return np.log(p).astype(np.float32)


def _hand_made_predictions() -> analysis.Predictions:
    logits, labels, ids = [], [], []
    unsure_correct = 0
    for (true, pred), count in np.ndenumerate(CONFUSION):
        for _ in range(count):
            if true == pred and unsure_correct < 4:
                confidence, unsure_correct = UNSURE, unsure_correct + 1
            else:
                confidence = SURE if true == pred else UNSURE
            logits.append(_logits_with_top(pred, confidence))
            labels.append(true)
            ids.append(f"validation/{NAMES[true]}/{len(ids):02d}.jpg")
    return analysis.Predictions(np.stack(logits), np.array(labels, np.int32), tuple(ids), NAMES)


def test_the_report_equals_a_computation_by_hand():
    report = analysis.error_report(_hand_made_predictions(), "validation")
    assert report["confusion_matrix"] == CONFUSION.tolist() and report["count"] == 16
    assert report["accuracy"] == pytest.approx(12 / 16)
    # precision = hits / column sum, recall = hits / row sum, F1 their harmonic mean.
    precision, recall = [5 / 7, 3 / 4, 4 / 5], [5 / 6, 3 / 6, 4 / 4]
    for row, p, r, support in zip(report["per_class"], precision, recall, (6, 6, 4), strict=True):
        assert row["precision"] == pytest.approx(p) and row["recall"] == pytest.approx(r)
        assert row["f1"] == pytest.approx(2 * p * r / (p + r)) and row["support"] == support
    assert report["macro"]["f1"] == pytest.approx(
        np.mean([2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)])
    )
    assert report["most_confused"] == [
        {"true": "bee", "predicted": "ant", "count": 2, "share_of_true": pytest.approx(2 / 6)},
        {"true": "ant", "predicted": "bee", "count": 1, "share_of_true": pytest.approx(1 / 6)},
        {"true": "bee", "predicted": "cat", "count": 1, "share_of_true": pytest.approx(1 / 6)},
    ]  # fmt: skip
    # ECE, 15 equal-width bins: 8 correct examples at 0.95 (bin 14: gap 0.05); 4 correct and
    # 4 wrong at 0.62 (bin 9, (9/15, 10/15]: accuracy 0.5, gap 0.12).
    cal = report["calibration"]
    assert cal["bins"] == 15 and cal["ece"] == pytest.approx(8 / 16 * 0.05 + 8 / 16 * 0.12)
    counts = {b: row["count"] for b, row in enumerate(cal["table"]) if row["count"]}
    assert counts == {14: 8, 9: 8}
    assert cal["table"][9]["accuracy"] == 0.5
    assert cal["table"][9]["confidence"] == pytest.approx(UNSURE)
    # The wrong examples have p(true) = 0.19, the highest loss, listed in their order.
    worst = report["highest_loss"][:4]
    assert [w["example"] for w in worst] == [
        "validation/ant/05.jpg",
        "validation/bee/06.jpg",
        "validation/bee/07.jpg",
        "validation/bee/11.jpg",
    ]
    assert all(w["loss"] == pytest.approx(-math.log((1 - UNSURE) / 2)) for w in worst)
    assert [(w["true"], w["predicted"]) for w in worst] == [
        ("ant", "bee"), ("bee", "ant"), ("bee", "ant"), ("bee", "cat")]  # fmt: skip
    assert report["highest_loss"][4]["loss"] == pytest.approx(-math.log(UNSURE))


def test_edge_cases_of_the_metrics():
    """A class never predicted: precision 0 (and F1 0), as scikit-learn's zero_division=0;
    no errors: no confused pairs; an example at confidence 1 lands in the last bin."""
    confusion = np.array([[3, 0], [2, 0]])
    metrics = analysis.per_class_metrics(confusion)
    np.testing.assert_allclose(metrics["precision"], [3 / 5, 0.0])
    np.testing.assert_allclose(metrics["recall"], [1.0, 0.0])
    np.testing.assert_allclose(metrics["f1"], [2 * 0.6 / 1.6, 0.0])
    assert analysis.most_confused_pairs(np.eye(3, dtype=int) * 4, NAMES) == []
    cal = analysis.calibration(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1]))
    assert cal["table"][14]["count"] == 1 and cal["table"][7]["count"] == 1
    assert cal["ece"] == pytest.approx(0.5 * 0.0 + 0.5 * 0.5)  # the tie predicts class 0
    # A confidence on a bin edge belongs to the bin below: bins are (lower, upper].
    on_edges = analysis.calibration(np.array([[0.5, 0.5], [0.75, 0.25]]), np.array([0, 0]), 4)
    assert [row["count"] for row in on_edges["table"]] == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="logits"):
        analysis.Predictions(np.zeros((2, 3)), np.zeros(2, int), ("a", "b"), ("x", "y"))


def _text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts whose rendered boxes intersect."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip()]  # fmt: skip
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1 :]
            if box_a.overlaps(box_b)]  # fmt: skip


@pytest.mark.parametrize("num_classes", [2, 12, 40])
def test_figures_are_pngs_of_the_promised_size_without_overlapping_text(num_classes, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(num_classes)
    names = tuple(f"class {c} with a rather long descriptive name" if c % 3 == 0 else f"c{c}"
                  for c in range(num_classes))  # fmt: skip
    n = 120
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    logits[np.arange(n), labels] += 2.0
    ids = tuple(f"validation/{names[y]}/photo_{i:04d}_with_a_long_file_name.jpg"
                for i, y in enumerate(labels))  # fmt: skip
    predictions = analysis.Predictions(logits, labels, ids, names)
    report = analysis.error_report(predictions, "validation")
    # Solid-colour images: their exact colours must appear on the sheet.
    colours = rng.integers(0, 256, (analysis.SHEET_IMAGES, 3)).astype(np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (len(colours), 32, 32, 3))
    what = "validation, best checkpoint (epoch 12)"
    folder = analysis.write_analysis(tmp_path, report, predictions, images, what=what)

    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(report))
    rows = (folder / "predictions.csv").read_text().splitlines()
    assert len(rows) == n + 1 and rows[1].startswith(ids[0] + ",")
    pngs = {}
    for png, inches in (
        ("confusion_matrix.png", analysis_figures.confusion_figure_size(num_classes)),
        ("highest_loss.png", analysis_figures.contact_sheet_size(len(images))),
    ):
        with Image.open(folder / png) as image:
            assert image.format == "PNG"
            assert image.size == tuple(round(x * analysis_figures.DPI) for x in inches), png
            pngs[png] = np.asarray(image.convert("RGB")).astype(np.int32)
    # Every tile of the sheet is drawn: its colour covers at least half of a 1.5" square.
    rgb = pngs["highest_loss.png"]
    packed = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel()
    counts = dict(zip(*np.unique(packed, return_counts=True), strict=True))
    for r, g, b in colours.astype(np.int32):
        assert counts.get(r << 16 | g << 8 | b, 0) > 0.5 * (1.5 * analysis_figures.DPI) ** 2

    figures = analysis_figures.report_figures(report, images, what=what)  # those written, redrawn
    for fig in figures.values():
        fig.canvas.draw()
        assert _text_overlaps(fig) == []
    # Each cell of the matrix, sampled near its corner (clear of its count), is coloured by
    # the share of the true class it holds.
    confusion = np.array(report["confusion_matrix"])
    ax = figures["confusion_matrix.png"].axes[0]
    cmap = ax.images[0].get_cmap()
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    height = pngs["confusion_matrix.png"].shape[0]
    for (true, pred), value in np.ndenumerate(share):
        x, y = ax.transData.transform((pred - 0.38, true - 0.38))
        pixel = pngs["confusion_matrix.png"][height - 1 - int(y), int(x)]
        expected = np.round(np.array(cmap(value)[:3]) * 255)
        assert np.abs(pixel - expected).max() <= 3, (true, pred, pixel, expected)


def test_gathered_predictions_are_the_model_outputs_of_the_examples_they_name(
    tiny_cats_vs_dogs,
):
    """One pass through the real eval pipeline (a padded last batch: 16 images in batches of
    6) equals the model applied to each named file, loaded as ``predict`` loads it."""
    import jax

    dataset = data.open_dataset(str(tiny_cats_vs_dogs))
    model = build_model({"arch": "simple_cnn", "num_classes": 2, "features": [4],
                         "dense_features": [8]})  # fmt: skip
    variables = random_variables(model, (1, 32, 32, 3))
    mesh = sharding.make_mesh()
    predictions = analysis.gather_predictions(
        lambda v, x: model.apply(v, x, train=False),
        sharding.replicate(variables, mesh),
        dataset,
        "validation",
        mesh,
        batch_size=6,
        image_size=32,
        preprocessing="unit",
    )
    assert len(predictions.labels) == dataset.split_sizes["validation"] == 16
    paths = [tiny_cats_vs_dogs / example for example in predictions.example_ids]
    assert [p.parent.name for p in paths] == [dataset.class_names[y] for y in predictions.labels]
    expected = jax.jit(model.apply)(variables, data.load_images(paths, 32, "unit"))
    np.testing.assert_allclose(predictions.logits, expected, rtol=1e-5, atol=1e-5)
    # The contact sheet's images are the files as the pipeline decodes them.
    images = data.decoded_images(dataset, "validation", [3, 0], 32)
    as_loaded = data.load_images([paths[3], paths[0]], 32, "unit") * 255
    np.testing.assert_array_equal(images, np.round(as_loaded).astype(np.uint8))


def test_a_run_ends_with_the_error_analysis_of_its_best_checkpoint(
    tiny_cats_vs_dogs, tmp_path, capsys
):
    """A whole CLI run (in process; the SimpleCNN entry point, whose compilations are cheap,
    drives the same ``fit``) with a test split: the analysis of the best checkpoint on
    validation and test is written, listed in metrics.json and logged last."""
    import shutil

    from flaxcnn.experiments import simple_cnn

    folder = tmp_path / "photos"
    shutil.copytree(tiny_cats_vs_dogs, folder)
    shutil.copytree(tiny_cats_vs_dogs / "validation", folder / "test")
    workdir = tmp_path / "run"
    argv = ["--data", str(folder), "--workdir", str(workdir), "--no-download",
            "--batch-size", "8", "--head-epochs", "3", "--no-compilation-cache"]  # fmt: skip
    assert simple_cnn.main(argv) == 0
    log = capsys.readouterr().err
    best_epoch = checkpoints.restore(workdir)[2]["epoch"]
    summary = json.loads((workdir / "metrics.json").read_text())["analysis"]
    for split in ("validation", "test"):
        report = json.loads((workdir / "analysis" / split / "report.json").read_text())
        assert report["count"] == 16 and sum(map(sum, report["confusion_matrix"])) == 16
        assert summary[split]["ece"] == report["calibration"]["ece"]
        assert f"error analysis, {split}, best checkpoint (epoch {best_epoch}): 16 images" in log
        rows = (workdir / "analysis" / split / "predictions.csv").read_text().splitlines()[1:]
        assert sorted(r.split(",")[0] for r in rows) == sorted(
            f"{split}/{p.parent.name}/{p.name}" for p in (folder / split).glob("*/*.jpg")
        )
        for png in ("confusion_matrix.png", "highest_loss.png"):
            assert (workdir / "analysis" / split / png).stat().st_size > 10_000
    # The analysis sees what the run measured for the best checkpoint: its validation epoch
    # and its test result.
    metrics = json.loads((workdir / "metrics.json").read_text())
    [best] = [e for e in metrics["epochs"] if e["epoch"] == best_epoch]
    validation = json.loads((workdir / "analysis" / "validation" / "report.json").read_text())
    assert validation["accuracy"] == best["val_accuracy"]
    assert validation["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert summary["test"]["accuracy"] == pytest.approx(metrics["test_best"]["accuracy"])
    lines = log.strip().splitlines()
    assert "most confused" in log and "highest-loss images" in lines[-1]


def test_tfds_examples_are_named_by_split_and_position(tiny_cats_vs_dogs, tmp_path):
    """A real TFDS builder with a train split only: the carved validation names its examples
    'train[i]' (as ``skipped`` does), and ``decoded_images`` shows those examples, from the
    decoded cache and from the encoded records alike."""
    tfds = pytest.importorskip("tensorflow_datasets")
    files = [(f, label) for label, name in enumerate(("cat", "dog"))
             for f in sorted((tiny_cats_vs_dogs / "train" / name).glob("*.jpg"))[:5]]  # fmt: skip

    class FlaxcnnAnalysisPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            })  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, features=features,
                                         supervised_keys=("image", "label"))  # fmt: skip

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (path, label) in enumerate(files):
                yield i, {"image": path, "label": label}

    name = FlaxcnnAnalysisPhotos.name
    dataset = data.open_dataset(name, data_dir=str(tmp_path), validation_fraction=0.4)
    ids = data.example_ids(dataset, "validation")
    assert len(ids) == 4 and all(i.startswith("train[") and i.endswith("]") for i in ids)
    # 'train[i]' is the i-th record of the prepared split (TFDS stores them shuffled):
    # find its file by its bytes, which the builder stored as they are.
    records = tfds.builder(name, data_dir=str(tmp_path)).as_dataset(
        split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    stored = [example["image"] for example in tfds.as_numpy(records)]
    by_bytes = {path.read_bytes(): path for path, _ in files}
    paths = [by_bytes[stored[int(i[len("train[") : -1])]] for i in ids]
    expected = data.load_images(paths, 32, "unit") * 255
    for limit in (data.DEFAULT_CACHE_LIMIT_BYTES, 0):  # decoded split in memory, or records
        opened = data.open_dataset(name, data_dir=str(tmp_path), validation_fraction=0.4,
                                   cache_limit_bytes=limit)  # fmt: skip
        images = data.decoded_images(opened, "validation", range(4), 32)
        np.testing.assert_array_equal(images, np.round(expected).astype(np.uint8))
