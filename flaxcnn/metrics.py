"""Epoch metrics: exact example-weighted averages, and the reports a run leaves behind.

Steps return *sums* (``loss_sum``, ``correct``, ``count``) that are added up on the device and
divided once, so a padded final batch and unequal batch sizes weigh each example exactly once
(a mean of batch means does not; flax#262).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUM_KEYS = ("loss_sum", "correct", "count")


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> dict:
    """Summed softmax cross-entropy, correct predictions and example count (float32)."""
    import optax

    logits = logits.astype(jnp.float32)
    weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    values = (jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights))
    return dict(zip(SUM_KEYS, values, strict=True))


def zero_sums() -> dict:
    """The sums of no examples (the start of an accumulation)."""
    return {k: np.zeros((), np.float32) for k in SUM_KEYS}


def add_sums(total: dict | None, sums: dict) -> dict:
    return sums if total is None else jax.tree.map(jnp.add, total, sums)


def finalize(sums: Mapping[str, Any]) -> dict[str, float]:
    """``{'loss', 'accuracy', 'count'}`` from summed metrics (fetches them from the device)."""
    sums = jax.device_get(dict(sums))
    count = float(sums["count"])
    return {
        "loss": float(sums["loss_sum"]) / max(count, 1.0),
        "accuracy": float(sums["correct"]) / max(count, 1.0),
        "count": int(count),
    }


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stopped before saving anything non-finite."""


def check_finite(loss: float, step: int, epoch: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} at step {step} (epoch {epoch}); stopped without saving it. "
            "The last good checkpoint is kept: lower the learning rate and --resume"
        )


def check_finite_params(variables: Any, step: int, epoch: int) -> Any:
    """Raises before a checkpoint could store NaN/Inf weights (a finite loss is computed from
    the weights *before* the update, so the last step of an epoch can still break them).

    Returns the host copy it checked (the caller may keep it instead of fetching again).
    """
    # On the host: eager jnp checks would compile a program per leaf shape. (Replicated
    # arrays can be fetched on every process.)
    host = jax.device_get(variables)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(host)):
        raise NonFiniteLossError(
            f"the parameters became NaN/Inf at step {step} (epoch {epoch}); stopped without "
            "saving them. The last good checkpoint is kept: lower the learning rate and --resume"
        )
    return host


CSV_FIELDS = (
    "epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "epoch_seconds", "wall_seconds", "images_per_second",
)  # fmt: skip


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
    _replace_file(workdir / "metrics.json", json.dumps(payload, indent=2) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    _replace_file(workdir / "metrics.csv", table.getvalue())
    if history and plot:
        plot_curves(history, workdir / "curves.png")


def _replace_file(path: pathlib.Path, text: str) -> None:
    """Writes beside ``path`` and renames: a crash never leaves a half-written report."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Accuracy and loss per epoch for both phases, a line where fine-tuning starts
    (the TensorFlow transfer-learning tutorial's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    axes[1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
