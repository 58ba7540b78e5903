"""Image classification input pipeline: a TFDS name or an image folder in, numpy batches out.

Both sources yield *encoded* image bytes (TFDS through ``tfds.decode.SkipDecoding``), so one decode
path serves both: decode (JPEG/PNG/BMP/GIF/WebP, forced to RGB) -> bilinear resize -> uint8. The
decoded split is kept in memory when it fits ``cache_limit_bytes``; otherwise files are decoded each
epoch. Every epoch's order is a numpy permutation of ``(seed, epoch)`` and augmentation draws from
stateless TF ops keyed on ``(seed, epoch, example)``, so batches are a pure function of those
numbers: a resumed run (``start_batch``) and each process's shard reproduce them exactly.

TensorFlow and TFDS are imported on first use; importing this module does no I/O.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Input modes by name: what a model's weights expect of RGB pixels x in [0, 255] (the
# backbone contract names one; checkpoints record it). Keras's imagenet_utils names the first
# three; "tf128" is the x / 128 - 1 that some Keras models apply inside (their Rescaling).
PREPROCESSING_MODES = {
    "tf": "x / 127.5 - 1: [-1, 1]",
    "tf128": "x / 128 - 1: [-1, 1)",
    "caffe": "RGB -> BGR, minus the ImageNet means (103.939, 116.779, 123.68)",
    "torch": "x / 255, minus the ImageNet means (0.485, 0.456, 0.406), over their stds "
    "(0.229, 0.224, 0.225)",
    "unit": "x / 255: [0, 1]",
}
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
MIN_IMAGE_SIZE = 32
DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3
ROTATION_FACTOR = 0.2  # as keras.layers.RandomRotation(0.2): angles in +-0.2 * 2pi


class DataError(ValueError):
    """A data source or setting that cannot work; the one-line message says what to do."""


@dataclasses.dataclass(frozen=True)
class _Split:
    labels: np.ndarray  # int32 [n], in the split's fixed order
    keys: np.ndarray  # file paths (folder source) or positions in ``tfds_split`` (TFDS source)
    tfds_split: str | None = None
    tfds_size: int = 0


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """An opened image source: class names, usable split sizes, and what was skipped.

    Attributes:
      name: the TFDS name, or the image folder's absolute path.
      class_names: label i is ``class_names[i]`` (sorted folder names or TFDS label names).
      split_sizes: usable examples per split ('train', 'validation', maybe 'test').
      skipped: the unreadable examples that were dropped (paths relative to the folder).
      notes: lines for the caller to log once (carved validation split, skipped images).
      cache_limit_bytes: decoded splits up to this size (n*h*w*3) are kept in memory.
    """

    name: str
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES
    _splits: dict[str, _Split] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _builder: Any = dataclasses.field(default=None, repr=False, compare=False)
    _memo: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


@functools.cache
def _tf():
    """TensorFlow, imported once, quietly and with its GPUs hidden (``flaxcnn.tf_runtime``)."""
    from flaxcnn import tf_runtime

    return tf_runtime.tensorflow()


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_preprocessing(mode: str) -> None:
    """Raises a one-line ``DataError`` unless ``mode`` is one of ``PREPROCESSING_MODES``."""
    if mode not in PREPROCESSING_MODES:
        known = ", ".join(PREPROCESSING_MODES)
        raise DataError(f"unknown preprocessing {mode!r}: use one of {known}")


def preprocess(images, mode: str):
    """Maps float32 RGB pixel values in [0, 255] to a model's input, in float32 as Keras's own
    preprocessing computes it; ``images`` may be a numpy, TensorFlow or JAX array (the input
    pipeline, ``scale_images`` and exported models share this one definition)."""
    check_preprocessing(mode)
    if mode == "tf":
        return images / 127.5 - 1.0
    if mode == "tf128":
        return images / 128.0 - 1.0
    if mode == "caffe":
        return images[..., ::-1] - _CAFFE_MEAN_BGR
    if mode == "torch":
        return (images / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    return images / 255.0  # "unit"


def scale_images(images: np.ndarray, mode: str) -> np.ndarray:
    """Preprocesses uint8-range RGB pixels as the pipeline does (see ``PREPROCESSING_MODES``).

    Args:
      images: pixel values in [0, 255], any shape, integer or float.
      mode: one of ``PREPROCESSING_MODES``.

    Returns:
      float32 array of the same shape.
    """
    return preprocess(np.asarray(images, dtype=np.float32), mode).astype(np.float32)


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < MIN_IMAGE_SIZE:
        raise DataError(
            f"image size {image_size} is too small or malformed: give an int or (height, width) "
            f"of at least {MIN_IMAGE_SIZE} pixels, e.g. 160"
        )
    return int(hw[0]), int(hw[1])


def _decode(data):
    """Encoded bytes -> uint8 [h, w, 3]; raises (in the graph) on unreadable data."""
    tf = _tf()
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    # TF decodes 8-bit BMPs to their palette *indices*; look the colours up as other decoders do.
    header = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, 54), "\0" * 54]), 0, 54)
    header = tf.cast(tf.io.decode_raw(header, tf.uint8), tf.int32)
    is_palette_bmp = (header[0] == 66) & (header[1] == 77) & (header[28] == 8)

    def palette_lookup():
        le32 = lambda at: tf.reduce_sum(header[at : at + 4] * [1, 256, 65536, 16777216])
        count = tf.where(le32(46) > 0, le32(46), 256)
        palette = tf.io.decode_raw(tf.strings.substr(data, 14 + le32(14), 4 * count), tf.uint8)
        palette = tf.reverse(tf.reshape(palette, [-1, 4])[:, :3], axis=[1])  # BGRx -> RGB
        return tf.gather(palette, tf.cast(image[..., 0], tf.int32))

    return tf.cond(is_palette_bmp, palette_lookup, lambda: image)


def _decode_resize(data, hw: tuple[int, int]):
    tf = _tf()
    # Bilinear without antialiasing, as keras.utils.image_dataset_from_directory resizes.
    image = tf.image.resize(_decode(data), hw, method="bilinear")
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(image, (*hw, 3))


# File signatures of the formats TF decodes, to say what an undecodable file is.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
               (b"BM", "BMP"))  # fmt: skip


def _undecodable(encoded: bytes) -> str:
    """Why bytes that failed to decode are no image, in the user's terms (not TF's)."""
    if not encoded:
        return "the file is empty"
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        kind = "WebP"
    else:
        kind = next((kind for magic, kind in _SIGNATURES if encoded.startswith(magic)), None)
    if kind is None:
        return "not a JPEG, PNG, BMP, GIF or WebP image"
    return f"a truncated or corrupt {kind} file"


def _read_image(path: str | os.PathLike, hw: tuple[int, int]) -> np.ndarray:
    """One file -> uint8 ``[h, w, 3]``; a one-line ``DataError`` naming it otherwise."""
    try:
        encoded = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "a folder, not an image file"
    except OSError as e:
        reason = (e.strerror or type(e).__name__).lower()
    else:
        try:
            return _decode_resize(encoded, hw).numpy()
        except Exception:  # TF's message names its kernels, not the file: say what it is
            reason = _undecodable(encoded)
    raise DataError(f"cannot read image {path}: {reason}") from None


def load_images(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    image_size: int | Sequence[int],
    preprocessing: str,
) -> np.ndarray:
    """Decodes, resizes and scales image files exactly as the eval pipeline does.

    Args:
      paths: an image file, or a sequence of them (JPEG/PNG/BMP/GIF/WebP; any channel
        layout).
      image_size: int or ``(height, width)``.
      preprocessing: one of ``PREPROCESSING_MODES``.

    Returns:
      float32 ``[len(paths), h, w, 3]`` (``[1, h, w, 3]`` for a single file).

    Raises:
      DataError: a file is missing or cannot be decoded (named in the one-line message).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    hw = _image_hw(image_size)
    check_preprocessing(preprocessing)  # an unknown mode fails before any file is read
    images = [_read_image(path, hw) for path in paths]
    return scale_images(np.stack(images) if images else np.zeros((0, *hw, 3)), preprocessing)


def _readable(examples) -> tuple[np.ndarray, np.ndarray]:
    """Indices and labels of the ``(index, encoded bytes, label)`` elements that decode, sorted.

    TF graph ops cannot catch a decode error per element, so a one-time parallel pass drops the
    failing elements with ``ignore_errors`` and keeps the survivors' indices.
    """
    tf = _tf()

    def check(index, data, label):
        return index, label, tf.shape(_decode(data))[0]

    checked = examples.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    batches = list(checked.ignore_errors().batch(1024).as_numpy_iterator())
    indices = np.concatenate([np.zeros([0], np.int64)] + [i for i, _, _ in batches])
    labels = np.concatenate([np.zeros([0], np.int32)] + [y for _, y, _ in batches])
    order = np.argsort(indices)
    return indices[order], labels[order].astype(np.int32)


def _carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions into (train, validation), the same fraction from every class."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction {fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(round(fraction * len(members)), len(members) - 1)  # keep one for training
        held_out.append(rng.permutation(members)[:count])
    validation = np.sort(np.concatenate(held_out))
    return np.setdiff1d(np.arange(len(labels)), validation), validation


def _finish_open(name, class_names, splits, skipped, fraction, seed, **fields) -> ImageDataset:
    notes = []
    if "validation" not in splits:
        train = splits["train"]
        keep, held_out = _carve(train.labels, fraction, seed)
        pick = lambda at: dataclasses.replace(train, labels=train.labels[at], keys=train.keys[at])
        splits = {**splits, "train": pick(keep), "validation": pick(held_out)}
        notes.append(
            f"{name} has no validation split: held out {len(held_out)} of {len(train.labels)} "
            f"training examples ({fraction:.0%} of each class, split_seed={seed}) as 'validation'"
        )
    if skipped:
        plural = "s" * (len(skipped) > 1)
        notes.append(f"skipped {len(skipped)} unreadable image{plural}, e.g. {skipped[0]}")
    sizes = {split: len(s.labels) for split, s in splits.items()}
    return ImageDataset(
        name, tuple(class_names), sizes, tuple(skipped), tuple(notes), _splits=splits, **fields
    )


def _open_folder(root: pathlib.Path, fraction: float, seed: int, **fields) -> ImageDataset:
    tf = _tf()
    layout = f"expected {root}/train/<class>/*.jpg (optional validation/ and test/ alike)"
    if not (root / "train").is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())[:5]
        hint = f"move the class folders {found} into train/" if found else "it has no subfolders"
        raise DataError(f"image folder {root} has no 'train' split: {layout}; {hint}")
    # Hidden folders (.ipynb_checkpoints, ...) are never classes.
    class_names = sorted(
        p.name for p in (root / "train").iterdir() if p.is_dir() and p.name[0] != "."
    )
    if not class_names:
        raise DataError(f"{root}/train has no class subfolders: {layout}")
    if len(class_names) == 1:
        raise DataError(
            f"{root}/train has one class folder ({class_names[0]}); a classifier needs at least "
            f"two: add a folder per class, {layout}"
        )
    listing = []  # (split, path, label)
    for split in ("train", "validation", "test"):
        if not (root / split).is_dir():
            continue
        extra = {p.name for p in (root / split).iterdir() if p.is_dir()} - set(class_names)
        if extra:
            raise DataError(f"{root}/{split} has classes {sorted(extra)} missing from train/")
        for label, class_dir in enumerate(root / split / name for name in class_names):
            files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if class_dir.is_dir() and not files:
                raise DataError(
                    f"class folder {class_dir} has no images ({'/'.join(IMAGE_EXTENSIONS)}): "
                    "add some or remove the folder"
                )
            listing += [(split, str(path), label) for path in files]
    split_of, paths, labels = (np.array(column) for column in zip(*listing, strict=True))
    examples = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths, labels))
    ok = np.zeros(len(paths), bool)
    ok[_readable(examples.map(lambda i, path, y: (i, tf.io.read_file(path), y)))[0]] = True
    skipped = [str(pathlib.Path(path).relative_to(root)) for path in paths[~ok]]
    in_train = split_of == "train"
    for label in np.setdiff1d(np.arange(len(class_names)), labels[in_train & ok]):
        broken = paths[in_train & (labels == label)]
        raise DataError(
            f"class folder {root}/train/{class_names[label]} has no readable images "
            f"({len(broken)} unreadable, e.g. {pathlib.Path(broken[0]).name}): add readable "
            "images or remove the folder"
        )
    splits = {
        split: _Split(
            labels[(split_of == split) & ok].astype(np.int32), paths[(split_of == split) & ok]
        )
        for split in dict.fromkeys(split_of.tolist())  # str keys, not numpy's np.str_
    }
    return _finish_open(str(root), class_names, splits, skipped, fraction, seed, **fields)


def _tfds_examples(builder, split: str):
    """(encoded image, label) pairs of a TFDS split, in its stored order."""
    tfds = _tfds()
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    examples = builder.as_dataset(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False
    )
    return examples.map(lambda example: (example[image_key], example[label_key]))


@functools.cache
def _tfds():
    _tf()
    import tensorflow_datasets as tfds

    return tfds


def _open_tfds(name: str, data_dir, download: bool, fraction, seed, **fields) -> ImageDataset:
    tfds = _tfds()
    fix = f"pass --data-dir with a prepared copy (tfds build {name} --data_dir DIR) or a folder"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split(":")[0].split("/")[0], known, n=3)
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise DataError(
            f"unknown TFDS dataset {name!r}{hint} and no folder of that name: pass a TFDS name "
            "(https://www.tensorflow.org/datasets/catalog) or an image folder (DIR/train/<class>/)"
        ) from None
    except Exception as error:
        raise DataError(f"cannot open TFDS dataset {name!r}: {_one_line(error)}; {fix}") from None
    # Checked on the builder's declared features, before anything is downloaded.
    label_key = (builder.info.supervised_keys or ("image", "label"))[1]
    class_names = getattr(builder.info.features[label_key], "names", None)
    if not class_names:
        raise DataError(f"TFDS dataset {name!r} has no class-label feature {label_key!r}; {fix}")
    if len(class_names) == 1:
        raise DataError(
            f"TFDS dataset {name!r} has one class ({class_names[0]}); a classifier needs at "
            "least two: pass a dataset (or an image folder) with two or more classes"
        )
    if not builder.is_prepared():
        if not download:
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and download=False "
                f"(offline); {fix}"
            )
        try:
            builder.download_and_prepare()
        except Exception as error:  # network, 404, checksum, manual-download datasets, ...
            raise DataError(
                f"could not download TFDS dataset {name!r} ({type(error).__name__}: "
                f"{_one_line(error, 160)}); {fix}"
            ) from None
    # Under tfds.testing.mock_data the builder lists no splits, but any split name reads.
    split_names = list(builder.info.splits) or ["train"]
    if "train" not in split_names:
        raise DataError(f"TFDS dataset {name!r} has no 'train' split ({split_names}); {fix}")
    splits, skipped = {}, []
    for split in ("train", "validation", "test"):
        if split not in split_names:
            continue
        examples = _tfds_examples(builder, split)
        size = int(examples.cardinality())
        if size < 0:
            size = int(examples.reduce(0, lambda count, _: count + 1))
        kept, labels = _readable(examples.enumerate().map(lambda i, ex: (i, ex[0], ex[1])))
        skipped += [f"{split}[{i}]" for i in np.setdiff1d(np.arange(size), kept)]
        splits[split] = _Split(labels, kept, tfds_split=split, tfds_size=size)
    return _finish_open(
        name, class_names, splits, skipped, fraction, seed, _builder=builder, **fields
    )


def open_dataset(
    source: str,
    *,
    data_dir: str | None = None,
    download: bool = True,
    validation_fraction: float = 0.2,
    split_seed: int = 0,
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
) -> ImageDataset:
    """Opens a TFDS dataset or a class-per-folder image directory and checks every image once.

    A folder needs ``train/<class>/*`` (optional ``validation/`` and ``test/`` alike); class names
    are the sorted ``train/`` subfolders. Unreadable images are dropped and listed in ``skipped``.
    Without a validation split, one is carved from train (seeded, stratified) and a note says so.

    Args:
      source: an existing folder path, or a TFDS name such as 'cats_vs_dogs'.
      data_dir: TFDS data directory (None: TFDS's default).
      download: whether TFDS may download and prepare the dataset; False never uses the network.
      validation_fraction: the share of each class held out when there is no validation split.
      split_seed: seed of that hold-out.
      cache_limit_bytes: decoded splits (n*h*w*3 bytes) up to this size are kept in memory.

    Returns:
      The opened dataset.

    Raises:
      DataError: one line naming the problem and the fix.
    """
    fields = dict(cache_limit_bytes=cache_limit_bytes)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return _open_folder(path.resolve(), validation_fraction, split_seed, **fields)
    if path.exists() or source.startswith(("/", ".", "~")):
        raise DataError(f"{source} is not a folder: pass an image folder (DIR/train/<class>/*.jpg)")
    return _open_tfds(source, data_dir, download, validation_fraction, split_seed, **fields)


def _split(dataset: ImageDataset, split: str) -> _Split:
    if split not in dataset._splits:
        choices = list(dataset._splits)
        raise DataError(f"{dataset.name} has no split {split!r}: choose from {choices}")
    return dataset._splits[split]


def _encoded(dataset: ImageDataset, split: str):
    """The split's encoded images, in its fixed order."""
    tf, source = _tf(), _split(dataset, split)
    if source.tfds_split is None:
        paths = tf.data.Dataset.from_tensor_slices(source.keys)
        return paths.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)
    keep = np.zeros(source.tfds_size, bool)
    keep[source.keys] = True
    examples = _tfds_examples(dataset._builder, source.tfds_split).enumerate()
    return examples.filter(lambda i, _: tf.gather(keep, i)).map(lambda _, example: example[0])


def _image_loader(dataset: ImageDataset, split: str, hw: tuple[int, int]):
    """Returns ``load(position) -> uint8 [h, w, 3]`` for use inside a tf.data map."""
    tf, source = _tf(), _split(dataset, split)
    key = (split, hw)
    if len(source.labels) * hw[0] * hw[1] * 3 <= dataset.cache_limit_bytes:
        if key not in dataset._memo:  # decode the split once, in parallel, into one tensor
            decoded = _encoded(dataset, split).map(
                lambda data: _decode_resize(data, hw), num_parallel_calls=tf.data.AUTOTUNE
            )
            chunks = list(decoded.batch(256).prefetch(1))
            dataset._memo[key] = tf.concat(chunks or [tf.zeros([0, *hw, 3], tf.uint8)], 0)
        images = dataset._memo[key]
        return lambda position: tf.gather(images, position)
    if source.tfds_split is None:  # too big to cache: random access through the file paths
        paths = tf.constant(source.keys)
        return lambda position: _decode_resize(tf.io.read_file(tf.gather(paths, position)), hw)
    if split not in dataset._memo:  # TFDS records have no random access; hold the encoded bytes
        dataset._memo[split] = tf.concat(list(_encoded(dataset, split).batch(1024)), 0)
    encoded = dataset._memo[split]
    return lambda position: _decode_resize(tf.gather(encoded, position), hw)


def _batches(dataset, split, positions, hw, preprocessing, augment_key, with_mask):
    """Batches of the examples at ``positions`` [num_batches, per_process_batch]; -1 pads."""
    tf = _tf()
    check_preprocessing(preprocessing)  # fail now, not inside the pipeline
    load, labels = _image_loader(dataset, split, hw), tf.constant(_split(dataset, split).labels)

    def element(position):
        valid = position >= 0
        position = tf.maximum(position, 0)
        out = {"image": load(position), "label": tf.where(valid, tf.gather(labels, position), 0)}
        if with_mask:
            out["mask"] = valid
            out["image"] = out["image"] * tf.cast(valid, tf.uint8)
        if augment_key is not None:  # keyed on the example, so sharding or resuming keeps it
            key = tf.random.experimental.stateless_fold_in(augment_key, position, alg="philox")
            draw = tf.random.stateless_uniform([2], seed=key, alg="philox")
            flip = lambda: tf.reverse(out["image"], axis=[1])
            out["image"] = tf.cond(draw[0] < 0.5, flip, lambda: out["image"])
            out["angle"] = (2.0 * draw[1] - 1.0) * (ROTATION_FACTOR * 2.0 * math.pi)
        return out

    def finish(batch):
        images = tf.cast(batch.pop("image"), tf.float32)
        if augment_key is not None:
            images = _rotate(images, batch.pop("angle"))
        return {"image": preprocess(images, preprocessing), **batch}

    ds = tf.data.Dataset.from_tensor_slices(positions.reshape(-1).astype(np.int64))
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(positions.shape[1], drop_remainder=True)
    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _rotate(images, angles):
    """Rotates float [B, h, w, C] images by ``angles`` (radians), as Keras RandomRotation does."""
    tf = _tf()
    h, w = images.shape[1], images.shape[2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin, zeros = tf.cos(angles), tf.sin(angles), tf.zeros_like(angles)
    transforms = [cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.stack([*transforms, zeros, zeros], axis=1),
        output_shape=[h, w],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def _per_process(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size < 1 or batch_size % process_count or not 0 <= process_index < process_count:
        raise DataError(
            f"batch size {batch_size} must be positive and divisible by the process count "
            f"{process_count} (process index {process_index})"
        )
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def num_batches(dataset: ImageDataset, split: str, batch_size: int, *, drop_remainder: bool) -> int:
    """Global batches per pass over ``split`` (the same on every process)."""
    size = len(_split(dataset, split).labels)
    return size // batch_size if drop_remainder else -(-size // batch_size)


def train_batches(
    dataset: ImageDataset,
    *,
    batch_size: int,
    image_size: int | Sequence[int],
    preprocessing: str,
    augment: bool,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of the 'train' split, shuffled by ``(seed, epoch)``, the remainder dropped.

    Args:
      dataset: from ``open_dataset``.
      batch_size: the global batch size; each process gets ``batch_size // process_count``.
      image_size: int or (height, width), at least 32.
      preprocessing: one of ``PREPROCESSING_MODES``.
      augment: random horizontal flip and rotation (+-72 degrees, bilinear, reflect).
      seed: non-negative; with ``epoch`` it fixes the order and the augmentation.
      epoch: non-negative epoch number.
      start_batch: skip this many batches (to resume mid-epoch); costs nothing.
      process_index: this process's index.
      process_count: the number of processes; every one yields the same number of batches.

    Yields:
      {'image': float32 [b, h, w, 3], 'label': int32 [b]} with b = batch_size // process_count.
    """
    hw, shard = _image_hw(image_size), _per_process(batch_size, process_index, process_count)
    count = num_batches(dataset, "train", batch_size, drop_remainder=True)
    if count == 0:
        raise DataError(
            f"batch size {batch_size} exceeds the {dataset.split_sizes['train']} training examples"
            f" of {dataset.name}: lower the batch size"
        )
    if not 0 <= start_batch <= count:
        raise DataError(f"start_batch {start_batch} is outside the epoch's {count} batches")
    order = np.random.default_rng([seed, epoch]).permutation(dataset.split_sizes["train"])
    positions = order[: count * batch_size].reshape(count, batch_size)[start_batch:, shard]
    key = np.array([seed, epoch], np.int64) if augment else None
    return _batches(dataset, "train", positions, hw, preprocessing, key, with_mask=False)


def eval_batches(
    dataset: ImageDataset,
    split: str,
    *,
    batch_size: int,
    image_size: int | Sequence[int],
    preprocessing: str,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, in a fixed order; the last batch is padded.

    Args:
      dataset: from ``open_dataset``.
      split: 'train', 'validation' or 'test' (those in ``dataset.split_sizes``).
      batch_size: the global batch size; each process gets ``batch_size // process_count``.
      image_size: int or (height, width), at least 32.
      preprocessing: one of ``PREPROCESSING_MODES``.
      process_index: this process's index.
      process_count: the number of processes; every one yields the same number of batches.

    Yields:
      {'image': float32 [b, h, w, 3], 'label': int32 [b], 'mask': bool [b]}; padding has
      mask False, label 0 and a black image.
    """
    hw, shard = _image_hw(image_size), _per_process(batch_size, process_index, process_count)
    size = len(_split(dataset, split).labels)
    count = num_batches(dataset, split, batch_size, drop_remainder=False)
    positions = np.full(count * batch_size, -1, np.int64)
    positions[:size] = np.arange(size)
    positions = positions.reshape(count, batch_size)[:, shard]
    return _batches(dataset, split, positions, hw, preprocessing, None, with_mask=True)


def example_ids(dataset: ImageDataset, split: str) -> tuple[str, ...]:
    """Each example's name, in the split's fixed order (that of ``eval_batches``): its path
    relative to the folder, or ``'split[i]'``, its position in the TFDS split (as in
    ``skipped``)."""
    source = _split(dataset, split)
    if source.tfds_split is None:
        root = pathlib.Path(dataset.name)
        return tuple(str(pathlib.Path(path).relative_to(root)) for path in source.keys)
    return tuple(f"{source.tfds_split}[{i}]" for i in source.keys)


def decoded_images(
    dataset: ImageDataset, split: str, positions: Sequence[int], image_size: int | Sequence[int]
) -> np.ndarray:
    """The examples at ``positions`` of ``split`` as the eval pipeline decodes them, before
    scaling: resized to ``image_size``, uint8 ``[len(positions), h, w, 3]``."""
    tf, hw = _tf(), _image_hw(image_size)
    load = _image_loader(dataset, split, hw)
    images = [load(tf.constant(int(p), tf.int64)).numpy() for p in positions]
    return np.stack(images) if images else np.zeros((0, *hw, 3), np.uint8)


def class_counts(dataset: ImageDataset, split: str) -> np.ndarray:
    """Usable examples per class of ``split`` (``[len(class_names)]``, int64)."""
    return np.bincount(_split(dataset, split).labels, minlength=len(dataset.class_names))
