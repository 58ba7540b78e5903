"""What a run shows and leaves behind: metrics.json/.csv, curves.png, TensorBoard events and
the progress of an epoch (a bar on a terminal, plain lines in a log file).

Only process 0 writes files; ``flaxcnn.run.fit`` calls these with the per-epoch records
(``history``) it keeps.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "head_learning_rate", "epoch_seconds", "wall_seconds", "images_per_second",
)  # fmt: skip
UNREADABLE_IMAGES = "unreadable_images.txt"
TENSORBOARD_DIR = "tensorboard"
# Keras's TensorBoard callback layout: one run per split, so that the train and validation
# curves of a tag share a chart. record key -> (run, tag).
TENSORBOARD_SCALARS = {
    "train_loss": ("train", "epoch_loss"),
    "train_accuracy": ("train", "epoch_accuracy"),
    "learning_rate": ("train", "epoch_learning_rate"),
    "head_learning_rate": ("train", "epoch_head_learning_rate"),
    "val_loss": ("validation", "epoch_loss"),
    "val_accuracy": ("validation", "epoch_accuracy"),
}


def write_reports(
    workdir: str | os.PathLike,
    history: Sequence[Mapping[str, Any]],
    *,
    summary: Mapping[str, Any] | None = None,
    plot: bool = True,
) -> None:
    """Writes ``metrics.json``, ``metrics.csv`` and (``plot``) ``curves.png`` into ``workdir``.

    Plotting costs ~0.5 s (seconds on a busy machine), more than a whole epoch of a head on
    cached features, so ``fit`` redraws the curves only now and then and at the end.
    """
    workdir = pathlib.Path(workdir)
    payload = {"epochs": list(history), **(dict(summary) if summary else {})}
    replace_file(workdir / "metrics.json", json.dumps(payload, indent=2) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    replace_file(workdir / "metrics.csv", table.getvalue())
    if history and plot:
        plot_curves(history, workdir / "curves.png")


def replace_file(path: pathlib.Path, text: str) -> None:
    """Writes beside ``path`` and renames: a crash never leaves a half-written report."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_unreadable_list(workdir: pathlib.Path, skipped: Sequence[str]) -> None:
    """Every unreadable image the data had, one per line (the log names only the first)."""
    path = workdir / UNREADABLE_IMAGES
    if skipped:
        replace_file(path, "".join(f"{name}\n" for name in skipped))
        log.info("the %d unreadable images are listed in %s", len(skipped), path)
    else:
        path.unlink(missing_ok=True)  # a resumed run on repaired data


def curves_figure(history: Sequence[Mapping[str, Any]]):
    """Accuracy and loss per epoch for both phases, a line where fine-tuning starts (the
    TensorFlow transfer-learning tutorial's figure); epochs are whole numbers on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = np.array([h["epoch"] for h in history])
    fig, axes = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for ax, key, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Cross-entropy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label=f"Training {key}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label=f"Validation {key}")
        phases = [h["phase"] for h in history]
        if "finetune" in phases and phases[0] != "finetune":
            start = epochs[phases.index("finetune")] - 0.5
            ax.axvline(start, color="gray", linestyle="--", label="Start fine-tuning")
        ax.set_title(f"Training and validation {title.lower()}")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if key == "accuracy" else "upper right")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by both axes
    axes[1].set_xlabel("epoch")
    fig.tight_layout()
    return fig


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Saves :func:`curves_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)


class TensorBoardEvents:
    """The per-epoch records as TensorBoard scalars in ``WORKDIR/tensorboard/{train,validation}``
    (``tensorboard --logdir WORKDIR``), at step = epoch.

    Opening rewrites the event files from ``history``, the records of the checkpoint the run
    starts from: epochs that a resumed run redoes (trained after its checkpoint, before a
    kill) are neither duplicated nor lost, and the events always equal metrics.json.
    """

    def __init__(self, workdir: pathlib.Path, history: Sequence[Mapping[str, Any]]):
        from flaxcnn import tf_runtime

        tf = tf_runtime.tensorflow()
        from tensorflow.core.framework import summary_pb2

        # What tensorboard.summary.scalar writes (a float32 scalar tensor summary), spelled out
        # with TensorFlow's own op: that function needs the tensorboard package installed.
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR)  # fmt: skip
        self._tf = tf
        self.writers = {}
        for run in ("train", "validation"):
            folder = workdir / TENSORBOARD_DIR / run
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
            self.writers[run] = tf.summary.create_file_writer(str(folder))
        for record in history:
            self._write(record)
        self.flush()

    def _write(self, record: Mapping[str, Any]) -> None:
        tf = self._tf
        for key, (run, tag) in TENSORBOARD_SCALARS.items():
            if key in record:
                with self.writers[run].as_default():
                    value = tf.constant(record[key], tf.float32)
                    tf.summary.write(tag, value, step=int(record["epoch"]),
                                     metadata=self._metadata)  # fmt: skip

    def add(self, record: Mapping[str, Any]) -> None:
        """Writes one epoch's record (flushed: TensorBoard shows it at once)."""
        self._write(record)
        self.flush()

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def interactive() -> bool:
    """Whether progress can redraw in place: stderr is a terminal, or a notebook runs us."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class EpochProgressDisplay:
    """One epoch's progress: a tqdm bar where it can redraw (:func:`interactive`), else one
    plain log line per report (a Slurm log gets lines, not ``\\r``-joined bar fragments).

    Args:
      desc: ``'epoch 3 [finetune]'``.
      n_batches: batches in the epoch.
      start_batch: batches already done (a resumed epoch).
      batch_size: the global batch size (for images/s).
      enabled: show anything at all (process 0 only).
      announce: in a log, a line as the epoch begins (not for epochs that take a moment:
        a head's on cached features).
    """

    def __init__(self, desc: str, n_batches: int, start_batch: int, batch_size: int, *,
                 enabled: bool, announce: bool = True) -> None:  # fmt: skip
        from tqdm.auto import tqdm

        self.desc, self.n_batches, self.batch_size = desc, n_batches, batch_size
        self.start_batch, self.start_time = start_batch, time.time()
        self.lines = enabled and not interactive()
        self.bar = tqdm(total=n_batches, initial=start_batch, disable=not enabled or self.lines,
                        desc=desc, leave=False, unit="batch")  # fmt: skip
        if self.lines and announce:  # where a bar would appear: the epoch has begun
            resumed = f", resumed after batch {start_batch}" if start_batch else ""
            log.info("%s: %d batches%s", desc, n_batches, resumed)

    def advance(self, n_steps: int) -> None:
        self.bar.update(n_steps)

    def show(self, batch: int, loss: float, accuracy: float, *, final: bool = False) -> None:
        """The running loss and accuracy of the epoch's first ``batch`` batches (``final``:
        all of them; a log gets no line then, the epoch's own line follows)."""
        if not self.lines:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}")
            return
        if final:
            return
        seconds = max(time.time() - self.start_time, 1e-9)
        rate = (batch - self.start_batch) * self.batch_size / seconds
        log.info("%s batch %d/%d: loss %.4f acc %.4f, %.0f img/s", self.desc, batch,
                 self.n_batches, loss, accuracy, rate)  # fmt: skip

    def close(self) -> None:
        self.bar.close()
