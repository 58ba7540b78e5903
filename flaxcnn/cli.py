"""Shared command-line plumbing: TrainConfig flags, logging, errors as one line, workdirs.

The experiment entry points (``flaxcnn.experiments.transfer``, ``.simple_cnn``) only choose
defaults and which flags to show; everything a run does lives in ``flaxcnn.run.fit``. This
module imports nothing heavy at the top: :func:`main` installs the SIGINT/SIGTERM handlers
before JAX or TensorFlow start (``flaxcnn.interrupts``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import pathlib
import platform
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from flaxcnn import interrupts

if TYPE_CHECKING:
    from flaxcnn.config import TrainConfig

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
    "model": "the model: a registered backbone (or Keras's application name for it) or a "
    "model trained from scratch",
    "weights": "'imagenet' (honours $FLAXCNN_WEIGHTS and the cache $FLAXCNN_CACHE), a Keras "
    ".h5 path, or 'none' for random init",
    "dropout_rate": "dropout before the classifier",
    "dtype": "computation dtype; params, optimizer state and BatchNorm statistics stay float32",
    "conv_impl": "convolution formulation (auto: fastest for the backend; results identical)",
    "head_epochs": "epochs of phase 1 (feature extraction: frozen backbone); default: 50 "
    "on cached features (nearly free), 10 otherwise",
    "head_learning_rate": "peak AdamW learning rate of phase 1 (default: picked with "
    "--weight-decay by the head phase itself, from a grid trained at once on the cached "
    "features by lowest validation loss; 1e-2 where the head trains on images)",
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
    "TensorFlow tutorial's 100) or a layer/block name (default: the model's own)",
    "weight_decay": "decoupled weight decay on trainable kernels (AdamW) in phase 1, and in "
    "phase 2 unless --finetune-weight-decay is given (default: picked with "
    "--head-learning-rate for phase 1, 0.1 for phase 2); frozen leaves stay bit-identical",
    "finetune_weight_decay": "weight decay of phase 2 (default: --weight-decay if given, "
    "else 0.1)",
    "tta": "test-time augmentation of validation, test and predict (checkpoints record it): "
    "flip averages the logits of each image and its mirror",
    "class_weight": "weigh the training loss by class; balanced: n / (classes x count) per "
    "class, as Keras's and scikit-learn's (for folders with skewed class counts)",
    "seed": "seed of initialisation, data order, augmentation and dropout",
    "keep_checkpoints": "resumable checkpoints kept (the best one is kept separately)",
    "checkpoint_every_seconds": "save at the end of an epoch only if this long has passed "
    "since the last save (always at a phase's end and on SIGTERM/SIGINT; the best epoch is "
    "held in memory until then); 0: every epoch",
    "log_every": "steps between progress-bar metric updates",
}


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix: one line, exit 2 (3 for a NaN loss)."""
    from flaxcnn import checkpoints, data, metrics
    from flaxcnn.config import ConfigError
    from flaxcnn.weights import WeightsError

    return (ConfigError, data.DataError, WeightsError, checkpoints.CheckpointError,
            metrics.NonFiniteLossError, OSError)  # fmt: skip


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


class DefaultsOnceHelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default once: appended unless the help text already states it
    (``BooleanOptionalAction`` appends its own), and never an unset (``None``) default or
    a plain switch's ``False``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False  # (not 0: a real default)
        unset = unset or action.default == argparse.SUPPRESS or not action.option_strings
        if unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser(prog: str, description: str, defaults: TrainConfig,
                 flags: Sequence[str], help_texts: Mapping[str, str] | None = None,
                 ) -> argparse.ArgumentParser:  # fmt: skip
    """A parser with one flag per named TrainConfig field, plus the run-control flags;
    ``help_texts`` replaces ``HELP``'s text of a flag where an entry point means it otherwise."""
    from flaxcnn import config as config_lib
    from flaxcnn.models import CONV_IMPLS

    help_of = {**HELP, **(help_texts or {})}
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=DefaultsOnceHelpFormatter)  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(config_lib.TrainConfig)}
    choices = {"dtype": config_lib.DTYPES, "feature_cache": config_lib.FEATURE_CACHE,
               "lr_schedule": config_lib.LR_SCHEDULES, "conv_impl": CONV_IMPLS,
               "tta": config_lib.TTA_MODES, "class_weight": config_lib.CLASS_WEIGHTS}  # fmt: skip
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
        annotation = str(fields[name].type).removesuffix(" | None")  # None: "the model's"
        kind = {"int": int, "float": float}.get(annotation, str)
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
                        help="continue the run in --workdir from its latest checkpoint (or "
                        "extend its last phase: pass more epochs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --workdir (deleted once the new run's data, "
                        "weights and flags have been checked)")
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


def _check_workdir(path: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a --workdir that the flags do not fit, before any data is read; writes nothing
    (``fit`` creates the folder, and deletes a run that ``--overwrite`` replaces, only once
    everything that can reject the run has passed)."""
    from flaxcnn.config import ConfigError
    from flaxcnn.run import RUN_MARKERS, holds_run

    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file; pass a folder")
    if resume and not holds_run(path):
        raise ConfigError(f"--resume: --workdir {path} holds no run to continue (no "
                          f"{', '.join(RUN_MARKERS)}); pass the --workdir of the run, or leave "
                          "out --resume to start a new one")  # fmt: skip
    if not resume and path.exists() and any(path.iterdir()):
        if not holds_run(path):
            raise ConfigError(  # --overwrite deletes runs only, never other files
                f"--workdir {path} is not empty and holds no run (no {', '.join(RUN_MARKERS)});"
                " pass an empty or new --workdir")
        if not overwrite:
            raise ConfigError(
                f"--workdir {path} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or another --workdir")
    _check_writable(path)


def _check_writable(path: pathlib.Path) -> None:
    """Creates ``path`` (and a file in it) as ``fit`` will, then removes what it created."""
    from flaxcnn.config import ConfigError

    created = []  # deepest first
    try:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            created.insert(0, folder)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--workdir {path} is not writable ({e.strerror}); pass a writable folder") from None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


def tune_glibc_malloc() -> bool:
    """Makes glibc keep XLA:CPU's per-execution scratch memory mapped between steps.

    XLA:CPU allocates an execution's temporaries (160 MB for the default model's inference at
    batch 32, 160x160) with ``posix_memalign`` from a worker thread. glibc serves such sizes from
    a thread arena only through a fresh ``mmap`` and unmaps them on ``free``, so every step
    page-faults its whole scratch space in again (~40k faults, ~15% of an inference step on
    a 2-core CPU). One arena, no mmap for large blocks and no trimming let the memory be
    reused: the default model's steps run ~10% faster, and the head phase's feature-caching pass
    took 32 s instead of 55 s on the shared data (experiments/benchmarks/cpu-2core.md). Call it
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
         defaults: TrainConfig | None = None, flags: Sequence[str],
         help_texts: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """Parses flags, runs ``fit`` and turns every user-facing failure into one line.

    Args:
      argv: the flags (``None``: ``sys.argv[1:]``).
      prog: the command, for messages and the run record.
      description: the ``--help`` text.
      defaults: the entry point's TrainConfig (``None``: the transfer recipe, imported only
        once the signal handlers are in place).
      flags: the TrainConfig fields shown as flags.
      help_texts: help texts replacing ``HELP``'s.

    Returns:
      The exit status: 0 done, 2 bad input, 3 NaN/Inf loss, 130 stopped by SIGINT/SIGTERM.
    """
    signals = interrupts.StopSignals()
    signals.install()  # first: a signal at any later moment is caught and reported
    scoped = contextlib.ExitStack()
    argv = list(sys.argv[1:] if argv is None else argv)
    finished = None  # the workdir, once fit has returned
    try:
        if defaults is None:
            from flaxcnn.config import TrainConfig

            defaults = TrainConfig()
        args = build_parser(prog, description, defaults, flags, help_texts).parse_args(argv)
        if not args.no_malloc_tuning:
            tune_glibc_malloc()  # before anything starts JAX's threads
        scoped.enter_context(_logging_to_stderr())
        user_errors = _user_errors()
        from flaxcnn import metrics
        from flaxcnn.run import Interrupted, fit

        signals.check()  # one that the imports swallowed (JAX's GC callback, a bare except)

        try:
            config, workdir = _config_and_workdir(args, defaults, flags)
            _check_workdir(workdir, resume=args.resume, overwrite=args.overwrite)
            if not args.no_compilation_cache:
                _enable_compilation_cache()
            summary = fit(config, workdir, resume=args.resume, overwrite=args.overwrite,
                          command=shlex.join([*prog.split(), *argv]),
                          signals=signals).summary  # fmt: skip
        except Interrupted as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 130
        except user_errors as e:
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 3 if isinstance(e, metrics.NonFiniteLossError) else 2
        finished = workdir
        signals.check()  # one swallowed by a GC callback after fit's last check
        print(f"{summary_line(summary)}; results in {workdir}")
        return 0
    except KeyboardInterrupt:  # outside fit: before it started, or as the last line printed
        signum = signals.first or int(signal.SIGINT)
        if finished is None:
            print(f"{prog}: stopped by signal {signum} during start-up, before anything was "
                  "written; run the same command again", file=sys.stderr)  # fmt: skip
        else:
            print(f"{prog}: stopped by signal {signum} as the run finished; its results are "
                  f"complete in {finished}", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        scoped.close()
        signals.uninstall()


def summary_line(summary: Mapping) -> str:
    """The run's result in one line: best validation accuracy, and the test accuracy of the
    best checkpoint (what ``checkpoints.restore`` loads) and of the last state."""
    line = f"best validation accuracy {summary['best_val_accuracy']:.4f}"
    if "test_best" in summary:
        best = summary["test_best"]
        line += (f"; test accuracy {best['accuracy']:.4f} (best checkpoint, epoch "
                 f"{best['epoch']}), {summary['test']['accuracy']:.4f} (last state)")  # fmt: skip
    return line


@contextlib.contextmanager
def _logging_to_stderr():
    """The run's progress lines on stderr, for this call only: afterwards the caller's logging
    configuration (a notebook's, a test's, another ``main``'s) is as it was."""
    quiet = ("absl", "jax._src", "orbax", "tensorflow")
    saved = log.handlers[:], log.level, log.propagate, [logging.getLogger(n).level for n in quiet]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False  # TensorFlow/absl install root handlers of their own
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.handlers[:], log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])
        for name, level in zip(quiet, saved[3], strict=True):
            logging.getLogger(name).setLevel(level)


def _config_and_workdir(args: argparse.Namespace, defaults: TrainConfig,
                        flags: Sequence[str]) -> tuple[TrainConfig, pathlib.Path]:  # fmt: skip
    from flaxcnn.config import ConfigError

    values = {name: getattr(args, name) for name in flags if name != "model_options"}
    if "model_options" in flags:
        values["model_options"] = model_options(args)
    if "weights" in values and str(values["weights"]).lower() == "none":
        values["weights"] = None
    config = defaults.replace(**values).resolved()
    default_name = f"{pathlib.Path(config.data).name or 'data'}_{config.model}"
    workdir = pathlib.Path(args.workdir or pathlib.Path("checkpoints") / default_name)
    workdir = workdir.expanduser().resolve()
    if args.distributed:
        from flaxcnn import sharding

        sharding.initialize_distributed()
    weights = config.weights
    if weights not in (None, "imagenet") and not pathlib.Path(weights).expanduser().is_file():
        raise ConfigError(f"--weights {weights!r}: no such file; allowed: imagenet, none, or a "
                          "Keras .h5 file")  # fmt: skip
    return config.replace(workdir=str(workdir)), workdir
