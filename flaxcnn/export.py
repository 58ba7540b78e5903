"""Deploy a trained classifier: a checkpoint as TF Lite, a SavedModel or StableHLO, verified.

    python -m flaxcnn.export RUN --format tflite --output model.tflite [--quantize dynamic]
    python -m flaxcnn.export RUN --format saved_model --output serving/classifier/1
    python -m flaxcnn.export RUN --format stablehlo --output model.stablehlo

Every artifact takes float32 RGB pixels in [0, 255], ``[N, S, S, 3]`` with any batch ``N``, at
the checkpoint's image size; the checkpoint's preprocessing is inside; it returns logits
``[N, classes]`` and carries its class names (see ``flaxcnn.export_check``). Before the
export reports success it runs the artifact in its own runtime (LiteRT with XNNPACK,
``tf.saved_model.load``, ``jax.export.deserialize``) on a few images, a batch of them and one
alone, and compares the logits with ``flaxcnn.checkpoints.restore()`` + apply. The artifact
is written under a temporary name and renamed only when that check passed, so a failed
export leaves nothing under the output name.

How each format is made, from the checkpoint's own variables:

- ``tflite`` and ``saved_model``: the model's jaxpr translated into plain TF ops
  (``flaxcnn.jax_to_tf``), so the batch axis is dynamic and the TF Lite converter fuses
  BatchNorm and activations into the convolutions as it does for Keras models. The
  convolutions are traced with ``conv_impl='lax'``, the formulation that maps onto TF's
  conv and depthwise-conv ops.
- ``stablehlo``: ``jax.export`` with a symbolic batch, for each of ``--platforms``, with the
  formulation ``conv_impl='auto'`` picks on that platform (``lax.platform_dependent``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flaxcnn import checkpoints, data, export_check, jax_to_tf, models, tf_runtime
from flaxcnn.export_check import ArtifactError, Comparison

PROG = "python -m flaxcnn.export"
FORMATS = ("tflite", "saved_model", "stablehlo")
QUANTIZATIONS = ("dynamic", "float16")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda")
CHECK_IMAGES = 8
# The formulation conv_impl='auto' resolves to on each platform (flaxcnn.models.layers).
_CONV_IMPL = {"cpu": "unrolled"}


class ExportError(ValueError):
    """An export that cannot be made; the one-line message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how it was verified.

    Attributes:
      path: the artifact (a file, or the SavedModel folder).
      format: one of ``FORMATS``.
      model: the model, as messages name it.
      metadata: what the artifact carries (``flaxcnn.export_check``).
      check: the float32 artifact against the checkpoint (for a quantized TF Lite model,
        the float32 conversion it was quantized from).
      quantize: the quantization, or ``None``.
      quantized_check: the quantized artifact against the checkpoint on the check images.
      accuracy: the quantized artifact's validation accuracy against the checkpoint's
        (``None`` without a validation folder).
    """

    path: pathlib.Path
    format: str
    model: str
    metadata: dict
    check: Comparison
    quantize: str | None = None
    quantized_check: Comparison | None = None
    accuracy: export_check.AccuracyChange | None = None

    def lines(self) -> list[str]:
        """The report the command line prints."""
        metadata = self.metadata
        height, width = metadata["image_size"]
        names = metadata["class_names"]
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        kind = self.format + (f" ({self.quantize} quantization)" if self.quantize else "")
        lines = [
            f"exported {kind} to {self.path} ({_size(self.path) / 1e6:.1f} MB): {self.model}; "
            f"float32 RGB pixels in [0, 255] [N, {height}, {width}, 3] -> logits "
            f"[N, {len(names)}] ({shown}); preprocessing {metadata['preprocessing']!r} inside",
            f"self-check{' of the float32 conversion' if self.quantize else ''} against the "
            f"checkpoint: {self.check.describe()}",
        ]
        if self.quantize:  # measured and reported; quantization error has no bound here
            if self.accuracy is not None:
                lines.append(f"quantized ({self.quantize}): {self.accuracy.describe()}")
            else:
                change = self.quantized_check
                share = change.max_difference / max(change.scale, 1e-30)
                lines.append(f"quantized ({self.quantize}): accuracy change not measured (no "
                             "validation folder: pass --validation-data DIR); on the "
                             f"{change.images} {change.source}: max |logit difference| "
                             f"{change.max_difference:.3g} ({share:.2%} of max |logit|)")
        return lines


def export(
    checkpoint: str | os.PathLike, format: str, output: str | os.PathLike, *,
    quantize: str | None = None, overwrite: bool = False,
    validation_data: str | os.PathLike | None = None, check_images: int = CHECK_IMAGES,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> ExportResult:  # fmt: skip
    """Exports a checkpoint and verifies the artifact against it.

    Args:
      checkpoint: a run folder, its ``best/`` or ``checkpoints/`` folder, or a step folder
        (as ``flaxcnn.checkpoints.restore`` takes).
      format: ``'tflite'``, ``'saved_model'`` or ``'stablehlo'``.
      output: the file (``tflite``, ``stablehlo``: plus ``OUTPUT.json``) or folder to write.
      quantize: ``tflite`` only: ``'dynamic'`` (int8 weights) or ``'float16'``.
      overwrite: replace an existing output (a folder only if it holds a SavedModel).
      validation_data: images for the checks and the quantized accuracy (a dataset folder
        or a folder of class subfolders); default: the run's data folder if it exists.
      check_images: how many images the self-check runs.
      platforms: ``stablehlo`` only: the platforms the artifact is lowered for.

    Returns:
      What was written and the checks' results.

    Raises:
      ExportError, CheckpointError, DataError, ArtifactError: one line naming the problem.
    """
    output = _check_request(format, output, quantize, overwrite, check_images, platforms)
    model, variables, metadata = checkpoints.restore(checkpoint)
    # The reference is restore()'s own model; the other formulations share its variables.
    build = lambda impl: model if impl == "auto" else models.build_model(metadata["model"],
                                                                          conv_impl=impl)
    metadata = {**metadata, "checkpoint": str(pathlib.Path(checkpoint).expanduser().resolve())}
    return export_variables(build, variables, metadata, format, output, quantize=quantize,
                            overwrite=overwrite, validation_data=validation_data,
                            check_images=check_images, platforms=platforms)  # fmt: skip


def export_variables(
    build: Callable[[str], Any], variables: Any, metadata: Mapping[str, Any], format: str,
    output: str | os.PathLike, *, quantize: str | None = None, overwrite: bool = False,
    validation_data: str | os.PathLike | None = None, check_images: int = CHECK_IMAGES,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> ExportResult:  # fmt: skip
    """:func:`export` for variables in memory.

    Args:
      build: the model for a convolution formulation (``'auto'``, ``'lax'``, ``'unrolled'``:
        ``flaxcnn.models.layers``); ``build('auto').apply(variables, x)`` is the reference.
      variables: its ``{'params', 'batch_stats'?}``.
      metadata: as checkpoints store it: ``model`` (the model config), ``image_size``,
        ``preprocessing``, ``class_names``.
      format, output, ...: as for :func:`export`.
    """
    from flaxcnn import compiler, predict

    output = _check_request(format, output, quantize, overwrite, check_images, platforms)
    described = describe_model(metadata["model"])
    record = {"format": format, "quantize": quantize, "class_names": predict.class_names(metadata),
              "image_size": list(metadata["image_size"]), "input": {
                  "name": export_check.INPUT_NAME, "dtype": "float32", "range": [0, 255],
                  "layout": "NHWC RGB"}, "output": export_check.OUTPUT_NAME,
              "preprocessing": metadata["preprocessing"], "model": metadata["model"],
              "checkpoint": metadata.get("checkpoint"), "data": metadata.get("data"),
              # The run's test-time augmentation, for predict to apply around the artifact
              # as it does around the checkpoint; the artifact computes one view's logits.
              "tta": metadata.get("tta")}  # fmt: skip
    folder = export_check.validation_folder(metadata, validation_data)
    labelled, first, source = iter(()), None, "generated images (seeded noise, black, white)"
    if folder is not None:
        labelled, _, source = export_check.labelled_pixels(folder, metadata,
                                                           batch_size=check_images)  # fmt: skip
        first = next(labelled, None)
    pixels = first[0] if first else export_check.generated_pixels(metadata, check_images)
    mode = metadata["preprocessing"]
    apply = compiler.jit(pixels_to_logits(build("auto"), mode))
    reference = lambda x: np.asarray(apply(variables, x))
    temporary = output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
    written = [temporary, export_check.sidecar(temporary)]
    try:
        if format == "stablehlo":
            _write_stablehlo(build, variables, mode, tuple(metadata["image_size"]), temporary,
                             record, platforms, described)  # fmt: skip
        else:
            module = _tf_module(build("lax"), variables, mode, metadata["image_size"], described,
                                format)  # fmt: skip
            if format == "saved_model":
                _write_saved_model(module, temporary, record)
            else:  # the float32 conversion first: the self-check's subject
                _write_tflite(module, temporary, {**record, "quantize": None}, None, described)
        check = _self_check(temporary, pixels, reference(pixels), source)
        if not check.ok:
            raise ExportError(f"self-check failed: the {format} export of {described} differs "
                              f"from the checkpoint on {check.describe()}; nothing was written "
                              f"to {output}")  # fmt: skip
        quantized_check = accuracy = None
        if quantize:
            quantized = temporary.with_name(temporary.name + f".{quantize}")
            written.append(quantized)
            _write_tflite(module, quantized, record, quantize, described)
            quantized_check = _self_check(quantized, pixels, reference(pixels), source)
            if first is not None:  # the accuracy change over the whole validation folder
                accuracy = export_check.accuracy_change(
                    export_check.load(quantized), reference, itertools.chain([first], labelled),
                    source)  # fmt: skip
        _replace(quantized if quantize else temporary, output, format)
    finally:
        for path in written:
            _remove(path)
    return ExportResult(output, format, described, record, check, quantize, quantized_check,
                        accuracy)  # fmt: skip


def describe_model(model_config: Mapping[str, Any]) -> str:
    """The backbone's own description (its name and options) and the head: how messages name
    a model."""
    found = models.backbone_of(model_config)
    name = found[0].describe(found[1]) if found else str(model_config.get("arch"))
    if model_config.get("arch") == "transfer":
        return f"{name} with a {model_config['num_classes']}-class head"
    return name


# ---------------------------------------------------------------------------- conversion


def pixels_to_logits(model: Any, mode: str) -> Callable:
    """What every artifact computes, in JAX: ``(variables, pixels in [0, 255]) -> logits``.

    Args:
      model: a classifier module (``model.apply(variables, x, train=False)`` gives logits).
      mode: the preprocessing (``flaxcnn.data.PREPROCESSING_MODES``), applied with
        ``flaxcnn.data``'s own arithmetic: what ``scale_images`` and the input pipeline do.
    """

    def logits(variables, pixels):
        return model.apply(variables, data.preprocess(pixels, mode), train=False)

    return logits


def _tf_module(model, variables, mode: str, image_size, described: str, format: str):
    import jax

    tf = tf_runtime.tensorflow()
    host = jax.device_get(variables)
    fn = lambda pixels: pixels_to_logits(model, mode)(host, pixels)
    try:
        return jax_to_tf.to_tf_module(fn, (*image_size, 3), tf=tf,
                                      input_name=export_check.INPUT_NAME,
                                      output_name=export_check.OUTPUT_NAME)  # fmt: skip
    except jax_to_tf.UnsupportedPrimitiveError as e:
        raise ExportError(f"{described} has no {format} export path yet ({e}); export it as "
                          "--format stablehlo instead") from None  # fmt: skip


def _write_tflite(module, path: pathlib.Path, record: dict, quantize: str | None,
                  described: str) -> None:  # fmt: skip
    tf = tf_runtime.tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)  # fmt: skip
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights ("dynamic range")
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
    try:
        model = converter.convert()
    except Exception as e:  # the converter's errors are many-line MLIR dumps
        reason = next((line for line in str(e).splitlines() if "error" in line.lower()), str(e))
        raise ExportError(f"{described} has no tflite export path yet (the TF Lite converter "
                          f"failed: {' '.join(reason.split())[:300]})") from None  # fmt: skip
    tree = flatbuffer_utils.convert_bytearray_to_object(model)
    buffer = flatbuffer_utils.schema_fb.BufferT()
    buffer.data = np.frombuffer(json.dumps({**record, "quantize": quantize}).encode(), np.uint8)
    entry = flatbuffer_utils.schema_fb.MetadataT()
    entry.name, entry.buffer = export_check.METADATA_NAME, len(tree.buffers)
    tree.buffers.append(buffer)
    tree.metadata = [*(tree.metadata or []), entry]
    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)))


def _write_saved_model(module, path: pathlib.Path, record: dict) -> None:
    tf = tf_runtime.tensorflow()
    with tempfile.TemporaryDirectory() as scratch:
        asset = pathlib.Path(scratch) / export_check.SAVED_MODEL_METADATA
        asset.write_text(json.dumps(record, indent=1))
        module.metadata = tf.saved_model.Asset(str(asset))  # copied into assets/ by save
        tf.saved_model.save(module, str(path), signatures={
            export_check.SIGNATURE: module.serve.get_concrete_function()})  # fmt: skip


def _write_stablehlo(build, variables, mode: str, image_size: tuple, path: pathlib.Path,
                     record: dict, platforms: Sequence[str], described: str) -> None:  # fmt: skip
    import jax
    from jax import export, lax

    formulations = {impl: pixels_to_logits(build(impl), mode) for impl in ("lax", "unrolled")}
    branch = lambda impl: lambda x: formulations[impl](variables, x)
    branches = {p: branch(_CONV_IMPL.get(p, "lax")) for p in platforms}
    logits = lambda pixels: lax.platform_dependent(pixels, **branches)

    (batch,) = export.symbolic_shape("n")
    spec = jax.ShapeDtypeStruct((batch, *image_size, 3), np.float32)
    try:
        exported = export.export(jax.jit(logits), platforms=tuple(platforms))(spec)
    except Exception as e:
        raise ExportError(f"{described} has no stablehlo export path yet (jax.export failed: "
                          f"{' '.join(str(e).split())[:300]})") from None  # fmt: skip
    path.write_bytes(exported.serialize())
    export_check.sidecar(path).write_text(json.dumps({**record, "platforms": list(platforms)},
                                                     indent=1))  # fmt: skip


# ---------------------------------------------------------------------------- checks


def _self_check(path: pathlib.Path, pixels: np.ndarray, want: np.ndarray, source: str):
    """The artifact on the images as one batch and on the first one alone (the batch axis
    is dynamic: both sizes must give the checkpoint's logits)."""
    artifact = export_check.load(path)
    batched, alone = artifact(pixels), artifact(pixels[:1])
    got = np.concatenate([batched, alone])
    return export_check.compare(got, np.concatenate([want, want[:1]]),
                                f"{source}, as one batch and the first alone",
                                images=len(pixels))  # fmt: skip


# ---------------------------------------------------------------------------- output


def _check_request(format, output, quantize, overwrite, check_images, platforms) -> pathlib.Path:
    """Every cheap check, before the checkpoint is read: bad values and unwritable outputs."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is unknown; allowed: {', '.join(FORMATS)}")
    if quantize is not None and (format != "tflite" or quantize not in QUANTIZATIONS):
        raise ExportError(f"--quantize {quantize!r} is invalid; allowed with --format tflite: "
                          f"{', '.join(QUANTIZATIONS)}")  # fmt: skip
    unknown = sorted(set(platforms) - set(PLATFORMS)) or ([] if platforms else ["(none)"])
    if unknown:
        raise ExportError(f"--platforms {unknown[0]} is unknown; allowed: {', '.join(PLATFORMS)}")
    if check_images < 1:
        raise ExportError(f"--check-images {check_images} is invalid; allowed: a positive "
                          "integer")  # fmt: skip
    output = pathlib.Path(output).expanduser().absolute()
    targets = [output] + ([export_check.sidecar(output)] if format == "stablehlo" else [])
    for target in targets:
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise ExportError(f"--output {target} exists; pass --overwrite to replace it")
            if target.is_dir() and not (target / "saved_model.pb").is_file():
                raise ExportError(f"--output {target} is a folder that holds no SavedModel; it "
                                  "is never replaced, even with --overwrite: pass another "
                                  "path")  # fmt: skip
    parent = output.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not an existing folder")
        descriptor, probe = tempfile.mkstemp(dir=parent, prefix=f".{output.name}.probe-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ExportError(f"--output {output} cannot be written ({reason}); pass a path in a "
                          "writable folder") from None  # fmt: skip
    return output


def _replace(temporary: pathlib.Path, output: pathlib.Path, format: str) -> None:
    """Moves the checked artifact to its name; an old one is removed only after that."""
    if format == "stablehlo":
        os.replace(export_check.sidecar(temporary), export_check.sidecar(output))
    if output.is_dir() and not output.is_symlink():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        output.rename(old)
        temporary.rename(output)
        shutil.rmtree(old)
    else:
        os.replace(temporary, output)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _size(path: pathlib.Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 2 bad input)."""
    from flaxcnn import cli

    parser = cli.OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run folder, its best/ or checkpoints/ folder, or "
                        "one step folder")  # fmt: skip
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--output", required=True, help="the file (tflite, stablehlo) or "
                        "SavedModel folder to write; its folder must exist")  # fmt: skip
    parser.add_argument("--quantize", default=None, help="tflite only: dynamic (int8 weights) "
                        "or float16; the validation accuracy change is printed")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--validation-data", default=None, help="images for the checks and the "
                        "accuracy change: a dataset folder or a folder of class subfolders "
                        "(default: the run's data folder, if it exists)")  # fmt: skip
    parser.add_argument("--check-images", type=int, default=CHECK_IMAGES,
                        help=f"images the self-check runs (default {CHECK_IMAGES})")  # fmt: skip
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help="stablehlo only: comma-separated platforms to lower for, of "
                        f"{', '.join(PLATFORMS)} (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        result = export(args.checkpoint, args.format, args.output, quantize=args.quantize,
                        overwrite=args.overwrite, validation_data=args.validation_data,
                        check_images=args.check_images,
                        platforms=[p for p in args.platforms.split(",") if p])  # fmt: skip
        lines = result.lines()
    except (ExportError, checkpoints.CheckpointError, data.DataError, ArtifactError,
            OSError) as e:  # fmt: skip
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
