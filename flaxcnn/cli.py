"""Shared command-line plumbing: TrainConfig flags, logging, errors as one line, workdirs.

The experiment entry points (``flaxcnn.experiments.transfer``, ``.simple_cnn``) only choose
defaults and which flags to show; everything a run does lives in ``flaxcnn.run.fit``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import pathlib
import platform
import shutil
import sys
from collections.abc import Mapping, Sequence

from flaxcnn import checkpoints, data, metrics
from flaxcnn import config as config_lib
from flaxcnn.weights import WeightsError

log = logging.getLogger("flaxcnn")

HELP = {
    "data": "TFDS dataset name (e.g. cats_vs_dogs, cifar10) or a class-per-folder image "
    "directory with train/<class>/*, validation/<class>/* and optionally test/<class>/*",
    "data_dir": "TFDS data directory (for manually downloaded/prepared datasets)",
    "download": "allow downloads of TFDS data and weights (--no-download: offline, never "
    "touch the network)",
    "image_size": "square input size in pixels (default: the resolution the model's weights "
    "were trained at)",
    "batch_size": "global batch size (divided over all devices)",
    "augment": "random flip + rotation (+-72 deg) on training images",
    "validation_fraction": "fraction of train carved off (seeded, stratified) when the "
    "dataset has no validation split",
    "model": "the model: a registered backbone (or Keras's name for it, e.g. ResNet50) or a "
    "model trained from scratch",
    "weights": "'imagenet' (honours $FLAXCNN_WEIGHTS and the cache $FLAXCNN_CACHE), a Keras "
    ".h5 path, or 'none' for random init",
    "dropout_rate": "dropout before the classifier",
    "dtype": "computation dtype; params, optimizer state and BatchNorm statistics stay float32",
    "conv_impl": "convolution formulation (auto: fastest for the backend; results identical)",
    "head_epochs": "epochs of phase 1 (feature extraction: frozen backbone); default: 50 "
    "on cached features (nearly free), 10 otherwise",
    "head_learning_rate": "peak AdamW learning rate of phase 1",
    "feature_cache": "phase 1 on cached backbone features (auto: on; the head phase then "
    "trains without augmentation), and fine-tuning's validation on cached activations of the "
    "frozen layers (auto: when they fit in 2 GiB); off: neither",
    "early_stopping_patience": "stop a phase after this many epochs without validation "
    "accuracy improvement (0: off)",
    "finetune_epochs": "epochs of phase 2 (fine-tuning); numbering continues from phase 1",
    "finetune_learning_rate": "peak AdamW learning rate of phase 2 (the unfrozen backbone)",
    "finetune_head_learning_rate": "peak AdamW learning rate of the head in phase 2 (the "
    "backbone's is --finetune-learning-rate)",
    "lr_schedule": "learning rate over each phase: cosine decay from the phase's rate to 0, "
    "or constant (the Keras tutorial)",
    "fine_tune_at": "first trainable backbone layer in phase 2: a Keras layer index (as the "
    "TensorFlow tutorial's 100) or a layer/block name (default: the model's, e.g. "
    "MobileNetV2's 100)",
    "weight_decay": "decoupled weight decay on trainable kernels (AdamW); frozen leaves "
    "stay bit-identical",
    "seed": "seed of initialisation, data order, augmentation and dropout",
    "keep_checkpoints": "resumable checkpoints kept (the best one is kept separately)",
    "checkpoint_every_seconds": "save at the end of an epoch only if this long has passed "
    "since the last save (always at a phase's end and on SIGTERM/SIGINT; the best epoch is "
    "held in memory until then); 0: every epoch",
    "log_every": "steps between progress-bar metric updates",
}
USER_ERRORS = (
    config_lib.ConfigError, data.DataError, WeightsError, checkpoints.CheckpointError,
    metrics.NonFiniteLossError, OSError,
)  # fmt: skip


def add_model_flags(parser: argparse.ArgumentParser, *, inferred: bool = False) -> None:
    """One flag per family option of the registered models (``--alpha``, ...), default unset.

    Args:
      parser: the parser to add them to.
      inferred: the default is inferred (from a weights file) rather than the model's own.
    """
    from flaxcnn import models

    by_option: dict[str, list] = {}
    for backbone in models.BACKBONES.values():
        for key, allowed in backbone.options.items():
            by_option.setdefault(key, []).append((backbone.name, allowed))
    for key, owners in by_option.items():
        default = "inferred from the file" if inferred else "the model's"
        allowed = "; ".join(f"{name}: {', '.join(map(str, values))}" for name, values in owners)
        help_text = f"family option ({allowed}; default: {default}, the first listed)"
        flag = "--" + key.replace("_", "-")
        kind = type(owners[0][1][0])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)  # fmt: skip
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=key.upper(),
                                help=help_text)  # fmt: skip


def model_options(args: argparse.Namespace) -> dict:
    """The family options given on the command line (see :func:`add_model_flags`)."""
    from flaxcnn import models

    keys = {key for backbone in models.BACKBONES.values() for key in backbone.options}
    return {k: getattr(args, k) for k in sorted(keys) if getattr(args, k, None) is not None}


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (exit 2); shared by every flaxcnn CLI."""

    def error(self, message: str) -> None:  # argparse prints usage + message; we print one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str, description: str, defaults: config_lib.TrainConfig,
                 flags: Sequence[str], help_texts: Mapping[str, str] | None = None,
                 ) -> argparse.ArgumentParser:  # fmt: skip
    """A parser with one flag per named TrainConfig field, plus the run-control flags;
    ``help_texts`` replaces ``HELP``'s text of a flag where an entry point means it otherwise."""
    help_of = {**HELP, **(help_texts or {})}
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(config_lib.TrainConfig)}
    choices = {"dtype": config_lib.DTYPES, "feature_cache": config_lib.FEATURE_CACHE,
               "lr_schedule": config_lib.LR_SCHEDULES}  # fmt: skip
    for name in flags:
        if name == "model_options":
            add_model_flags(parser)
            continue
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_of[name])  # fmt: skip
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(fields[name].type), str)
        if name == "model":
            parser.add_argument(flag, default=default, metavar="NAME", help=help_of[name] + ": " +
                                ", ".join(config_lib.model_names()))  # fmt: skip
            continue
        parser.add_argument(flag, type=kind, default=default, help=help_of[name],
                            choices=choices.get(name), metavar=None if name in choices else
                            name.upper())  # fmt: skip
    parser.add_argument("--workdir", default=None,
                        help="output folder (default: checkpoints/<data name>_<model>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --workdir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing non-empty --workdir first")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="disable JAX's persistent compilation cache")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc as it is (by default one arena, large blocks "
                        "kept mapped: XLA:CPU steps ~10%% faster)")
    parser.add_argument("--distributed", action="store_true",
                        help="initialise JAX's distributed runtime (multi-host): settings come "
                        "from "
                        "the detected cluster (SLURM, TPU, MPI, Kubernetes) or from "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; see "
                        "docs/scaling.md")
    return parser


RUN_MARKERS = ("config.json", checkpoints.LATEST_DIR, checkpoints.BEST_DIR, "metrics.json")


def _prepare_workdir(path: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise config_lib.ConfigError(f"--workdir {path} is a file; pass a folder")
    if path.exists() and any(path.iterdir()) and not resume:
        if not any((path / name).exists() for name in RUN_MARKERS):
            raise config_lib.ConfigError(  # --overwrite deletes runs only, never other files
                f"--workdir {path} is not empty and holds no run (no {', '.join(RUN_MARKERS)});"
                " pass an empty or new --workdir")
        if not overwrite:
            raise config_lib.ConfigError(
                f"--workdir {path} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or another --workdir")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise config_lib.ConfigError(
            f"--workdir {path} is not writable ({e.strerror}); pass a writable folder") from None


def tune_glibc_malloc() -> bool:
    """Makes glibc keep XLA:CPU's per-execution scratch memory mapped between steps.

    XLA:CPU allocates an execution's temporaries (160 MB for MobileNetV2 inference at batch
    32, 160x160) with ``posix_memalign`` from a worker thread. glibc serves such sizes from
    a thread arena only through a fresh ``mmap`` and unmaps them on ``free``, so every step
    page-faults its whole scratch space in again (~40k faults, ~15% of an inference step on
    a 2-core CPU). One arena, no mmap for large blocks and no trimming let the memory be
    reused: MobileNetV2 steps run ~10% faster, and the head phase's feature-caching pass took
    32 s instead of 55 s on the shared data (experiments/benchmarks/cpu-2core.md). Call it
    before JAX starts its threads (before the first computation); it is process-wide, so it
    belongs in entry points (this CLI, ``flaxcnn.bench``), not in the library.

    Returns:
      Whether the settings were applied (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
    return all(mallopt(option, value) == 1 for option, value in settings)


def _enable_compilation_cache() -> None:
    import jax

    from flaxcnn.weights import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: Sequence[str] | None, *, prog: str, description: str,
         defaults: config_lib.TrainConfig, flags: Sequence[str],
         help_texts: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """Parses flags, runs ``fit`` and turns every user-facing failure into one line."""
    args = build_parser(prog, description, defaults, flags, help_texts).parse_args(argv)
    if not args.no_malloc_tuning:
        tune_glibc_malloc()  # first: before anything starts JAX's threads
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False  # TensorFlow/absl install root handlers of their own
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    values = {name: getattr(args, name) for name in flags if name != "model_options"}
    if "model_options" in flags:
        values["model_options"] = model_options(args)
    if "weights" in values and str(values["weights"]).lower() == "none":
        values["weights"] = None
    try:
        config = defaults.replace(**values).resolved()
        default_name = f"{pathlib.Path(config.data).name or 'data'}_{config.model}"
        workdir = pathlib.Path(args.workdir or pathlib.Path("checkpoints") / default_name)
        workdir = workdir.expanduser().resolve()
        if args.distributed:
            from flaxcnn import sharding

            sharding.initialize_distributed()
        weights = config.weights
        if weights not in (None, "imagenet") and not pathlib.Path(weights).expanduser().is_file():
            raise config_lib.ConfigError(
                f"--weights {weights!r}: no such file; allowed: imagenet, none, or a Keras "
                ".h5 file")
        _prepare_workdir(workdir, resume=args.resume, overwrite=args.overwrite)
        if not args.no_compilation_cache:
            _enable_compilation_cache()
        from flaxcnn.run import Interrupted, fit

        try:
            summary = fit(config, workdir, resume=args.resume).summary
        except Interrupted as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 130
    except KeyboardInterrupt:  # Ctrl-C outside fit's training loop (start-up, final evaluation)
        print(f"{prog}: interrupted outside the training loop; checkpoints saved so far are "
              "complete: add --resume to continue", file=sys.stderr)  # fmt: skip
        return 130
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if not isinstance(e, metrics.NonFiniteLossError) else 3
    print(f"best validation accuracy {summary['best_val_accuracy']:.4f}; results in {workdir}")
    return 0


