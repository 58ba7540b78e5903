"""Tests of flaxcnn.data on small image folders written here, mocked TFDS, and the shared photos."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tolerances import F32_EPS, assert_close, assert_within

from flaxcnn import data

# Solid colours, one per readable training file, so a decoded image shows which file it came from.
# name -> (label, RGB); labels follow the sorted class folders apple=0, mango=1, zebra=2.
TRAIN_FILES = {
    "apple/red.jpg": (0, (200, 30, 40)),
    "apple/gray.png": (0, (90, 90, 90)),
    "apple/bitmap.bmp": (0, (10, 120, 250)),
    "apple/palette.bmp": (0, (204, 0, 51)),
    "apple/anim.gif": (0, (60, 180, 75)),
    "mango/black.png": (1, (0, 0, 0)),
    "mango/white.png": (1, (255, 255, 255)),
    "mango/rgba.png": (1, (120, 40, 160)),
    "mango/palette.png": (1, (240, 130, 20)),
    "zebra/cmyk.jpg": (2, (20, 200, 90)),
    "zebra/tiny.png": (2, (170, 170, 30)),
    "zebra/huge.jpg": (2, (30, 60, 130)),
}
BROKEN_FILES = {"apple/truncated.jpg", "zebra/empty.jpg", "zebra/notes.jpg"}


def _save(path: pathlib.Path, rgb, mode: str = "RGB", size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, rgb)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    if mode == "RGBA":
        image.putalpha(100)  # a translucent image still decodes to its RGB values
    image.save(path)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> pathlib.Path:
    """train/{apple,mango,zebra}: every format and colour mode, 3 broken files; validation: 7."""
    root = tmp_path_factory.mktemp("odd")
    modes = {"gray": "L", "palette": "P", "anim": "P", "rgba": "RGBA", "cmyk": "CMYK"}
    for name, (_, rgb) in TRAIN_FILES.items():
        mode = modes.get(pathlib.Path(name).stem, "RGB")
        size = {"tiny": (1, 1), "huge": (3000, 2000)}.get(pathlib.Path(name).stem, (40, 30))
        _save(root / "train" / name, rgb, mode, size)
    good = (root / "train/apple/red.jpg").read_bytes()
    (root / "train/apple/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train/zebra/empty.jpg").write_bytes(b"")
    (root / "train/zebra/notes.jpg").write_text("not an image")
    (root / "train/zebra/readme.txt").write_text("ignored: not an image extension")
    for i, class_name in enumerate(["apple"] * 3 + ["mango"] * 2 + ["zebra"] * 2):
        _save(root / "validation" / class_name / f"{i}.png", (i * 30, 0, 0))
    return root


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> pathlib.Path:
    """train/a: 15 and train/b: 10 random-noise PNGs (each unique), no validation split."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for class_name, count in [("a", 15), ("b", 10)]:
        (root / "train" / class_name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / class_name / f"{i}.png")
    return root


def _eval_all(dataset, split, **kwargs) -> dict[str, np.ndarray]:
    options = dict(batch_size=4, image_size=32, preprocessing="unit") | kwargs
    batches = list(data.eval_batches(dataset, split, **options))
    out = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    return {key: value[out["mask"]] for key, value in out.items()}


def _train(dataset, **kwargs) -> list[dict[str, np.ndarray]]:
    options = dict(batch_size=4, image_size=32, preprocessing="tf", augment=True, seed=7, epoch=0)
    return list(data.train_batches(dataset, **(options | kwargs)))


def _assert_same(batches_a, batches_b) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_import_does_no_io_and_no_tensorflow():
    code = "import sys, flaxcnn.data; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_format_decodes_and_broken_files_are_skipped(odd_folder):
    dataset = data.open_dataset(str(odd_folder))
    assert dataset.name == str(odd_folder.resolve())
    assert dataset.class_names == ("apple", "mango", "zebra")
    assert dataset.split_sizes == {"train": len(TRAIN_FILES), "validation": 7}
    assert set(dataset.skipped) == {f"train/{name}" for name in BROKEN_FILES}
    assert any(
        note.startswith("skipped 3 unreadable images, e.g. train/") for note in dataset.notes
    )

    out = _eval_all(dataset, "train", image_size=(40, 48))
    assert out["image"].shape == (len(TRAIN_FILES), 40, 48, 3)
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
    # Each decoded image is the uniform colour of exactly one file of its class. In pixel
    # levels (0-255): lossless formats decode exactly; JPEG quantises the colour's DC
    # coefficients and rounds its YCbCr conversion [measured: no spread; red.jpg 1 level,
    # huge.jpg (quality 50) 2 levels off]. libjpeg-turbo decodes to the same bits with or
    # without SIMD, so no margin for other kernels is needed. A class's colours are 100+
    # levels apart, and a channel mix-up (BGR, palette indices) is off by 50+.
    colours = out["image"].reshape(len(TRAIN_FILES), -1, 3) * 255.0
    assert_within(float(np.ptp(colours, axis=1).max()), 1.0, 6.0, "spread within an image")
    decoded = sorted(zip(out["label"].tolist(), colours.mean(axis=1).tolist(), strict=True))
    for (label, rgb), (want_label, want_rgb) in zip(
        decoded, sorted(TRAIN_FILES.values()), strict=True
    ):
        assert label == want_label
        assert_close(rgb, want_rgb, 4.0, scale=1.0, what=f"colour {want_rgb}")


def test_tf_scaling_spans_minus_one_to_one(odd_folder):
    dataset = data.open_dataset(str(odd_folder))
    images = _eval_all(dataset, "train", preprocessing="tf")["image"]
    assert images.min() == -1.0 and images.max() == 1.0  # the black and the white PNG
    assert images.min() >= -1.0 and images.max() <= 1.0
    pixels = np.array([0, 51, 255], np.uint8)
    # Against float64: at most two correctly rounded float32 operations, <= 7.5e-8 relative.
    np.testing.assert_allclose(data.scale_images(pixels, "tf"), [-1.0, 51 / 127.5 - 1, 1.0],
                               rtol=F32_EPS)  # fmt: skip
    np.testing.assert_allclose(data.scale_images(pixels, "unit"), [0.0, 0.2, 1.0], rtol=F32_EPS)
    with pytest.raises(data.DataError, match="preprocessing"):
        data.scale_images(pixels, "bgr")


@pytest.mark.parametrize("mode", list(data.PREPROCESSING_MODES))
def test_every_preprocessing_mode_runs_in_the_pipeline_as_scale_images_does(odd_folder, mode):
    """The TF pipeline and ``scale_images`` (numpy) share one definition per mode ('caffe'
    reverses the channel axis: it must work on a whole batch, not on a scalar)."""
    dataset = data.open_dataset(str(odd_folder))
    raw = _eval_all(dataset, "train", preprocessing="unit")["image"] * np.float32(255.0)
    images = _eval_all(dataset, "train", preprocessing=mode)["image"]
    # The same float32 operations on the same pixels; 'unit' then x255 round-trips within
    # one rounding of 255, and each mode adds at most three roundings (~1e-5 of 255).
    np.testing.assert_allclose(images, data.scale_images(np.round(raw), mode), rtol=0,
                               atol=1e-5 * 255)  # fmt: skip
    if mode == "caffe":  # BGR order: the blue channel first, minus its ImageNet mean
        np.testing.assert_allclose(images[..., 0], np.round(raw[..., 2]) - 103.939, atol=1e-3)


def test_eval_counts_every_example_once(odd_folder):
    dataset = data.open_dataset(str(odd_folder))
    assert data.num_batches(dataset, "validation", 4, drop_remainder=False) == 2
    assert data.num_batches(dataset, "validation", 4, drop_remainder=True) == 1
    batches = list(
        data.eval_batches(dataset, "validation", batch_size=4, image_size=32, preprocessing="unit")
    )
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True] * 3 + [False]]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 2, 2])
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    assert batches[1]["image"][3].max() == 0.0  # padding is black
    # Two processes each take half of every global batch; together they still see each one once.
    shards = [
        list(
            data.eval_batches(
                dataset,
                "validation",
                batch_size=4,
                image_size=32,
                preprocessing="unit",
                process_index=index,
                process_count=2,
            )
        )
        for index in range(2)
    ]
    assert [len(s) for s in shards] == [2, 2]
    assert sum(int(b["mask"].sum()) for s in shards for b in s) == 7


def test_train_batches_are_a_pure_function_of_seed_and_epoch(noise_folder):
    dataset = data.open_dataset(str(noise_folder))
    epoch0 = _train(dataset)
    assert len(epoch0) == data.num_batches(dataset, "train", 4, drop_remainder=True) == 5
    assert epoch0[0]["image"].shape == (4, 32, 32, 3) and set(epoch0[0]) == {"image", "label"}
    _assert_same(epoch0, _train(dataset))
    _assert_same(epoch0, _train(data.open_dataset(str(noise_folder))))  # a fresh process
    _assert_same(epoch0[2:], _train(dataset, start_batch=2))
    assert _train(dataset, start_batch=5) == []
    epoch1 = _train(dataset, epoch=1)
    order = lambda batches: np.concatenate([b["image"][:, 16, 16, 0] for b in batches])
    assert not np.array_equal(order(epoch0), order(epoch1))


def test_augmentation_changes_images_and_off_matches_eval(noise_folder):
    dataset = data.open_dataset(str(noise_folder))
    plain = _train(dataset, augment=False)
    augmented = _train(dataset, augment=True)
    evaluated = {
        image.tobytes() for image in _eval_all(dataset, "train", preprocessing="tf")["image"]
    }
    for b_plain, b_augmented in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(b_plain["label"], b_augmented["label"])  # same order
        assert all(image.tobytes() in evaluated for image in b_plain["image"])
        change = np.abs(b_plain["image"] - b_augmented["image"]).mean(axis=(1, 2, 3))
        assert (change > 0.01).all() and change.mean() > 0.2  # noise: any rotation shows


def test_rotation_matches_keras_random_rotation():
    tf_keras = pytest.importorskip("tf_keras")
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(1).uniform(0, 255, (1, 37, 53, 3)).astype(np.float32)
    for angle in [0.3, -1.2, 0.2 * 2 * math.pi]:
        fraction = angle / (2 * math.pi)
        layer = tf_keras.layers.RandomRotation((fraction, fraction))  # fill_mode='reflect'
        want = layer(images, training=True).numpy()
        got = data._rotate(tf.constant(images), tf.constant([angle])).numpy()
        # Noise: neighbouring values up to 255 levels apart. Both sample the same bilinear
        # transform, but compute its offsets (~(h + w) / 2 px) by other float32 formulas, so
        # the sample points differ by a few ulps of (h + w) px, each moving a value by up
        # to 255 levels/px x that [measured 8.7e-4 levels: 0.08 of this 4-ulp bound]. Another
        # centre, angle sign, fill mode or interpolation is ~10-100 levels off.
        coordinate_error = 4 * F32_EPS * (37 + 53)  # px
        assert_close(got, want, coordinate_error, scale=255.0, what=f"angle {angle}")


def test_missing_validation_split_is_carved_deterministically(noise_folder):
    dataset = data.open_dataset(str(noise_folder), validation_fraction=0.2, split_seed=3)
    assert dataset.split_sizes == {"train": 20, "validation": 5}
    assert any("no validation split: held out 5 of 25" in note for note in dataset.notes)
    validation = _eval_all(dataset, "validation")
    np.testing.assert_array_equal(np.bincount(validation["label"]), [3, 2])  # stratified
    train_images = {image.tobytes() for image in _eval_all(dataset, "train")["image"]}
    held_out = [image.tobytes() for image in validation["image"]]
    assert not train_images & set(held_out) and len(train_images) == 20
    again = data.open_dataset(str(noise_folder), validation_fraction=0.2, split_seed=3)
    assert [image.tobytes() for image in _eval_all(again, "validation")["image"]] == held_out
    other = data.open_dataset(str(noise_folder), validation_fraction=0.2, split_seed=4)
    assert [image.tobytes() for image in _eval_all(other, "validation")["image"]] != held_out


def test_process_shards_partition_each_global_batch(noise_folder):
    dataset = data.open_dataset(str(noise_folder))
    single = _train(dataset, seed=1, epoch=2)
    shards = [_train(dataset, seed=1, epoch=2, process_index=i, process_count=2) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single)
    for whole, first, second in zip(single, *shards, strict=True):
        assert first["image"].shape[0] == second["image"].shape[0] == 2
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    with pytest.raises(data.DataError, match="divisible"):
        _train(dataset, process_count=3)


def test_uncached_pipeline_gives_the_same_batches(noise_folder):
    cached = data.open_dataset(str(noise_folder))
    uncached = data.open_dataset(str(noise_folder), cache_limit_bytes=0)
    _assert_same(_train(cached, epoch=3, start_batch=1), _train(uncached, epoch=3, start_batch=1))


def _folder_without_train(root):
    _save(root / "cat" / "0.png", (1, 2, 3))


def _train_without_classes(root):
    _save(root / "train" / "0.png", (1, 2, 3))


def _empty_class(root):
    _save(root / "train" / "cat" / "0.png", (1, 2, 3))
    (root / "train" / "dog").mkdir()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_folder_without_train, r"no 'train' split.*move the class folders \['cat'\] into train"),
        (_train_without_classes, "no class subfolders"),
        (_empty_class, "dog has no images"),
    ],
)
def test_bad_folders_raise_one_line_data_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(data.DataError, match=message) as error:
        data.open_dataset(str(tmp_path))
    assert "\n" not in str(error.value) and isinstance(error.value, ValueError)


def test_bad_settings_and_sources_raise_one_line_data_error(tmp_path, noise_folder):
    dataset = data.open_dataset(str(noise_folder))
    attempts = {
        "too small": lambda: _train(dataset, image_size=16),
        "exceeds the 20 training": lambda: _train(dataset, batch_size=32),
        "no split 'test'": lambda: _eval_all(dataset, "test"),
        "not a folder": lambda: data.open_dataset(str(noise_folder / "train/a/0.png")),
        "cats_vs_dogs": lambda: data.open_dataset("cats_vs_dgos", download=False),
        "not prepared": lambda: data.open_dataset("mnist", data_dir=str(tmp_path), download=False),
    }
    for message, attempt in attempts.items():
        with pytest.raises(data.DataError, match=message) as error:
            attempt()
        assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # download=False wrote nothing


def test_tfds_source_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        dataset = data.open_dataset("cats_vs_dogs", data_dir=str(tmp_path))
        assert dataset.class_names == ("cat", "dog")
        assert set(dataset.split_sizes) == {"train", "validation"}  # carved: TFDS has only train
        assert sum(dataset.split_sizes.values()) == 20 and dataset.split_sizes["validation"] >= 2
        assert any("no validation split" in note for note in dataset.notes)
        batches = _train(dataset, image_size=(32, 40))
        # Too big to cache: the encoded TFDS records are held instead; same batches.
        uncached = data.open_dataset("cats_vs_dogs", data_dir=str(tmp_path), cache_limit_bytes=0)
        _assert_same(batches, _train(uncached, image_size=(32, 40)))
    assert len(batches) == dataset.split_sizes["train"] // 4
    assert batches[0]["image"].shape == (4, 32, 40, 3) and batches[0]["label"].shape == (4,)
    assert set(np.concatenate([b["label"] for b in batches]).tolist()) <= {0, 1}


TFDS_NAME = "flaxcnn_test_photos"  # the builder below registers itself under this name
# The CLI on a tiny MobileNetV2 (as tests/test_reliability.py's runs): one head epoch.
TINY_RUN = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--batch-size", "8",
            "--conv-impl", "lax", "--head-epochs", "1", "--finetune-epochs", "0",
            "--no-compilation-cache", "--no-malloc-tuning"]  # fmt: skip


@pytest.fixture(scope="module")
def tfds_photos(tiny_cats_vs_dogs, tmp_path_factory):
    """A real TFDS dataset, ``TFDS_NAME``: a ``GeneratorBasedBuilder`` whose splits read the
    tiny photo folder's files (plus a truncated JPEG in train), registered by defining it.
    Returns its data_dir (nothing prepared yet) and each split's (file, label) list."""
    tfds = pytest.importorskip("tensorflow_datasets")
    files = {
        split: [(f, label) for label, name in enumerate(("cat", "dog"))
                for f in sorted((tiny_cats_vs_dogs / split / name).glob("*.jpg"))]
        for split in ("train", "validation")
    }  # fmt: skip
    broken = tmp_path_factory.mktemp("tfds_source") / "cat.truncated.jpg"
    broken.write_bytes(files["train"][0][0].read_bytes()[:2000])

    class FlaxcnnTestPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),  # the files' bytes, as is
                "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            })  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, features=features,
                                         supervised_keys=("image", "label"))  # fmt: skip

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in files}

        def _generate_examples(self, split):
            for path, label in files[split] + [(broken, 0)] * (split == "train"):
                yield path.name, {"image": path, "label": label}

    assert tfds.builder_cls(TFDS_NAME) is FlaxcnnTestPhotos
    return tmp_path_factory.mktemp("tfds_data"), files


def test_tfds_builder_is_opened_prepared_and_read_like_any_tfds_name(tfds_photos):
    """The tfds.builder / download_and_prepare / as_dataset path that 'cats_vs_dogs' takes,
    on a builder that reads local files: no network, no mock."""
    data_dir, files = tfds_photos
    with pytest.raises(data.DataError, match="not prepared"):
        data.open_dataset(TFDS_NAME, data_dir=str(data_dir), download=False)
    dataset = data.open_dataset(TFDS_NAME, data_dir=str(data_dir))  # prepares it
    assert (data_dir / TFDS_NAME / "1.0.0" / "dataset_info.json").is_file()
    assert dataset.name == TFDS_NAME and dataset.class_names == ("cat", "dog")
    assert dataset.split_sizes == {"train": 32, "validation": 16}  # TFDS's own two splits
    assert len(dataset.skipped) == 1 and dataset.skipped[0].startswith("train[")
    assert dataset.notes == (f"skipped 1 unreadable image, e.g. {dataset.skipped[0]}",)
    # Every example is one of its split's files, once, with its label. (TFDS stores them
    # shuffled; load_images decodes a file as the pipeline does, so the pixels are equal.)
    for split, examples in files.items():
        out = _eval_all(dataset, split)
        pairs = zip(out["image"], out["label"], strict=True)
        got = sorted((image.tobytes(), int(label)) for image, label in pairs)
        want = sorted((data.load_images([f], 32, "unit")[0].tobytes(), label)
                      for f, label in examples)  # fmt: skip
        assert got == want, split
    again = data.open_dataset(TFDS_NAME, data_dir=str(data_dir), download=False)  # prepared
    assert again.split_sizes == dataset.split_sizes and again.skipped == dataset.skipped


def test_tfds_builder_trains_through_the_cli(tfds_photos, tmp_path, capsys):
    """``--data NAME --data-dir DIR --no-download`` in-process (where the builder is
    registered): a head epoch on the prepared TFDS splits; the checkpoint names the classes."""
    import logging

    from flaxcnn import checkpoints
    from flaxcnn.experiments import transfer

    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir, _ = tfds_photos
    tfds.builder(TFDS_NAME, data_dir=str(data_dir)).download_and_prepare()  # if not yet
    workdir = tmp_path / "run"
    logger = logging.getLogger("flaxcnn")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    try:
        rc = transfer.main(["--data", TFDS_NAME, "--data-dir", str(data_dir), "--no-download",
                            *TINY_RUN, "--workdir", str(workdir)])  # fmt: skip
    finally:  # the CLI points the 'flaxcnn' logger at the (captured) stderr
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "skipped 1 unreadable image, e.g. train[" in err
    assert "cached 32 + 16 feature vectors" in err  # both TFDS splits, the broken JPEG out
    report = json.loads((workdir / "metrics.json").read_text())
    assert [e["phase"] for e in report["epochs"]] == ["head"]
    assert math.isfinite(report["epochs"][0]["train_loss"])
    _, _, metadata = checkpoints.restore(workdir)
    assert metadata["class_names"] == ["cat", "dog"]


def test_shared_cats_vs_dogs_folder(cats_vs_dogs_dir):
    dataset = data.open_dataset(str(cats_vs_dogs_dir), cache_limit_bytes=0)
    assert dataset.class_names == ("cat", "dog")
    assert dataset.split_sizes == {"train": 1999, "validation": 1000}
    assert dataset.skipped == () and dataset.notes == ()
    batch = next(
        data.train_batches(
            dataset,
            batch_size=32,
            image_size=160,
            preprocessing="tf",
            augment=True,
            seed=0,
            epoch=0,
        )
    )
    assert batch["image"].shape == (32, 160, 160, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and 0 < batch["label"].sum() < 32
    assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0


def test_dataset_repr_is_readable(noise_folder):
    dataset = data.open_dataset(str(noise_folder))
    assert all(type(split) is str for split in dataset.split_sizes)
    assert "np.str_" not in repr(dataset)
    assert "split_sizes={'train': 20, 'validation': 5}" in repr(dataset)


def test_load_images_takes_one_path_or_a_list(noise_folder):
    path = noise_folder / "train" / "a" / "0.png"
    one = data.load_images(path, 32, "unit")
    assert one.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(data.load_images(str(path), 32, "unit"), one)
    np.testing.assert_array_equal(data.load_images([str(path), path], 32, "unit")[1], one[0])


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("train/zebra/empty.jpg", "the file is empty"),
        ("train/zebra/notes.jpg", "not a JPEG, PNG, BMP, GIF or WebP image"),
        ("train/apple/truncated.jpg", "a truncated or corrupt JPEG file"),
        ("train/apple/missing.jpg", "no such file"),
        ("train/apple", "a folder, not an image file"),
    ],
)
def test_unreadable_image_is_named_in_one_line_without_tensorflow_internals(
    odd_folder, name, reason
):
    path = odd_folder / name
    with pytest.raises(data.DataError) as error:
        data.load_images(path, 32, "tf")
    message = str(error.value)
    assert message == f"cannot read image {path}: {reason}"
    assert error.value.__suppress_context__  # no TensorFlow exception chained to it


def _one_class(root):
    for i in range(3):
        _save(root / "train" / "cat" / f"{i}.png", (i, 2, 3))


def _unreadable_class(root):
    _save(root / "train" / "cat" / "0.png", (1, 2, 3))
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "0.jpg").write_bytes(b"")
    (root / "train" / "dog" / "1.jpg").write_text("not an image")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_one_class, r"train has one class folder \(cat\); a classifier needs at least two"),
        (_unreadable_class, r"class folder .*train/dog has no readable images \(2 unreadable"),
    ],
)
def test_folder_with_fewer_than_two_usable_classes_is_refused(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(data.DataError, match=message) as error:
        data.open_dataset(str(tmp_path))
    assert "\n" not in str(error.value)


def test_single_class_folder_exits_2_from_the_cli(tmp_path, capsys):
    from flaxcnn.experiments import transfer

    _one_class(tmp_path / "data")
    workdir = tmp_path / "run"
    flaxcnn_log = logging.getLogger("flaxcnn")
    before = flaxcnn_log.handlers[:], flaxcnn_log.level, flaxcnn_log.propagate
    rc = transfer.main(["--data", str(tmp_path / "data"), "--weights", "none", "--alpha", "0.35",
                        "--image-size", "32", "--batch-size", "2", "--conv-impl", "lax",
                        "--no-compilation-cache", "--workdir", str(workdir)])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    # main's stderr logging is its own: the caller's configuration is as it was (a handler
    # left behind would write a later caller's INFO lines to this test's closed stderr).
    assert (flaxcnn_log.handlers[:], flaxcnn_log.level, flaxcnn_log.propagate) == before
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m flaxcnn.experiments.transfer: error: --data: ")
    assert "one class folder (cat)" in lines[0]
    assert not workdir.exists() or not any(workdir.iterdir())


def test_single_class_tfds_dataset_is_refused_before_downloading(tmp_path):
    """A real TFDS builder (defined here, prepared from local files), not ``mock_data``."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class OneClassImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(),
                        "label": tfds.features.ClassLabel(names=["only"])}  # fmt: skip
            return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                         features=tfds.features.FeaturesDict(features))  # fmt: skip

        def _split_generators(self, dl_manager):
            raise AssertionError("a one-class dataset must be refused before preparing it")

        def _generate_examples(self):
            raise AssertionError("a one-class dataset must be refused before preparing it")

    with pytest.raises(data.DataError, match="'one_class_images' has one class") as error:
        data.open_dataset(OneClassImages.name, data_dir=str(tmp_path))
    assert "\n" not in str(error.value) and not list(tmp_path.rglob("*.tfrecord*"))
