"""Exported models: load and run each format in its own runtime, and compare with the checkpoint.

An artifact written by ``flaxcnn.export`` takes float32 RGB pixels in [0, 255], ``[N, S, S, 3]``,
and returns logits ``[N, classes]``; its metadata (class names, image size, the model) travels
with it: inside the ``.tflite`` file (a flatbuffer metadata entry named :data:`METADATA_NAME`),
as ``assets/flaxcnn_export.json`` of a SavedModel, beside a StableHLO file as ``PATH.json``.

:func:`load` runs each format the way a deployment does: TF Lite through LiteRT's interpreter
(``ai_edge_litert``; XNNPACK on CPU), a SavedModel through ``tf.saved_model.load`` and its
``serving_default`` signature, StableHLO through ``jax.export.deserialize(...).call``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from flaxcnn import data, tf_runtime

METADATA_NAME = "flaxcnn_export"
SAVED_MODEL_METADATA = f"{METADATA_NAME}.json"  # in the SavedModel's assets/
SIGNATURE, INPUT_NAME, OUTPUT_NAME = "serving_default", "images", "logits"
# A conversion is another float32 implementation of the same network: other kernels, other
# summation orders, BatchNorm folded into the kernels. Measured against the checkpoint: at
# most 9e-6 of the largest logit (the default model, ImageNet weights, photos; 4e-6 for the
# other families on random weights). Keras and flaxcnn's default model agree to 1e-4 of the
# output's magnitude with the ImageNet weights on photos (README), and
# Keras differs from itself by 1.25e-5 between its oneDNN and Eigen kernels; a real fault (a
# wrong constant or padding, preprocessing applied twice, a dropped layer) moves the logits
# by 1e-2 of their magnitude or more. Hence 1e-4 of the largest |logit| the images give.
RTOL = 1e-4


class ArtifactError(ValueError):
    """A path that holds no exported flaxcnn model, or a runtime that is not installed."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded export: ``artifact(pixels)`` gives logits.

    Attributes:
      path: the file or folder.
      format: ``'tflite'``, ``'saved_model'`` or ``'stablehlo'``.
      metadata: what the export recorded (``class_names``, ``image_size``, ``model``, ...).
      run: float32 pixels ``[N, S, S, 3]`` in [0, 255] -> float32 logits ``[N, classes]``.
    """

    path: pathlib.Path
    format: str
    metadata: dict[str, Any]
    run: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(pixels, dtype=np.float32))


def sidecar(path: str | os.PathLike) -> pathlib.Path:
    """The metadata JSON beside a StableHLO file."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def format_of(path: str | os.PathLike) -> str:
    """The format of an export, from what is on disk.

    Raises:
      ArtifactError: nothing exported by flaxcnn is there.
    """
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        return "saved_model"
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(8)[4:8] == b"TFL3":  # the flatbuffer file identifier of TF Lite models
                return "tflite"
        if sidecar(path).is_file():
            return "stablehlo"
    raise ArtifactError(
        f"{path} is not a model exported by python -m flaxcnn.export (a .tflite file, a "
        f"SavedModel folder, or a StableHLO file with {sidecar(path).name} beside it)"
    )


def load(path: str | os.PathLike, *, num_threads: int | None = None) -> Artifact:
    """Loads an export in the runtime of its format.

    Args:
      path: a ``.tflite`` file, a SavedModel folder or a StableHLO file.
      num_threads: TF Lite interpreter threads (``None``: LiteRT's default).

    Raises:
      ArtifactError: not an export, or its runtime is not installed.
    """
    path = pathlib.Path(path).expanduser().resolve()
    kind = format_of(path)
    loader = {"tflite": _load_tflite, "saved_model": _load_saved_model,
              "stablehlo": _load_stablehlo}[kind]  # fmt: skip
    metadata, run = loader(path, num_threads) if kind == "tflite" else loader(path)
    return Artifact(path, kind, metadata, run)


def tflite_metadata(model: bytes) -> dict[str, Any]:
    """The flaxcnn metadata entry of a TF Lite flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name().decode() == METADATA_NAME:
            return json.loads(root.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise ArtifactError(f"the TF Lite model has no {METADATA_NAME!r} metadata: export it "
                        "with python -m flaxcnn.export")  # fmt: skip


def _load_tflite(path: pathlib.Path, num_threads: int | None):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ArtifactError("running a .tflite file needs LiteRT: pip install "
                            "'flaxcnn[export]' (ai-edge-litert)") from None  # fmt: skip
    metadata = tflite_metadata(path.read_bytes())
    # The default op resolver applies the XNNPACK delegate on CPU.
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    (source,) = interpreter.get_input_details()
    (target,) = interpreter.get_output_details()
    allocated: list = [None]

    def run(pixels: np.ndarray) -> np.ndarray:
        if allocated[0] != pixels.shape:  # the batch is dynamic: resize, then re-plan
            interpreter.resize_tensor_input(source["index"], pixels.shape, strict=True)
            interpreter.allocate_tensors()
            allocated[0] = pixels.shape
        interpreter.set_tensor(source["index"], pixels)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(target["index"]))

    return metadata, run


def _load_saved_model(path: pathlib.Path):
    tf = tf_runtime.tensorflow()
    metadata = json.loads((path / "assets" / SAVED_MODEL_METADATA).read_text())
    serve = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    return metadata, lambda pixels: serve(**{INPUT_NAME: tf.constant(pixels)})[OUTPUT_NAME].numpy()


def _load_stablehlo(path: pathlib.Path):
    from jax import export

    metadata = json.loads(sidecar(path).read_text())
    exported = export.deserialize(bytearray(path.read_bytes()))
    return metadata, lambda pixels: np.asarray(exported.call(pixels))


# ---------------------------------------------------------------------------- comparison


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Logits of an artifact against the checkpoint's on the same images."""

    max_difference: float
    scale: float  # the largest |logit| of the checkpoint on these images
    images: int
    source: str
    rtol: float = RTOL

    @property
    def bound(self) -> float:
        return self.rtol * max(self.scale, float(np.finfo(np.float32).tiny))

    @property
    def ok(self) -> bool:
        return bool(self.max_difference <= self.bound)

    def describe(self) -> str:
        rtol = f"{self.rtol:.0e}".replace("e-0", "e-")
        return (f"{self.images} {self.source}: max |logit difference| "
                f"{self.max_difference:.3g} {'<=' if self.ok else '>'} {self.bound:.3g} "
                f"({rtol} x max |logit| {self.scale:.3g})")  # fmt: skip


def compare(got: np.ndarray, want: np.ndarray, source: str, images: int | None = None,
            ) -> Comparison:  # fmt: skip
    """Compares an artifact's logits ``got`` with the checkpoint's ``want``.

    ``images``: how many images the rows came from (default: one row each).
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ArtifactError(f"the artifact returned logits of shape {got.shape}; the "
                            f"checkpoint gives {want.shape}")  # fmt: skip
    difference = np.abs(got - want)
    worst = float(np.max(np.where(np.isfinite(difference), difference, np.inf), initial=0.0))
    scale = float(np.max(np.abs(want), initial=0.0))
    return Comparison(worst, scale, len(want) if images is None else images, source)


@dataclasses.dataclass(frozen=True)
class AccuracyChange:
    """Validation accuracy of the checkpoint and of an artifact, image for image."""

    images: int
    source: str
    checkpoint_accuracy: float
    artifact_accuracy: float
    top1_agreement: float
    max_difference: float
    scale: float

    def describe(self) -> str:
        change = 100 * (self.artifact_accuracy - self.checkpoint_accuracy)
        return (f"validation accuracy {100 * self.checkpoint_accuracy:.2f}% (checkpoint) -> "
                f"{100 * self.artifact_accuracy:.2f}% (artifact), {change:+.2f} points, on "
                f"{self.images} {self.source}; top-1 agrees on "
                f"{100 * self.top1_agreement:.2f}%; max |logit difference| "
                f"{self.max_difference:.3g} ({self.max_difference / max(self.scale, 1e-30):.2%} "
                f"of max |logit|)")  # fmt: skip


def accuracy_change(
    artifact: Callable[[np.ndarray], np.ndarray], checkpoint: Callable[[np.ndarray], np.ndarray],
    batches: Iterator[tuple[np.ndarray, np.ndarray]], source: str,
) -> AccuracyChange:  # fmt: skip
    """Runs both on every labelled batch of pixels and counts correct top-1 predictions.

    A short batch is padded to the first one's size (and the padding dropped), so that a
    jitted ``checkpoint`` compiles once.
    """
    right, agree, count, worst, scale, size = np.zeros(2), 0, 0, 0.0, 0.0, None
    for pixels, labels in batches:
        size = size or len(pixels)
        padded = np.concatenate([pixels, np.zeros((size - len(pixels), *pixels.shape[1:]),
                                                  pixels.dtype)])  # fmt: skip
        got = np.asarray(artifact(padded))[: len(labels)]
        want = np.asarray(checkpoint(padded))[: len(labels)]
        right += [(want.argmax(-1) == labels).sum(), (got.argmax(-1) == labels).sum()]
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        count += len(labels)
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    if not count:
        raise ArtifactError(f"no readable images in {source}")
    return AccuracyChange(count, source, right[0] / count, right[1] / count, agree / count,
                          worst, scale)  # fmt: skip


# ---------------------------------------------------------------------------- images


def load_pixels(paths, image_size) -> np.ndarray:
    """Image files decoded and resized as the input pipeline does them, as float32 pixels
    in [0, 255]: what an exported model takes.

    Raises:
      DataError: a file is missing or cannot be decoded (named in the message).
    """
    # 'unit' scales by 1/255 in float32; times 255 that rounds back to the decoded integers.
    return np.round(data.load_images(paths, image_size, "unit") * 255.0)


def labelled_pixels(
    folder: str | os.PathLike, metadata: Mapping[str, Any], *, batch_size: int = 32,
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], int, str]:  # fmt: skip
    """The validation images of ``folder`` as float32 pixels in [0, 255], with labels.

    ``folder`` is a dataset folder (``train/<class>/``, optional ``validation/<class>/``:
    its validation split, carved from train with the run's fraction and seed as training
    did) or a folder of class subfolders (all of its images).

    Returns:
      ``(batches, count, description)``: batches of ``(pixels, labels)``.

    Raises:
      DataError: no such folder, no readable images, or classes other than the checkpoint's.
    """
    folder = pathlib.Path(folder).expanduser()
    config = metadata.get("config") or {}
    classes = [str(c) for c in metadata.get("class_names") or []]
    size = metadata["image_size"]
    if not folder.is_dir():
        raise data.DataError(f"{folder} is not a folder of validation images")
    if (folder / "train").is_dir():
        dataset = data.open_dataset(str(folder), download=False,
                                    validation_fraction=config.get("validation_fraction", 0.2),
                                    split_seed=config.get("seed", 0))  # fmt: skip
        found, count = list(dataset.class_names), dataset.split_sizes["validation"]
        description = f"validation images of {folder}"
    else:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        paths = [(p, found.index(p.parent.name)) for c in found for p in sorted(
            (folder / c).iterdir()) if p.suffix.lower() in data.IMAGE_EXTENSIONS]  # fmt: skip
        count, description = len(paths), f"images of {folder}"
    if classes and found != classes:
        raise data.DataError(f"{folder} has the classes {', '.join(found)}; the checkpoint "
                             f"was trained on {', '.join(classes)}")  # fmt: skip

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if (folder / "train").is_dir():
            # 'unit' gives x / 255 in float32; x * 255 rounds back to the decoded integers.
            for batch in data.eval_batches(dataset, "validation", batch_size=batch_size,
                                           image_size=size, preprocessing="unit"):  # fmt: skip
                keep = batch["mask"]
                yield np.round(batch["image"][keep] * 255.0), batch["label"][keep]
            return
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            readable = []
            for path, label in chunk:  # an unreadable file is skipped, as training skips it
                try:
                    readable.append((load_pixels([path], size)[0], label))
                except data.DataError:
                    continue
            if readable:
                yield (np.stack([r[0] for r in readable]),
                       np.array([r[1] for r in readable]))  # fmt: skip

    return batches(), count, description


def validation_folder(
    metadata: Mapping[str, Any], validation_data: str | os.PathLike | None = None,
) -> pathlib.Path | None:  # fmt: skip
    """``validation_data`` if given, else the folder the run trained on if it still exists."""
    if validation_data is not None:
        return pathlib.Path(validation_data).expanduser()
    folder = metadata.get("data")
    return pathlib.Path(folder).expanduser() if folder and pathlib.Path(
        folder).expanduser().is_dir() else None  # fmt: skip


def generated_pixels(metadata: Mapping[str, Any], count: int) -> np.ndarray:
    """Seeded uniform noise, the first image all black and the second all white (both ends
    of the input range): the self-check's images when there is no validation folder."""
    height, width = metadata["image_size"]
    pixels = np.random.default_rng(0).integers(0, 256, (count, height, width, 3))
    pixels[0], pixels[min(1, count - 1)] = 0, 255
    return pixels.astype(np.float32)
