"""``python -m flaxcnn.weights``: list, pre-fetch and convert MobileNetV2 ImageNet weight files.

    python -m flaxcnn.weights list
    python -m flaxcnn.weights fetch --alpha 1.0 --size 224 --no-top
    python -m flaxcnn.weights convert mobilenet_v2_..._1.0_224_no_top.h5 ckpt/mnv2_1.0_224

``convert`` turns a Keras ``.h5`` a user already has into a self-describing Orbax checkpoint
that ``flaxcnn.checkpoints.restore`` rebuilds with nothing else (for mirrors and offline
machines); the architecture is read from the file's shapes, not trusted from its name.
Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from flaxcnn.weights import cache, keras_h5, merge, registry
from flaxcnn.weights.errors import WeightsError

EXIT_ERROR = 2
CHECKPOINT_FORMAT = "flaxcnn/1"
DEFAULT_INPUT_SIZE = 224
# Keras's own name for a published file: ``..._kernels_{alpha}_{rows}[_no_top].h5``.
_KERAS_NAME = re.compile(
    r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_[\d.]+_(\d+)(_no_top)?\.h5$"
)


def _abstract_variables(model_config: dict[str, Any]) -> dict[str, Any]:
    """Variable shapes of a model config, without computing anything."""
    # Imported here so that `list` and `fetch` do not pay for JAX start-up.
    import jax
    import jax.numpy as jnp

    from flaxcnn.models import build_model
    from flaxcnn.models.mobilenet_v2 import MIN_INPUT_SIZE

    model = build_model(model_config)
    # Variable shapes do not depend on the input size; the smallest legal one traces fastest.
    image = jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), image)


def infer_model_config(
    loaded: dict[str, Any],
    *,
    alpha: float | None = None,
    include_top: bool | None = None,
    pooling: str | None = "avg",
    source: str = "weights file",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Finds the MobileNetV2 config a converted Keras file fits, and merges the file into it.

    Conv1's channel count alone is ambiguous (alpha 0.35 and 0.5 both give 16), so every
    candidate alpha is checked against all of the file's shapes with the strict merge.

    Args:
      loaded: :func:`flaxcnn.weights.load_keras_h5` output.
      alpha: the width multiplier, or ``None`` to infer it.
      include_top: whether to keep the classifier; ``None``: keep it if the file has one.
        ``False`` on a file with a classifier drops the classifier.
      pooling: pooling of a model without the top (``None``, ``'avg'`` or ``'max'``).
      source: the file's name for error messages.

    Returns:
      ``(model_config, variables)``; ``variables`` hold the file's arrays in the model's
      structure.

    Raises:
      WeightsError: no (or more than one) alpha fits; the message names the first mismatch.
    """
    from flaxcnn.models.mobilenet_v2 import ALPHAS, make_divisible

    params = loaded.get("params", {})
    has_top = "predictions" in params
    include_top = has_top if include_top is None else include_top
    # Dropping a file's classifier is the one asked-for difference; everything else must fit.
    dont_load = [r"params/predictions/.*"] if has_top and not include_top else []
    num_classes = 1000  # unused without the top; the model's (and ImageNet's) default
    if include_top and has_top and "kernel" in params["predictions"]:
        num_classes = int(params["predictions"]["kernel"].shape[-1])

    if alpha is not None:
        candidates = [float(alpha)]
    else:
        conv1 = params.get("Conv1", {}).get("kernel")
        # A cheap necessary condition first, so that usually only one model is traced.
        candidates = [
            a for a in ALPHAS if conv1 is None or make_divisible(32 * a) == conv1.shape[-1]
        ]
        candidates = candidates or list(ALPHAS)

    fits, errors = [], {}
    for candidate in candidates:
        config = {
            "arch": "mobilenet_v2",
            "alpha": candidate,
            "include_top": include_top,
            "num_classes": num_classes,
            "pooling": None if include_top else pooling,
        }
        try:
            variables = merge.merge_variables(
                _abstract_variables(config), loaded, dont_load=dont_load, source=source
            )
        except WeightsError as e:
            errors[candidate] = str(e)
            continue
        fits.append((config, variables))

    if len(fits) == 1:
        return fits[0]
    if fits:  # cannot happen for MobileNetV2's published alphas; refuse rather than guess
        found = ", ".join(str(config["alpha"]) for config, _ in fits)
        raise WeightsError(f"{source} fits MobileNetV2 at several alphas ({found}); pass --alpha")
    if alpha is not None:
        raise WeightsError(f"with --alpha {alpha}: {errors[float(alpha)]}")
    first, message = next(iter(errors.items()))
    raise WeightsError(
        f"no MobileNetV2 with alpha in {ALPHAS} and include_top={include_top} fits; "
        f"tried {', '.join(map(str, candidates))}; with alpha={first}: {message}"
    )


def _default_input_size(path: pathlib.Path) -> int:
    """The resolution a Keras-named file was trained at, else 224."""
    match = _KERAS_NAME.search(path.name)
    return int(match.group(1)) if match else DEFAULT_INPUT_SIZE


def _is_checkpoint(path: pathlib.Path) -> bool:
    return (path / "metadata").is_dir() and (path / "variables").is_dir()


def convert(
    h5_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    alpha: float | None = None,
    include_top: bool | None = None,
    input_size: int | None = None,
    pooling: str | None = "avg",
    overwrite: bool = False,
) -> tuple[pathlib.Path, dict[str, Any]]:
    """Converts a Keras MobileNetV2 ``.h5`` into an Orbax checkpoint at ``out``.

    The checkpoint is written beside ``out`` and renamed into place, so a failed conversion
    never leaves a half checkpoint, nor destroys the one it was to replace.

    Args:
      h5_path: legacy Keras HDF5 weights (``keras.applications`` download or ``save_weights``).
      out: checkpoint folder to create.
      alpha: width multiplier (default: inferred from the file's shapes).
      include_top: keep the classifier (default: when the file has one).
      input_size: image size recorded in the metadata (default: the resolution in a Keras
        file name, else 224); the weights fit any size >= 32.
      pooling: pooling recorded for a model without the top.
      overwrite: replace an existing checkpoint at ``out``.

    Returns:
      ``(out, metadata)``.

    Raises:
      WeightsError: the file is unreadable or fits no MobileNetV2, or ``out`` is in the way.
    """
    from flaxcnn.checkpoints import save_variables
    from flaxcnn.models.mobilenet_v2 import MIN_INPUT_SIZE

    source = pathlib.Path(h5_path).expanduser().resolve()
    out = pathlib.Path(out).expanduser().absolute()
    size = _default_input_size(source) if input_size is None else input_size
    if size < MIN_INPUT_SIZE:
        raise WeightsError(
            f"--input-size {size} is too small; MobileNetV2 needs >= {MIN_INPUT_SIZE}"
        )
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
        loaded, alpha=alpha, include_top=include_top, pooling=pooling, source=str(source)
    )
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model": model_config,
        "image_size": [size, size],
        "preprocessing": "tf",  # every published MobileNetV2 file: RGB scaled to [-1, 1]
        "class_names": None,  # Keras files carry no labels
        "source": str(source),
        "source_sha256": cache.sha256_of(source),
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


def _cmd_list(args: argparse.Namespace) -> int:
    folder = cache.cache_dir(args.cache)
    rows = [("name", "alpha", "size", "top", "cached", "licence", "url")]
    for spec in registry.SPECS:
        cached = "yes" if (folder / spec.filename).is_file() else "no"
        top = "yes" if spec.include_top else "no"
        rows.append(
            (spec.name, str(spec.alpha), str(spec.resolution), top, cached, spec.license, spec.url)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]
        )
    print(f"\ncache: {folder} (set {cache.CACHE_ENV} or pass --cache to change it)")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        spec = registry.find_spec(args.alpha, args.size, include_top=args.include_top)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if spec.resolution != args.size:
        print(
            f"note: no file is published at {args.size}; using {spec.resolution}", file=sys.stderr
        )
    print(cache.fetch(spec, args.cache, url=args.url))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    out, metadata = convert(
        args.file,
        args.out,
        alpha=args.alpha,
        include_top=args.include_top,
        input_size=args.input_size,
        pooling=None if args.pooling == "none" else args.pooling,
        overwrite=args.overwrite,
    )
    model = metadata["model"]
    print(
        f"wrote {out}: mobilenet_v2 alpha={model['alpha']} include_top={model['include_top']} "
        f"num_classes={model['num_classes']} pooling={model['pooling']} "
        f"image_size={metadata['image_size'][0]}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m flaxcnn.weights`` argument parser."""
    parser = _Parser(
        prog="python -m flaxcnn.weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "List, pre-fetch and convert MobileNetV2 ImageNet weight files.\n\n"
            "  python -m flaxcnn.weights list\n"
            "  python -m flaxcnn.weights fetch --alpha 1.0 --size 224 --no-top\n"
            "  python -m flaxcnn.weights convert FILE.h5 OUT\n\n"
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

    cache_help = f"cache folder (default ${cache.CACHE_ENV} or ~/.cache/flaxcnn)"
    list_parser = commands.add_parser(
        "list", help="print the published weight files and whether each is cached"
    )
    list_parser.add_argument("--cache", metavar="DIR", help=cache_help)
    list_parser.set_defaults(run=_cmd_list)

    fetch_parser = commands.add_parser(
        "fetch",
        help="download one published file into the cache (checked; reused when valid)",
        description="Download the file nearest to --alpha/--size into the cache; prints its path.",
    )
    fetch_parser.add_argument("--alpha", type=float, default=1.0, help="width multiplier (1.0)")
    fetch_parser.add_argument(
        "--size", type=int, default=224, help="input size; the nearest published one is used (224)"
    )
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
        help="turn a Keras MobileNetV2 .h5 into a Flax (Orbax) checkpoint",
        description=(
            "Convert a Keras MobileNetV2 .h5 (legacy HDF5 layout) into an Orbax checkpoint "
            "that flaxcnn.checkpoints.restore(OUT) rebuilds. Alpha and include_top are read "
            "from the file's shapes unless given."
        ),
    )
    convert_parser.add_argument("file", metavar="FILE.h5", help="Keras weights file")
    convert_parser.add_argument("out", metavar="OUT", help="checkpoint folder to create")
    convert_parser.add_argument(
        "--alpha", type=float, help="width multiplier (default: inferred from the file)"
    )
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
        "else 224)",
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
