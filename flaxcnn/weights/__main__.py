"""``python -m flaxcnn.weights``: list, pre-fetch and convert the published Keras weight files.

    python -m flaxcnn.weights list [--model NAME]
    python -m flaxcnn.weights fetch --model NAME [--alpha A] [--size 224] [--no-top]
    python -m flaxcnn.weights convert KERAS_FILE.h5 OUT

``convert`` turns a Keras ``.h5`` a user already has into a self-describing Orbax checkpoint
that ``flaxcnn.checkpoints.restore`` rebuilds with nothing else (for mirrors and offline
machines); the model, its options and the top are read from the file's layer names and
shapes, not trusted from its name. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from flaxcnn.weights import cache, keras_h5, merge
from flaxcnn.weights.errors import WeightsError

EXIT_ERROR = 2
CHECKPOINT_FORMAT = "flaxcnn/1"


def _registry():
    """The model registry, imported on use so that ``list`` and ``fetch`` start fast."""
    from flaxcnn import models

    return models


def _abstract_variables(backbone, model_config: dict[str, Any]) -> dict[str, Any]:
    """Variable shapes of a model config, without computing anything."""
    import jax
    import jax.numpy as jnp

    from flaxcnn.models import build_model

    model = build_model(model_config)
    # Variable shapes do not depend on the input size; the smallest legal one traces fastest.
    image = jnp.zeros((1, backbone.min_input_size, backbone.min_input_size, 3))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), image)


def infer_model_config(
    loaded: dict[str, Any],
    *,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    include_top: bool | None = None,
    pooling: str | None = "avg",
    source: str = "weights file",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Finds the model config a converted Keras file fits, and merges the file into it.

    The model comes from the file's layer names (``flaxcnn.pretrained.identify``) unless
    given; its options from the shapes: every candidate (e.g. each width multiplier, where
    one layer's channel count alone can be ambiguous) is checked against all of the file's
    shapes with the strict merge, and exactly one must fit.

    Args:
      loaded: :func:`flaxcnn.weights.load_keras_h5` output.
      model: the registered model, or ``None`` to infer it.
      options: family options to hold fixed (the others are inferred).
      include_top: whether to keep the classifier; ``None``: keep it if the file has one.
        ``False`` on a file with the top drops the top.
      pooling: pooling of a model without the top (``None``, ``'avg'`` or ``'max'``).
      source: the file's name for error messages.

    Returns:
      ``(model_config, variables)``; ``variables`` hold the file's arrays in the model's
      structure.

    Raises:
      WeightsError: no registered model, or no (or more than one) option setting fits; the
        message names what the file holds or the first mismatch.
    """
    from flaxcnn import pretrained

    models = _registry()
    if model is None:
        found = pretrained.identify(loaded)
        if found is None:
            raise WeightsError(f"{source} holds no registered model's Keras layers; registered: "
                               f"{', '.join(models.list_models())}")  # fmt: skip
        backbone = found[0]
    else:
        try:
            backbone = models.get_backbone(model)
        except models.UnknownModelError as e:
            raise WeightsError(str(e)) from None
    fixed = dict(options or {})
    try:
        backbone.check_options(fixed)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    names = set(loaded.get("params", {})) | set(loaded.get("batch_stats", {}))
    has_top = bool(set(backbone.classifier) & names)
    include_top = has_top if include_top is None else include_top
    if include_top and not has_top:
        raise WeightsError(f"{source} holds no top ({', '.join(backbone.classifier)}); "
                           "convert it with --no-include-top")  # fmt: skip
    num_classes = 1000
    if include_top:  # the classifier's output width (a kernel's last axis)
        classifier = loaded["params"][backbone.classifier[-1]]
        num_classes = int(classifier["kernel"].shape[-1])
    no_top = {layer.name for layer in backbone.layers(False)}
    if not include_top:  # dropping the file's top is the one asked-for difference
        loaded = {c: {k: v for k, v in layers.items() if k in no_top} for c, layers in
                  loaded.items()}  # fmt: skip

    grid = [{}]
    for key, allowed in backbone.options.items():
        values = [fixed[key]] if key in fixed else allowed
        grid = [{**g, key: value} for g in grid for value in values]
    fits, errors = [], []
    for candidate in grid:
        config = backbone.model_config(
            include_top=include_top, num_classes=num_classes,
            pooling=None if include_top else pooling, **candidate)  # fmt: skip
        try:
            variables = merge.merge_variables(
                _abstract_variables(backbone, config), loaded, source=source
            )
        except WeightsError as e:
            errors.append((candidate, str(e)))
            continue
        fits.append((config, variables))
    if len(fits) == 1:
        return fits[0]
    if fits:  # refuse rather than guess
        found = "; ".join(backbone.describe(_options_of(backbone, c)) for c, _ in fits)
        raise WeightsError(f"{source} fits several option settings ({found}); pass them")
    candidate, message = errors[0]
    tried = "; ".join(backbone.describe(c) for c, _ in errors)
    raise WeightsError(
        f"no {backbone.keras_name} with include_top={include_top} fits {source}; tried "
        f"{tried}; with {backbone.describe(candidate)}: {message}")  # fmt: skip


def _options_of(backbone, model_config: dict[str, Any]) -> dict[str, Any]:
    return {k: model_config[k] for k in backbone.options}


def _published(path: pathlib.Path):
    """The registered spec whose Keras file name ``path`` has, if any."""
    models = _registry()
    return next((spec for backbone in models.BACKBONES.values() for spec in backbone.weights
                 if spec.filename == path.name), None)  # fmt: skip


def _is_checkpoint(path: pathlib.Path) -> bool:
    return (path / "metadata").is_dir() and (path / "variables").is_dir()


def convert(
    h5_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    options: dict[str, Any] | None = None,
    include_top: bool | None = None,
    input_size: int | None = None,
    pooling: str | None = "avg",
    overwrite: bool = False,
) -> tuple[pathlib.Path, dict[str, Any]]:
    """Converts a Keras ``.h5`` of a registered model into an Orbax checkpoint at ``out``.

    The checkpoint is written beside ``out`` and renamed into place, so a failed conversion
    never leaves a half checkpoint, nor destroys the one it was to replace.

    Args:
      h5_path: legacy Keras HDF5 weights (``keras.applications`` download or ``save_weights``).
      out: checkpoint folder to create.
      model: the registered model (default: read from the file's layer names).
      options: family options (default: inferred from the file's shapes).
      include_top: keep the classifier (default: when the file has one).
      input_size: image size recorded in the metadata (default: the resolution of a Keras
        file of that name, else the model's default); the weights fit any size.
      pooling: pooling recorded for a model without the top.
      overwrite: replace an existing checkpoint at ``out``.

    Returns:
      ``(out, metadata)``.

    Raises:
      WeightsError: the file is unreadable or fits no registered model, or ``out`` is in the
        way.
    """
    from flaxcnn.checkpoints import save_variables

    source = pathlib.Path(h5_path).expanduser().resolve()
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise WeightsError(f"{out} exists and is not a folder; pass a new folder name")
        if any(out.iterdir()):
            if not overwrite:
                raise WeightsError(f"{out} exists and is not empty; pass --overwrite to replace it")
            if not _is_checkpoint(out):  # --overwrite must never mean `rm -rf` of user data
                raise WeightsError(
                    f"{out} is not a flaxcnn checkpoint, so --overwrite will not delete it; "
                    "pass a new folder name"
                )

    loaded = keras_h5.load_keras_h5(source)
    model_config, variables = infer_model_config(
        loaded, model=model, options=options, include_top=include_top, pooling=pooling,
        source=str(source),
    )  # fmt: skip
    backbone = _registry().get_backbone(model_config["arch"])
    published = _published(source)
    size = input_size or (published.input_size if published else backbone.default_input_size)
    if size < backbone.min_input_size:
        raise WeightsError(f"--input-size {size} is too small; {backbone.keras_name} needs >= "
                           f"{backbone.min_input_size}")  # fmt: skip
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model": model_config,
        "image_size": [size, size],
        "preprocessing": backbone.preprocessing,
        "class_names": None,  # Keras files carry no labels
        "source": str(source),
        "source_sha256": cache.file_digest(source),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"
    retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
    try:
        save_variables(staging, variables, metadata)
        if out.exists():
            out.rename(retired)
        try:
            staging.rename(out)
        except OSError:
            if retired.exists():  # put the checkpoint being replaced back
                retired.rename(out)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return out, metadata


class _Parser(argparse.ArgumentParser):
    """Bad arguments get the same one-line treatment as every other error."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{self.prog}: {message} (see --help)")


def _fail(message: str) -> NoReturn:
    print(" ".join(message.split("\n")), file=sys.stderr)
    sys.exit(EXIT_ERROR)


def _model_filter(args: argparse.Namespace) -> list:
    models = _registry()
    if args.model is None:
        return list(models.BACKBONES.values())
    try:
        return [models.get_backbone(args.model)]
    except models.UnknownModelError as e:
        raise WeightsError(str(e)) from None


def _cmd_list(args: argparse.Namespace) -> int:
    from flaxcnn.pretrained import REGISTERED_FILES
    from flaxcnn.weights.registry import describe_options

    folder = cache.cache_dir(args.cache)
    rows = [("model", "options", "size", "top", "available", "hash", "licence", "url")]
    for backbone in _model_filter(args):
        for spec in backbone.weights:
            env = cache.env_file_for(spec, REGISTERED_FILES)
            if env is not None and env.is_file():
                available = f"${cache.WEIGHTS_ENV}"
            else:
                available = "cached" if (folder / spec.filename).is_file() else "no"
            options = describe_options(spec.options) if spec.options else "-"
            rows.append((spec.model, options, str(spec.input_size),
                         "yes" if spec.include_top else "no", available,
                         spec.hash_algorithm or "none", spec.license, spec.url))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)),
              row[-1])  # fmt: skip
    print(f"\ncache: {folder} (set {cache.CACHE_ENV} or pass --cache to change it); "
          f"available also counts ${cache.WEIGHTS_ENV} (a file, or a folder of Keras-named "
          "files)")  # fmt: skip
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    (backbone,) = _model_filter(args)
    size = args.size or backbone.default_input_size
    try:
        spec = backbone.find_weights(size, args.include_top, **_options(args))
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if spec.input_size != size:
        print(f"note: no file is published at {size}; using {spec.input_size}", file=sys.stderr)
    print(cache.fetch(spec, args.cache, url=args.url))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    out, metadata = convert(
        args.file, args.out, model=args.model, options=_options(args) or None,
        include_top=args.include_top, input_size=args.input_size,
        pooling=None if args.pooling == "none" else args.pooling, overwrite=args.overwrite,
    )  # fmt: skip
    fields = " ".join(f"{k}={v}" for k, v in metadata["model"].items() if k != "arch")
    print(f"wrote {out}: {metadata['model']['arch']} {fields} "
          f"image_size={metadata['image_size'][0]}")  # fmt: skip
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from flaxcnn.cli import model_options

    return model_options(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m flaxcnn.weights`` argument parser."""
    from flaxcnn.cli import add_model_flags

    models = _registry()
    parser = _Parser(
        prog="python -m flaxcnn.weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "List, pre-fetch and convert the ImageNet weight files Keras publishes.\n\n"
            "  python -m flaxcnn.weights list [--model NAME]\n"
            "  python -m flaxcnn.weights fetch --model NAME [--alpha A] [--size 224] "
            "[--no-top]\n"
            "  python -m flaxcnn.weights convert FILE.h5 OUT\n\n"
            f"models: {', '.join(models.list_models())}\n\n"
            "Run 'python -m flaxcnn.weights COMMAND --help' for a command's options."
        ),
        epilog=(
            "environment:\n"
            f"  {cache.CACHE_ENV:17}the cache folder (default ~/.cache/flaxcnn)\n"
            f"  {cache.WEIGHTS_ENV:17}a weights file, or a folder of Keras-named files, that\n"
            f"  {'':17}weights='imagenet' uses instead of the cache (offline machines)\n\n"
            "Errors print one line on stderr and exit with status 2."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,fetch,convert}")
    model_help = f"registered model or Keras name ({', '.join(models.list_models())})"
    cache_help = f"cache folder (default ${cache.CACHE_ENV} or ~/.cache/flaxcnn)"
    list_parser = commands.add_parser(
        "list", help="print the published weight files and whether each is available"
    )
    list_parser.add_argument("--model", help=model_help + "; default: all")
    list_parser.add_argument("--cache", metavar="DIR", help=cache_help)
    list_parser.set_defaults(run=_cmd_list)

    fetch_parser = commands.add_parser(
        "fetch",
        help="download one published file into the cache (checked; reused when valid)",
        description="Download the file nearest to --size for --model into the cache; prints "
        "its path.",
    )
    fetch_parser.add_argument("--model", default=models.DEFAULT_MODEL, help=model_help)
    add_model_flags(fetch_parser)
    fetch_parser.add_argument("--size", type=int, help="input size; the nearest published "
                              "one is used (default: the model's)")  # fmt: skip
    fetch_parser.add_argument(
        "--include-top",
        "--top",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the file with the 1000-class classifier (default) or the backbone only",
    )
    fetch_parser.add_argument("--cache", metavar="DIR", help=cache_help)
    fetch_parser.add_argument("--url", help="download from this address instead (a mirror)")
    fetch_parser.set_defaults(run=_cmd_fetch)

    convert_parser = commands.add_parser(
        "convert",
        help="turn a Keras .h5 of a registered model into a Flax (Orbax) checkpoint",
        description=(
            "Convert a Keras .h5 (legacy HDF5 layout) into an Orbax checkpoint that "
            "flaxcnn.checkpoints.restore(OUT) rebuilds. The model, its options and "
            "include_top are read from the file's layer names and shapes unless given."
        ),
    )
    convert_parser.add_argument("file", metavar="FILE.h5", help="Keras weights file")
    convert_parser.add_argument("out", metavar="OUT", help="checkpoint folder to create")
    convert_parser.add_argument("--model", help=model_help + "; default: from the file")
    add_model_flags(convert_parser, inferred=True)
    convert_parser.add_argument(
        "--include-top",
        "--top",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the classifier (default: when the file has one); --no-include-top drops it",
    )
    convert_parser.add_argument(
        "--input-size",
        type=int,
        metavar="N",
        help="image size N x N recorded in the checkpoint (default: from a Keras file name, "
        "else the model's default)",
    )
    convert_parser.add_argument(
        "--pooling",
        choices=("avg", "max", "none"),
        default="avg",
        help="pooling of a model without the top (avg)",
    )
    convert_parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing checkpoint at OUT"
    )
    convert_parser.set_defaults(run=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors exit with 2 via SystemExit)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except WeightsError as e:
        _fail(f"error: {e}")
    except OSError as e:  # e.g. OUT on a read-only disk; the path and reason are the message
        _fail(f"error: {e.filename or ''}: {e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
