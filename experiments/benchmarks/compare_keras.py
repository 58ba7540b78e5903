"""flaxcnn's train steps against the seed's Keras recipe (tf_keras on TensorFlow), one process.

Step level (default): builds the Keras recipe model (MobileNetV2 base with the shared ImageNet
weights, flip + RandomRotation(0.2) inside the model, GlobalAveragePooling, Dropout 0.2,
Dense(1); Adam 1e-4 for the head phase, 1e-5 from layer 100 for fine-tuning) and flaxcnn's
product steps (``flaxcnn.bench.build_step``), then times them in interleaved rounds so that
both see the same machine load. Prints img/s side by side and the ratios.

    python experiments/benchmarks/compare_keras.py --weights PATH.h5
    python experiments/benchmarks/compare_keras.py --full   # + both whole two-phase runs

``--full`` also trains the Keras recipe end to end (10 + 10 epochs on
``image_dataset_from_directory(DATA/{train,validation})``, batch 32, 160x160) and runs
``python -m flaxcnn.experiments.transfer --data DATA --no-download --workdir ... --overwrite``
as a subprocess, and prints both wall clocks and final validation accuracies.

Both frameworks use every usable core (TensorFlow's intra-op pool is set to the core count,
XLA:CPU's is by default); they never run at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from flaxcnn import bench, cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (lazily)


WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DEFAULT_WEIGHTS = os.path.join("..", "shared", "weights", WEIGHTS_FILE)
FINE_TUNE_AT = 100


def _tf(threads: int):
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return tf


def keras_model(weights: str, size: int, augment_in_model: bool = True):
    """The recipe's model; returns ``(model, base)``."""
    import tf_keras as keras

    base = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights=weights
    )
    augment = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)]
    )
    inputs = keras.Input((size, size, 3))
    x = augment(inputs) if augment_in_model else inputs
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base(x, training=False)  # BatchNorm in inference mode in both phases
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x)), base


def compile_phase(model, base, phase: str, optimizer: str = "adam") -> None:
    """Freezes as the recipe's phase does and compiles (Adam 1e-4 head, 1e-5 fine-tuning)."""
    import tf_keras as keras

    base.trainable = phase == "finetune"
    if phase == "finetune":
        for layer in base.layers[:FINE_TUNE_AT]:
            layer.trainable = False
    learning_rate = 1e-4 if phase == "head" else 1e-5
    opt = (
        keras.optimizers.RMSprop(learning_rate)
        if optimizer == "rmsprop"
        else keras.optimizers.Adam(learning_rate)
    )
    model.compile(
        optimizer=opt,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )


def keras_step(
    weights: str, phase: str, batch_size: int, size: int, augment_in_model: bool = True
) -> bench.Step:
    """One compiled Keras train step (``train_on_batch``) on a fixed synthetic batch."""
    tf = _tf(len(os.sched_getaffinity(0)))
    model, base = keras_model(weights, size, augment_in_model)
    compile_phase(model, base, phase)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 2, (batch_size, 1)).astype(np.float32))
    start = time.perf_counter()
    model.train_on_batch(images, labels)  # traces and optimises the tf.function
    compile_s = time.perf_counter() - start
    return bench.Step(lambda: model.train_on_batch(images, labels), compile_s)


def interleaved(steps: dict[str, bench.Step], rounds: int, per_round: int) -> dict[str, list]:
    """Per-step milliseconds, the cases taking turns so that all see the same load (a run of
    several steps, such as a scanned cached-feature epoch, counts as that many)."""
    import jax

    for step in steps.values():
        jax.block_until_ready(step.run())
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(step.run())  # Keras returns host values: already done
                times[name].append((time.perf_counter() - start) * 1e3 / step.steps_per_run)
    return times


def step_comparison(args) -> list[str]:
    """Times Keras and flaxcnn steps; returns the Markdown lines it printed."""
    b, s = args.batch_size, args.image_size
    steps = {
        "keras head": keras_step(args.weights, "head", b, s),
        "flaxcnn head (images)": bench.build_step("head", b, s, conv_impl=args.conv_impl),
        "keras finetune": keras_step(args.weights, "finetune", b, s),
        "flaxcnn finetune": bench.build_step("finetune", b, s, conv_impl=args.conv_impl),
        "keras finetune, no augmentation layers": keras_step(
            args.weights, "finetune", b, s, augment_in_model=False
        ),
        "flaxcnn inference": bench.build_step("inference", b, s, conv_impl=args.conv_impl),
        "flaxcnn head (cached features)": bench.build_step(
            "head_cached", b, s, conv_impl=args.conv_impl
        ),
    }
    times = interleaved(steps, args.rounds, args.steps)
    rate = {name: b / statistics.median(t) * 1e3 for name, t in times.items()}
    lines = [
        f"batch {b}, {s}x{s}; {args.rounds} rounds x {args.steps} steps per case, interleaved",
        "",
        "| step | img/s | ms/step (median) | ms/step (min) | compile / first call s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in times.items():
        lines.append(
            f"| {name} | {rate[name]:.1f} | {statistics.median(t):.1f} | {min(t):.1f} | "
            f"{steps[name].compile_s:.1f} |"
        )
    head_ratio = rate["flaxcnn head (images)"] / rate["keras head"]
    ft_ratio = rate["flaxcnn finetune"] / rate["keras finetune"]
    train_images, epochs_keras, epochs_flax = 2000, 10, 50
    batches = train_images // b
    keras_head_s = epochs_keras * batches * b / rate["keras head"]
    flax_head_s = (
        3000 / rate["flaxcnn inference"]
        + epochs_flax * batches * b / rate["flaxcnn head (cached features)"]
    )
    lines += [
        "",
        f"ratio flaxcnn / keras, head-phase step on images: {head_ratio:.2f}x",
        f"ratio flaxcnn / keras, fine-tuning step: {ft_ratio:.2f}x (flaxcnn augments in the "
        f"tf.data pipeline, Keras inside the step; without its augmentation layers Keras runs "
        f"{rate['keras finetune, no augmentation layers']:.1f} img/s: "
        f"{rate['flaxcnn finetune'] / rate['keras finetune, no augmentation layers']:.2f}x)",
        f"head phase on 2,000 train + 1,000 validation images, compute only (estimate): "
        f"keras {epochs_keras} epochs of head steps {keras_head_s:.0f} s; flaxcnn one inference "
        f"pass + {epochs_flax} epochs on cached features {flax_head_s:.0f} s "
        f"({keras_head_s / flax_head_s:.1f}x)",
    ]
    return lines


def keras_full_run(args) -> dict:
    """The recipe end to end; returns wall seconds and validation accuracies per phase."""
    tf = _tf(len(os.sched_getaffinity(0)))
    import tf_keras as keras

    data = pathlib.Path(args.data)
    load = lambda split, shuffle: keras.utils.image_dataset_from_directory(
        data / split, image_size=(args.image_size,) * 2, batch_size=args.batch_size,
        shuffle=shuffle, seed=0, label_mode="binary",
    ).prefetch(tf.data.AUTOTUNE)  # fmt: skip
    train, validation = load("train", True), load("validation", False)
    model, base = keras_model(args.weights, args.image_size)
    out = {}
    start = time.perf_counter()
    for phase, epochs in (("head", args.keras_head_epochs), ("finetune", args.keras_ft_epochs)):
        compile_phase(model, base, phase, args.keras_finetune_optimizer)
        model.fit(train, epochs=epochs, validation_data=validation, verbose=2)
        out[f"{phase}_val_accuracy"] = float(model.evaluate(validation, verbose=0)[1])
        out[f"{phase}_wall_s"] = time.perf_counter() - start
    return out


def flaxcnn_full_run(args) -> dict:
    """``python -m flaxcnn.experiments.transfer`` as a subprocess; wall time and accuracies."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="flaxcnn-compare-")
    command = [sys.executable, "-m", "flaxcnn.experiments.transfer", "--data", args.data]
    command += ["--no-download", "--workdir", workdir, "--overwrite", *args.flaxcnn_args]
    env = dict(os.environ, FLAXCNN_WEIGHTS=os.path.abspath(args.weights))
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - start
    metrics = json.loads((pathlib.Path(workdir) / "metrics.json").read_text())
    last, head_wall = {}, float("nan")
    for epoch in metrics["epochs"]:
        last[epoch["phase"]] = epoch["val_accuracy"]
        if epoch["phase"] == "head":  # seconds since training started (after start-up)
            head_wall = epoch["wall_seconds"]
    best = metrics.get("best_val_accuracy")
    return {"wall_s": wall, "val_accuracy_by_phase": last, "best_val_accuracy": best,
            "head_wall_s": head_wall, "workdir": workdir}  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=os.environ.get("FLAXCNN_WEIGHTS", DEFAULT_WEIGHTS))
    parser.add_argument("--data", default=os.path.join("..", "shared", "data", "cats_vs_dogs"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case and round")
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--full", action="store_true", help="also both whole two-phase runs")
    parser.add_argument("--keras-head-epochs", type=int, default=10)
    parser.add_argument("--keras-ft-epochs", type=int, default=10)
    parser.add_argument(
        "--keras-finetune-optimizer",
        choices=("adam", "rmsprop"),
        default="adam",
        help="the TF tutorial fine-tunes with RMSprop; the seed recipe with Adam",
    )
    parser.add_argument("--workdir", help="flaxcnn's workdir for --full (default: a temp dir)")
    parser.add_argument(
        "--flaxcnn-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra flags for flaxcnn.experiments.transfer (last on the line)",
    )
    parser.add_argument("--no-malloc-tuning", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tuned = False if args.no_malloc_tuning else cli.tune_glibc_malloc()
    if not os.path.exists(args.weights):
        sys.exit(f"no weights file {args.weights}: pass --weights or set FLAXCNN_WEIGHTS")
    for line in bench.describe_machine(args.conv_impl, tuned):
        print(line)
    import tensorflow as tf

    print(f"tensorflow {tf.__version__}, intra-op threads = {len(os.sched_getaffinity(0))}")
    print("\n".join(step_comparison(args)), flush=True)
    if args.full:
        keras = keras_full_run(args)
        flax = flaxcnn_full_run(args)
        print("\n| whole run | wall s | val accuracy after head | after fine-tuning |")
        print("|---|---:|---:|---:|")
        k_head, k_ft = keras["head_val_accuracy"], keras["finetune_val_accuracy"]
        print(f"| keras recipe | {keras['finetune_wall_s']:.0f} | {k_head:.4f} | {k_ft:.4f} |")
        f_head = flax["val_accuracy_by_phase"].get("head", float("nan"))
        f_ft = flax["val_accuracy_by_phase"].get("finetune", float("nan"))
        print(f"| flaxcnn transfer | {flax['wall_s']:.0f} | {f_head:.4f} | {f_ft:.4f} |")
        print(
            f"head phase: keras {keras['head_wall_s']:.0f} s, flaxcnn {flax['head_wall_s']:.0f} s "
            f"(feature caching included; both from the start of training): "
            f"{keras['head_wall_s'] / flax['head_wall_s']:.1f}x faster"
        )
        print(
            f"whole run: flaxcnn / keras wall time {flax['wall_s'] / keras['finetune_wall_s']:.2f}x"
            f" (flaxcnn's includes its process start-up); flaxcnn best validation accuracy "
            f"{flax['best_val_accuracy']}; workdir {flax['workdir']}"
        )
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
