"""The Keras side of ``compare_keras.py``: the TensorFlow tutorial's recipe in a process of its own.

``compare_keras.py`` starts this script once per Keras flavour (``keras3``: ``import keras``
with ``KERAS_BACKEND=tensorflow``; ``tf_keras``), with a clean environment and never from a
process that ran JAX. It imports neither jax nor flaxcnn: TensorFlow's ``tf.lite`` tries an
optional ``from jax import jit`` at import, which is refused here as in a TensorFlow-only
install, so that no XLA:CPU runtime, thread pool or malloc setting of flaxcnn's is present.
TensorFlow keeps its own defaults (oneDNN, one intra-op and one inter-op thread per core);
only its start-up log lines are silenced.

The model is the recipe's: ``keras.applications.<Name>(include_top=False)`` (its own
preprocessing layers, if any, are part of it), ``preprocess_input``, optionally
``RandomFlip('horizontal')`` + ``RandomRotation(0.2)`` in front, GlobalAveragePooling,
Dropout(0.2), Dense(1), the base called with ``training=False``. Fine-tuning freezes
``base.layers[:index]``, ``index`` being the position of the layer that flaxcnn's contract
resolves ``--fine-tune-at`` to, as the tutorial freezes ``base_model.layers[:100]``.

    python keras_side.py --flavour keras3 --out rows.jsonl --application MobileNetV2 \\
        --image-size 160 --batch-size 32 --fine-tune-layer block_11_depthwise steps
    python keras_side.py --flavour tf_keras --out rows.jsonl ... full --data DIR

Rows are appended to ``--out`` as JSON lines; errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import process_report

REFUSED = ("jax", "jaxlib", "flax", "flaxcnn")
PHASES = ("inference", "head", "finetune")
LEARNING_RATES = {"head": 1e-4, "finetune": 1e-5}  # the tutorial's (Adam; RMSprop optional)


class _RefuseImports(importlib.abc.MetaPathFinder):
    """Makes ``REFUSED`` packages unimportable here; records who asked."""

    def __init__(self) -> None:
        self.refused: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in REFUSED:
            self.refused.add(name)
            raise ModuleNotFoundError(f"{name} is kept out of the Keras process", name=name)
        return None


class SideError(Exception):
    """A problem with what this side was asked to do: one line, exit 2."""


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Sends fd 2 to a temporary file while TensorFlow loads (its C++ start-up lines ignore
    ``TF_CPP_MIN_LOG_LEVEL``); shows them only if loading fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def import_keras(flavour: str) -> tuple[Any, Any]:
    """``(keras, tensorflow)`` of the flavour, GPUs hidden (this is a CPU comparison)."""
    if flavour == "keras3" and os.environ.get("KERAS_BACKEND") != "tensorflow":
        raise SideError("the keras3 side needs KERAS_BACKEND=tensorflow in its environment")
    with _quiet_fd2():
        import tensorflow as tf

        if flavour == "keras3":
            import keras
        else:
            import tf_keras as keras
        tf.config.set_visible_devices([], "GPU")
        tf.constant(0.0).numpy()  # initialises the runtime (cuInit, oneDNN) while quiet
    return keras, tf


def recipe_model(keras: Any, args: argparse.Namespace, augment: bool) -> tuple[Any, Any]:
    """The recipe's classifier and its base (see the module docstring)."""
    application = getattr(keras.applications, args.application, None)
    if application is None:
        raise SideError(f"this Keras has no application {args.application!r}")
    size = (args.image_size, args.image_size, 3)
    base = application(input_shape=size, include_top=False, weights=args.weights,
                       **args.options)  # fmt: skip
    preprocess_input = sys.modules[application.__module__].preprocess_input
    inputs = keras.Input(size)
    x = inputs
    if augment:
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomRotation(0.2)(x)
    x = preprocess_input(x)
    x = base(x, training=False)  # BatchNorm in inference mode in both phases
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1 if args.num_classes == 2 else args.num_classes)(x)
    return keras.Model(inputs, outputs), base


def set_phase(base: Any, phase: str, fine_tune_layer: str) -> int | None:
    """Freezes as the tutorial does; returns the index of the first trainable base layer."""
    base.trainable = phase == "finetune"
    if phase != "finetune":
        return None
    names = [layer.name for layer in base.layers]
    if fine_tune_layer not in names:  # Keras 3 forbids '/' in names: tf_keras's 'a/b' is 'a_b'
        fine_tune_layer = fine_tune_layer.replace("/", "_")
    if fine_tune_layer not in names:
        raise SideError(f"{fine_tune_layer!r} is not a layer of this Keras's {base.name} "
                        f"(its layers: {names[1]} ... {names[-1]})")  # fmt: skip
    index = names.index(fine_tune_layer)
    for layer in base.layers[:index]:
        layer.trainable = False
    return index


def compile_recipe(keras: Any, model: Any, phase: str, args: argparse.Namespace) -> None:
    rate = LEARNING_RATES.get(phase, LEARNING_RATES["head"])
    if phase == "finetune" and args.finetune_optimizer == "rmsprop":
        optimizer = keras.optimizers.RMSprop(rate)
    else:
        optimizer = keras.optimizers.Adam(rate)
    if args.num_classes == 2:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        accuracy = keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    extra = {"jit_compile": True} if args.jit_compile else {}
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy], **extra)


def parameter_count(weights: list) -> int:
    return sum(int(np.prod(tuple(w.shape))) for w in weights)


def step_function(model: Any, tf: Any, images: Any, labels: Any, train: bool) -> Callable:
    """One step as ``fit`` (``evaluate``) runs it: the model's ``train_function``
    (``test_function``) on an iterator, here over the fixed batch repeated.

    Not ``train_on_batch``: tf_keras's builds a one-batch tf.data iterator on every call,
    milliseconds of Python and tf.data work per step that ``fit`` does not do (and more on a
    busy machine).
    """
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    if train:
        model.make_train_function()  # Keras 3 sets the attribute and returns None
        function = model.train_function
    else:
        model.make_test_function()
        function = model.test_function
    return lambda: tf.nest.flatten(function(iterator))[0].numpy()  # host value: step done


def time_calls(call: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """Milliseconds of ``steps`` calls after ``warmup`` (each returns a host value: done)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_case(keras: Any, tf: Any, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Builds the recipe for one case and times its step on a fixed batch."""
    phase, _, extra = case.partition("+")
    if phase not in PHASES or extra not in ("", "augment") or case == "inference+augment":
        raise SideError(f"unknown case {case!r}")
    keras.backend.clear_session()
    start = time.perf_counter()
    model, base = recipe_model(keras, args, augment=extra == "augment")
    index = set_phase(base, phase, args.fine_tune_layer)
    compile_recipe(keras, model, phase, args)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = tf.constant(rng.uniform(0, 255, shape).astype(np.float32))  # pixels, as loaded
    labels = tf.constant(rng.integers(0, 2, (args.batch_size, 1)).astype(np.float32))
    build_s = time.perf_counter() - start
    call = step_function(model, tf, images, labels, train=phase != "inference")
    start = time.perf_counter()
    call()  # traces and optimises the tf.function
    first_s = time.perf_counter() - start
    times = time_calls(call, args.warmup, args.steps)
    row = {"kind": "step", "case": case, "ms": times, "ms_median": statistics.median(times),
           "ms_min": min(times), "first_call_s": first_s, "build_s": build_s,
           "trainable_backbone_params": parameter_count(base.trainable_weights),
           "fine_tune_index": index,
           "fine_tune_layer": None if index is None else base.layers[index].name,
           "jit_compile": bool(getattr(model, "jit_compile", False))}  # what Keras used
    del model, base
    return row


def full_run(keras: Any, tf: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The tutorial end to end: 'head' then 'finetune' epochs of ``model.fit``."""
    start = time.perf_counter()
    folders = {split: os.path.join(args.data, split) for split in ("train", "validation")}
    for split, folder in folders.items():
        if not os.path.isdir(folder):
            raise SideError(f"no {split} folder {folder}: --data needs train/ and validation/")
    classes = sorted(e.name for e in os.scandir(folders["train"]) if e.is_dir())
    args = argparse.Namespace(**{**vars(args), "num_classes": len(classes)})
    label_mode = "binary" if args.num_classes == 2 else "int"
    load = lambda split, shuffle: keras.utils.image_dataset_from_directory(
        folders[split], image_size=(args.image_size,) * 2, batch_size=args.batch_size,
        shuffle=shuffle, seed=args.seed, label_mode=label_mode,
    ).prefetch(tf.data.AUTOTUNE)  # fmt: skip
    train, validation = load("train", True), load("validation", False)
    keras.utils.set_random_seed(args.seed)
    model, base = recipe_model(keras, args, augment=True)
    setup_s = time.perf_counter() - start
    accuracies, phase_s, epoch = [], {}, 0
    for phase, epochs in (("head", args.head_epochs), ("finetune", args.finetune_epochs)):
        phase_start = time.perf_counter()
        index = set_phase(base, phase, args.fine_tune_layer)  # the last phase's: finetune
        compile_recipe(keras, model, phase, args)
        history = model.fit(train, epochs=epoch + epochs, initial_epoch=epoch,
                            validation_data=validation, verbose=2)  # fmt: skip
        accuracies += [float(a) for a in history.history["val_accuracy"]]
        epoch += epochs
        phase_s[phase] = time.perf_counter() - phase_start
    head = args.head_epochs
    return {"kind": "full", "val_accuracy": accuracies,
            "val_accuracy_after_head": accuracies[head - 1] if head else None,
            "final_val_accuracy": accuracies[-1], "best_val_accuracy": max(accuracies),
            "setup_s": setup_s, "head_s": phase_s["head"], "finetune_s": phase_s["finetune"],
            "fine_tune_index": index, "image_size": args.image_size,
            "batch_size": args.batch_size}  # fmt: skip


def _options(text: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", required=True, choices=("keras3", "tf_keras"))
    parser.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--application", required=True, help="Keras's name, e.g. MobileNetV2")
    parser.add_argument("--options", type=_options, default={}, help="JSON: Keras kwargs")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fine-tune-layer", required=True, help="first trainable base layer")
    parser.add_argument("--weights", default="none", help="a .h5 file of the base, or none")
    parser.add_argument("--num-classes", type=int, default=2, help="steps (full: the folder's)")
    parser.add_argument("--finetune-optimizer", choices=("adam", "rmsprop"), default="adam")
    parser.add_argument("--jit-compile", action="store_true",
                        help="XLA inside TensorFlow (Keras's default on a CPU is off)")
    modes = parser.add_subparsers(dest="mode", required=True)
    steps = modes.add_parser("steps", help="time the recipe's steps on a fixed batch")
    steps.add_argument("--cases", default="inference,head,head+augment,finetune,finetune+augment")
    steps.add_argument("--warmup", type=int, default=3)
    steps.add_argument("--steps", type=int, default=20)
    full = modes.add_parser("full", help="train the recipe end to end")
    full.add_argument("--data", required=True, help="a folder with train/ and validation/")
    full.add_argument("--head-epochs", type=int, default=10)
    full.add_argument("--finetune-epochs", type=int, default=10)
    full.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.weights = None if args.weights.lower() == "none" else os.path.abspath(args.weights)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise SideError(f"no weights file {args.weights}: pass --weights PATH or none")
    return args


def main(argv: list[str] | None = None) -> int:
    refuse = _RefuseImports()
    sys.meta_path.insert(0, refuse)
    prog = "keras_side.py"
    try:
        args = parse_args(argv)
        start = process_report.describe_process(args.flavour, REFUSED)
        keras, tf = import_keras(args.flavour)
        common = {"side": args.flavour, "round": args.round, "pid": os.getpid(),
                  "model": args.application, "image_size": args.image_size,
                  "batch_size": args.batch_size}  # fmt: skip
        rows = []
        if args.mode == "steps":
            for case in [c for c in args.cases.split(",") if c]:
                row = {**common, **time_case(keras, tf, case, args)}
                print(f"{prog} {args.flavour}: {case} median {row['ms_median']:.1f} ms, "
                      f"min {row['ms_min']:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
                rows.append(row)
                process_report.append_row(args.out, row)
        else:
            rows.append({**common, **full_run(keras, tf, args)})
            process_report.append_row(args.out, rows[-1])
    except SideError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    facts = process_report.describe_process(args.flavour, REFUSED)
    facts.update(kind="process", round=args.round, started=start["time"],
                 settings=start["settings"],  # as started (TensorFlow adds its own)
                 load_average_start=start["load_average"],
                 refused_imports=sorted(refuse.refused), keras_version=keras.__version__,
                 tensorflow_version=tf.__version__,
                 tf_intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
                 tf_inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
                 jit_compile=args.jit_compile)  # fmt: skip
    process_report.append_row(args.out, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
