"""Classify image files with a trained (or converted) checkpoint, or a model exported from one.

    python -m flaxcnn.predict --checkpoint checkpoints/RUN cat.jpg dog.png
    python -m flaxcnn.predict --checkpoint RUN photos/ 'more/**/*.jpg' --top-k 3
    python -m flaxcnn.predict --checkpoint RUN --json photos/      # one JSON object per line
    python -m flaxcnn.predict --model-file model.tflite photos/    # an exported model

Inputs are image files, folders (their images, recursively) and quoted glob patterns, which
predict expands itself (``**`` included). The preprocessing contract (input size, scaling,
class names, test-time augmentation) is read from the checkpoint's metadata, so predictions
see exactly what training saw and score as the run's validation did (``--tta`` overrides the
run's test-time augmentation). A checkpoint of an ImageNet classifier (a Keras file with its
top, converted by ``python -m flaxcnn.weights convert``) names the 1000 ImageNet classes
(``flaxcnn.imagenet_labels``). A file that cannot be read is reported in one line and the
others are classified; the exit status is then 2, as for a bad flag or checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from flaxcnn import checkpoints, data, export_check, imagenet_labels, models, tta

PROG = "python -m flaxcnn.predict"
IMAGENET_CLASSES = 1000
_GLOB_CHARACTERS = frozenset("*?[")


def class_names(metadata: Mapping[str, Any]) -> list[str]:
    """The name of each output of the classifier a checkpoint's metadata describes.

    The run's own class names if it has them; else ImageNet's for a registered model with
    its 1000-class top; else the output indices.

    Raises:
      CheckpointError: the checkpoint is a feature extractor (a backbone without its top):
        its outputs are features, not class scores.
    """
    model = metadata["model"]
    arch = model.get("arch", "")
    if models.is_backbone(arch) and not model.get("include_top", True):
        raise checkpoints.CheckpointError(
            f"the checkpoint holds a feature extractor ({models.get_backbone(arch).keras_name} "
            "without its classifier): its outputs are pooled features, not class scores; pass "
            "a trained run's folder, or convert a Keras file that includes the top (python -m "
            "flaxcnn.weights convert FILE.h5 OUT)"
        )
    if metadata.get("class_names"):
        return [str(name) for name in metadata["class_names"]]
    count = int(model.get("num_classes", IMAGENET_CLASSES))
    if models.is_backbone(arch) and count == IMAGENET_CLASSES:
        return list(imagenet_labels.class_names())
    return [str(i) for i in range(count)]


def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.is_file())  # fmt: skip


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[pathlib.Path], list[str]]:
    """Files to classify from files, folders (recursively) and glob patterns.

    A path is taken as given (a missing file is reported when it is read); a folder gives
    its images (``data.IMAGE_EXTENSIONS``); a pattern that is no existing path gives its
    matches, folders among them expanded and other files kept by extension.

    Returns:
      ``(files, problems)``: the files in input order without repeats, and one line per
      folder or pattern that gave no image.
    """
    files, problems = [], []
    extensions = "/".join(data.IMAGE_EXTENSIONS)
    for item in inputs:
        text = os.fspath(item)
        path = pathlib.Path(text).expanduser()
        if path.is_dir():
            found = _images_in(path)
            if not found:
                problems.append(f"folder {text} holds no images ({extensions})")
        elif path.exists() or not _GLOB_CHARACTERS & set(text):
            found = [path]
        else:
            found = []
            for match in map(pathlib.Path, sorted(glob.glob(str(path), recursive=True))):
                if match.is_dir():
                    found += _images_in(match)
                elif match.suffix.lower() in data.IMAGE_EXTENSIONS:
                    found.append(match)
            if not found:
                problems.append(f"pattern {text!r} matches no images ({extensions})")
        files += found
    return list(dict.fromkeys(files)), problems


def tta_mode(metadata: Mapping[str, Any], override: str | None = None) -> str:
    """The test-time augmentation to predict with: ``override``, else the run's (checkpoints
    record it; those written before it was recorded, and converted Keras files, have none)."""
    mode = override or metadata.get("tta") or "none"
    tta.num_views(mode)  # raises on an unknown mode
    return mode


def iter_predictions(
    model: Any, variables: Any, metadata: Mapping[str, Any], paths: Sequence[str | os.PathLike],
    top_k: int = 1, batch_size: int = 32, tta_override: str | None = None,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """:func:`predict_files`, one result at a time, in the order of ``paths``."""
    import jax

    from flaxcnn import compiler

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k={top_k}, batch_size={batch_size}: both must be positive")
    names = class_names(metadata)
    top_k = min(top_k, len(names))
    size, mode = metadata["image_size"], metadata["preprocessing"]
    views = tta_mode(metadata, tta_override)
    logits = lambda v, x: tta.logits(lambda y: model.apply(v, y, train=False), x, views)
    apply = compiler.jit(lambda v, x: jax.nn.softmax(logits(v, x).astype("float32")))
    # One batch shape for every call, the last batch padded: one compilation.
    shape = min(batch_size, len(paths))
    pending: list[tuple[str, np.ndarray | str]] = []  # (path, image) or (path, error message)

    def classify() -> Iterator[dict[str, Any]]:
        images = [item for _, item in pending if not isinstance(item, str)]
        if images:
            batch = np.zeros((shape, *images[0].shape), images[0].dtype)
            batch[: len(images)] = images
            probabilities = iter(np.asarray(apply(variables, batch))[: len(images)])
        for path, item in pending:
            if isinstance(item, str):
                yield {"image": path, "error": item}
                continue
            yield _result(path, next(probabilities), names, top_k)
        pending.clear()

    loaded = 0
    for path in paths:
        try:
            pending.append((str(path), data.load_images(path, size, mode)[0]))
            loaded += 1
        except data.DataError as e:
            pending.append((str(path), str(e)))
        if loaded == shape:
            yield from classify()
            loaded = 0
    yield from classify()


def _result(path: str, p: np.ndarray, names: Sequence[str], top_k: int) -> dict[str, Any]:
    order = np.argsort(-p, kind="stable")[:top_k]
    return {
        "image": path, "label": names[order[0]], "probability": float(p[order[0]]),
        "top_k": [[names[i], float(p[i])] for i in order],
        "probabilities": dict(zip(names, map(float, p), strict=True)),
    }  # fmt: skip


def iter_artifact_predictions(
    artifact: export_check.Artifact, paths: Sequence[str | os.PathLike], top_k: int = 1,
    batch_size: int = 32, tta_override: str | None = None,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """:func:`iter_predictions` for a model exported by ``python -m flaxcnn.export``, run in
    its own runtime: the same rows, the run's test-time augmentation applied around it.

    Args:
      artifact: from ``flaxcnn.export_check.load(path)`` (a ``.tflite`` file, a SavedModel
        folder or a StableHLO file); it takes pixels in [0, 255] and scales them itself.
      paths, top_k, batch_size, tta_override: as for :func:`predict_files`.
    """
    import jax

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k={top_k}, batch_size={batch_size}: both must be positive")
    names, size = list(artifact.metadata["class_names"]), artifact.metadata["image_size"]
    top_k, views = min(top_k, len(names)), tta_mode(artifact.metadata, tta_override)
    for start in range(0, len(paths), batch_size):
        loaded: list[tuple[str, np.ndarray | str]] = []  # (path, pixels) or (path, error)
        for path in paths[start : start + batch_size]:
            try:
                loaded.append((str(path), export_check.load_pixels([path], size)[0]))
            except data.DataError as e:
                loaded.append((str(path), str(e)))
        images = [item for _, item in loaded if not isinstance(item, str)]
        if images:
            logits = np.asarray(tta.logits(artifact, np.stack(images), views), np.float32)
            probabilities = iter(np.asarray(jax.nn.softmax(logits)))
        for path, item in loaded:
            if isinstance(item, str):
                yield {"image": path, "error": item}
            else:
                yield _result(path, next(probabilities), names, top_k)


def predict_files(
    model: Any, variables: Any, metadata: Mapping[str, Any], paths: Sequence[str | os.PathLike],
    top_k: int = 1, batch_size: int = 32, tta_override: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Class probabilities of each image file.

    Args:
      model, variables, metadata: as returned by ``flaxcnn.checkpoints.restore``.
      paths: image files.
      top_k: classes to rank per image (positive; more than the class count ranks them all).
      batch_size: images per forward pass.
      tta_override: test-time augmentation (``flaxcnn.tta.MODES``) instead of the run's
        (``metadata['tta']``).

    Returns:
      One dict per path, in order: ``{'image', 'label', 'probability', 'top_k': [[label, p],
      ...], 'probabilities': {label: p} (every class)}``; for a file that cannot be read,
      ``{'image', 'error'}`` with a one-line reason instead.

    Raises:
      CheckpointError: the checkpoint is a feature extractor, not a classifier.
      ValueError: ``top_k`` or ``batch_size`` is not positive.
    """
    return list(iter_predictions(model, variables, metadata, paths, top_k, batch_size,
                                 tta_override))


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from flaxcnn.cli import OneLineParser

    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="run folder, its best/ or checkpoints/ folder, or one step folder")
    source.add_argument("--model-file", help="a model exported by python -m flaxcnn.export "
                        "(.tflite file, SavedModel folder or StableHLO file), run in its own "
                        "runtime")  # fmt: skip
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, folders (searched recursively) or quoted glob "
                        "patterns such as 'photos/**/*.jpg'")  # fmt: skip
    parser.add_argument("--top-k", type=_positive_int, default=1,
                        help="classes to print per image, most probable first (a number above "
                        "the class count prints every class; default: 1)")  # fmt: skip
    parser.add_argument("--batch-size", type=_positive_int, default=32,
                        help="images per forward pass (default: 32)")
    parser.add_argument("--tta", choices=tta.MODES, default=None,
                        help="test-time augmentation: flip averages each image's and its "
                        "mirror's logits (default: what the run validated with)")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image: label, probability, top_k and the "
                        "probability of every class by name")  # fmt: skip
    args = parser.parse_args(argv)
    fail = lambda message: print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    try:
        if args.model_file:
            artifact = export_check.load(args.model_file)
        else:
            class_names(checkpoints.read_metadata(args.checkpoint))  # refuse before restoring
            model, variables, metadata = checkpoints.restore(args.checkpoint)
    except (checkpoints.CheckpointError, export_check.ArtifactError, OSError) as e:
        fail(str(e))
        return 2
    paths, problems = expand_inputs(args.images)
    for problem in problems:
        fail(problem)
    failed, classified = len(problems), 0
    results = (iter_artifact_predictions(artifact, paths, args.top_k, args.batch_size, args.tta)
               if args.model_file else iter_predictions(model, variables, metadata, paths,
                                                        args.top_k, args.batch_size, args.tta))
    for result in results:
        if "error" in result:
            fail(result["error"])
            failed += 1
            continue
        classified += 1
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            ranked = ", ".join(f"{label} {p:.3f}" for label, p in result["top_k"])
            print(f"{result['image']}: {ranked}", flush=True)
    if failed:
        fail(f"{failed} input(s) could not be classified (named above); {classified} image(s) "
             "were")  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
