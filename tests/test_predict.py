"""``python -m flaxcnn.predict`` on real Orbax checkpoints: a run's classifier (a small SimpleCNN,
saved as training saves ``best/<step>``), checkpoints converted from Keras files with and without
the top (the shared ImageNet weights), and real image files, good and broken."""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from flaxcnn import checkpoints, data, imagenet_labels, predict
from flaxcnn.models import build_model, random_variables
from flaxcnn.weights.__main__ import convert

CLASSES = ["apple", "mango", "zebra"]
MODEL = {"arch": "simple_cnn", "num_classes": 3, "features": [4], "dense_features": []}
TABBY = 281  # ImageNet class n02123045


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    """A run folder whose best checkpoint is a 3-class SimpleCNN with random weights."""
    run = tmp_path_factory.mktemp("predict") / "run"
    model = build_model(MODEL)
    metadata = {"model": MODEL, "image_size": [32, 32], "preprocessing": "unit",
                "class_names": CLASSES}  # fmt: skip
    checkpoints.save_variables(run / checkpoints.BEST_DIR / "7",
                               random_variables(model, (1, 32, 32, 3)), metadata)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    """photos/: 5 images in three formats, one in a subfolder, beside a text file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.bmp", "nested/d.png", "nested/deeper/e.JPG"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
            root / name, format="JPEG" if name.lower().endswith(".jpg") else None)  # fmt: skip
    (root / "notes.txt").write_text("not an image: never classified")
    return root


def _run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    """``predict.main`` in this process: (exit status, stdout lines, stderr lines)."""
    try:
        rc = predict.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def _json(lines: list[str]) -> dict[str, dict]:
    import json

    return {row["image"]: row for row in map(json.loads, lines)}


def test_folders_globs_and_files_are_classified_at_any_batch_size(run_dir, photos, capsys):
    expected = sorted(str(p) for p in photos.rglob("*") if p.suffix.lower() != ".txt"
                      and p.is_file())  # fmt: skip
    inputs = [photos / "nested", f"{photos}/*.png", photos / "b.jpg", photos / "c.bmp"]
    rc, out, err = _run(capsys, "--checkpoint", run_dir, "--json", *inputs, "--batch-size", "2")
    assert rc == 0 and err == []
    rows = _json(out)
    assert sorted(rows) == expected and len(out) == len(expected)  # each image once
    # What the probabilities are: the softmax of the checkpoint's logits for the same pixels.
    model, variables, _ = checkpoints.restore(run_dir)
    logits = model.apply(variables, data.load_images(expected, 32, "unit"))
    want = np.asarray(jax.nn.softmax(logits))
    got = np.array([[rows[path]["probabilities"][name] for name in CLASSES] for path in expected])
    # Probabilities are at most 1 and each is a few float32 operations away from the other
    # computation (another batch shape): 1e-6 is ~8 ulps of 1.0.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for path, p in zip(expected, want, strict=True):
        assert rows[path]["label"] == CLASSES[int(np.argmax(p))]
        assert rows[path]["top_k"] == [[rows[path]["label"], rows[path]["probability"]]]
    rc, out_all_at_once, _ = _run(capsys, "--checkpoint", run_dir, "--json", photos)
    assert rc == 0 and sorted(_json(out_all_at_once)) == expected


def test_unreadable_inputs_are_named_in_one_line_each_and_the_rest_classified(
    run_dir, photos, tmp_path, capsys
):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("text, despite the name")
    (tmp_path / "no_images").mkdir()
    good = photos / "a.png"
    rc, out, err = _run(capsys, "--checkpoint", run_dir, tmp_path / "empty.jpg", good,
                        tmp_path / "notes.png", tmp_path / "missing.jpg", tmp_path / "no_images",
                        f"{tmp_path}/*.gif")  # fmt: skip
    assert rc == 2
    assert len(out) == 1 and out[0].startswith(f"{good}: ")  # the good one is still classified
    prefix, extensions = "python -m flaxcnn.predict: error: ", ".bmp/.gif/.jpeg/.jpg/.png/.webp"
    assert err == [
        f"{prefix}folder {tmp_path / 'no_images'} holds no images ({extensions})",
        f"{prefix}pattern '{tmp_path}/*.gif' matches no images ({extensions})",
        f"{prefix}cannot read image {tmp_path / 'empty.jpg'}: the file is empty",
        f"{prefix}cannot read image {tmp_path / 'notes.png'}: not a JPEG, PNG, BMP, GIF or WebP "
        "image",
        f"{prefix}cannot read image {tmp_path / 'missing.jpg'}: no such file",
        f"{prefix}5 input(s) could not be classified (named above); 1 image(s) were",
    ]
    # In code, a result per path in the order given, errors in their place.
    paths = [tmp_path / "empty.jpg", good, tmp_path / "missing.jpg", photos / "b.jpg"]
    results = predict.predict_files(*checkpoints.restore(run_dir), paths, batch_size=1)
    assert [r["image"] for r in results] == list(map(str, paths))
    assert ["error" in r for r in results] == [True, False, True, False]
    assert results[2]["error"] == f"cannot read image {paths[2]}: no such file"


@pytest.mark.parametrize("top_k", ["0", "-1", "two"])
def test_top_k_below_one_is_refused_in_one_line(run_dir, photos, capsys, top_k):
    rc, out, err = _run(capsys, "--checkpoint", run_dir, photos, "--top-k", top_k)
    assert rc == 2 and out == []
    assert err == [f"python -m flaxcnn.predict: error: argument --top-k: {top_k!r} is invalid; "
                   "allowed: a positive integer (see --help)"]  # fmt: skip


def test_top_k_above_the_class_count_ranks_every_class(run_dir, photos, capsys):
    rc, out, _ = _run(capsys, "--checkpoint", run_dir, photos / "a.png", "--top-k", "10")
    ranked = [item.rsplit(" ", 1) for item in out[0].split(": ", 1)[1].split(", ")]
    assert rc == 0 and sorted(name for name, _ in ranked) == CLASSES
    probabilities = [float(p) for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    model, variables, metadata = checkpoints.restore(run_dir)
    with pytest.raises(ValueError, match="top_k=0"):
        predict.predict_files(model, variables, metadata, [photos / "a.png"], top_k=0)


@pytest.fixture(scope="module")
def converted(shared_weights, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The shared no-top file converted, and a with-top copy whose classifier says 'tabby'."""
    root = tmp_path_factory.mktemp("converted")
    with_top = root / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    with_top.write_bytes(shared_weights.read_bytes())
    bias = np.zeros(1000, np.float32)
    bias[TABBY] = 20.0  # whatever the image, the softmax puts ~1 on 'tabby'
    with h5py.File(with_top, "a") as f:  # a 'predictions' layer, laid out as Keras saves it
        group = f.create_group("predictions")
        group["predictions/kernel:0"] = np.zeros((1280, 1000), np.float32)
        group["predictions/bias:0"] = bias
        group.attrs["weight_names"] = [b"predictions/kernel:0", b"predictions/bias:0"]
        f.attrs["layer_names"] = np.array([*f.attrs["layer_names"], b"predictions"], dtype="S")
    known = dict(model="mobilenet_v2", options={"alpha": 1.0})  # inferring them costs ~10 s each
    return {"no_top": convert(shared_weights, root / "no_top", **known)[0],
            "top": convert(with_top, root / "top", input_size=32, **known)[0]}  # fmt: skip


def test_feature_extractor_checkpoint_is_refused_in_one_line(converted, photos, capsys):
    rc, out, err = _run(capsys, "--checkpoint", converted["no_top"], photos / "a.png")
    assert rc == 2 and out == [] and len(err) == 1
    assert err[0] == (
        "python -m flaxcnn.predict: error: the checkpoint holds a feature extractor (MobileNetV2 "
        "without its classifier): its outputs are pooled features, not class scores; pass a "
        "trained run's folder, or convert a Keras file that includes the top (python -m "
        "flaxcnn.weights convert FILE.h5 OUT)")  # fmt: skip
    with pytest.raises(checkpoints.CheckpointError, match="feature extractor"):
        predict.class_names(checkpoints.read_metadata(converted["no_top"]))


def test_imagenet_classifier_checkpoint_names_the_imagenet_classes(converted, photos, capsys):
    assert checkpoints.read_metadata(converted["top"])["class_names"] is None
    image = photos / "a.png"
    rc, out, _ = _run(capsys, "--checkpoint", converted["top"], "--top-k", "2", image)
    assert rc == 0 and out[0].startswith(f"{image}: tabby 1.000, ")
    rc, out, _ = _run(capsys, "--checkpoint", converted["top"], "--json", image)
    row = _json(out)[str(image)]
    assert rc == 0 and row["label"] == "tabby" and row["probability"] > 0.99
    assert list(row["probabilities"]) == list(imagenet_labels.class_names())  # all 1000, in order


def test_imagenet_table_is_the_one_tensorflow_datasets_ships():
    spec = importlib.util.find_spec("tensorflow_datasets")  # locates it without importing TF
    if spec is None or spec.origin is None:
        pytest.skip("tensorflow_datasets is not installed")
    datasets = pathlib.Path(spec.origin).parent / "datasets"
    synsets = (datasets / "imagenet2012" / "labels.txt").read_text().split()
    module = ast.parse((datasets / "siscore" / "labels.py").read_text())
    (synonyms,) = [ast.literal_eval(node.value) for node in module.body
                   if isinstance(node, ast.Assign) and node.targets[0].id == "IMAGENET_LABELS_LIST"]
    assert imagenet_labels.TABLE.splitlines() == [f"{s} {w}" for s, w in zip(synsets, synonyms,
                                                                             strict=True)]
    assert imagenet_labels.synsets() == tuple(sorted(synsets))  # the standard order
    names = imagenet_labels.class_names()
    assert len(set(names)) == 1000 and names[0] == "tench" and names[TABBY] == "tabby"
    assert names[638:640] == ("maillot", "maillot, tank suit")  # the one shared first synonym
