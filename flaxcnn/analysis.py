"""Error analysis of a trained classifier on one split: where it fails, not only how often.

From one pass of the model over a split (:class:`Predictions`: logits, labels, example ids)
it computes per-class precision, recall and F1, the confusion matrix, the most-confused
class pairs, the highest-loss examples and the expected calibration error, and writes them
to ``WORKDIR/analysis/<split>/``::

    report.json            every number below, per class and per confidence bin
    predictions.csv        one row per example: id, true and predicted class, p, loss
    confusion_matrix.png   rows: true class, columns: predicted; cells coloured by row share
    highest_loss.png       contact sheet of the highest-loss images with true/predicted labels

``flaxcnn.run.fit`` calls :func:`analyse` once at the end of a run, for the checkpoint
``checkpoints.restore`` loads (the best by validation accuracy), on the validation split and
the test split if there is one. Everything but :func:`gather_predictions` is plain numpy on
the host, so a report can be rebuilt from ``predictions`` in a notebook.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flaxcnn import analysis_figures
from flaxcnn.analysis_figures import shorten
from flaxcnn.report import replace_file

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"
ECE_BINS = 15  # equal-width bins of the top-class probability, as Guo et al. (2017)
MOST_CONFUSED = 5
SHEET_IMAGES = 16
TABLE_CLASSES = 20  # the console lists every class up to this many, else the lowest F1s


@dataclasses.dataclass(frozen=True)
class Predictions:
    """A classifier's outputs over a split, in the split's fixed order.

    Attributes:
      logits: float ``[n, num_classes]``.
      labels: int ``[n]``, the true classes.
      example_ids: ``n`` names (``flaxcnn.data.example_ids``: file paths relative to the
        folder, or ``'split[i]'`` for TFDS).
      class_names: ``num_classes`` names; class i is ``class_names[i]``.
    """

    logits: np.ndarray
    labels: np.ndarray
    example_ids: tuple[str, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.logits.ndim != 2 or self.logits.shape != (n, len(self.class_names)):
            raise ValueError(f"logits {self.logits.shape} must be [{n} examples, "
                             f"{len(self.class_names)} classes]")  # fmt: skip
        if len(self.example_ids) != n:
            raise ValueError(f"{len(self.example_ids)} example ids for {n} labels")
        if n and not 0 <= self.labels.min() <= self.labels.max() < len(self.class_names):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax of the logits, in float64 (float32 logits lose nothing)."""
        z = self.logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    @property
    def losses(self) -> np.ndarray:
        """Per-example softmax cross-entropy (float64)."""
        z = self.logits.astype(np.float64)
        top = z.max(axis=1)
        log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        return log_norm - z[np.arange(len(z)), self.labels]

    @property
    def predicted(self) -> np.ndarray:
        return np.argmax(self.logits, axis=1)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts (int64 ``[num_classes, num_classes]``)."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each class from a confusion matrix.

    A class never predicted has precision 0, one never present recall 0, and F1 is 0 when
    both are 0 (scikit-learn's ``zero_division=0``).
    """
    confusion = np.asarray(confusion, np.float64)
    hits = np.diag(confusion)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    divide = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)
    precision, recall = divide(hits, predicted), divide(hits, support)
    f1 = divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1,
            "support": support.astype(np.int64)}  # fmt: skip


def most_confused_pairs(confusion: np.ndarray, class_names: Sequence[str],
                        top: int = MOST_CONFUSED) -> list[dict[str, Any]]:  # fmt: skip
    """The ``top`` largest off-diagonal cells: true class, predicted class, count and the
    share of the true class's examples; ties in the order of the classes."""
    confusion = np.asarray(confusion)
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    pairs = []
    for true, pred in zip(*np.unravel_index(order, off.shape), strict=True):
        if off[true, pred] == 0:
            break
        pairs.append({"true": class_names[true], "predicted": class_names[pred],
                      "count": int(off[true, pred]),
                      "share_of_true": float(off[true, pred] / confusion[true].sum())})  # fmt: skip
    return pairs


def calibration(probabilities: np.ndarray, labels: np.ndarray,
                bins: int = ECE_BINS) -> dict[str, Any]:  # fmt: skip
    """Expected calibration error over ``bins`` equal-width bins of the top-class probability.

    An example with confidence c (its largest probability) falls in bin ``(b/B, (b+1)/B]``
    (the first bin also takes 0); ECE = sum over bins of (bin count / n) x |bin accuracy -
    mean bin confidence| (Guo et al. 2017, "On calibration of modern neural networks").

    Returns:
      ``{'ece', 'bins', 'binning', 'table': [{'lower', 'upper', 'count', 'accuracy',
      'confidence'}, ...]}``; empty bins have count 0 and accuracy/confidence None.
    """
    confidence = np.max(probabilities, axis=1)
    correct = np.argmax(probabilities, axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": count,
               "accuracy": None, "confidence": None}  # fmt: skip
        if count:
            row["accuracy"] = float(correct[members].mean())
            row["confidence"] = float(confidence[members].mean())
            ece += count / len(labels) * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return {"ece": ece, "bins": bins,
            "binning": f"{bins} equal-width bins of the top-class probability",
            "table": table}  # fmt: skip


def highest_loss(predictions: Predictions, count: int = SHEET_IMAGES) -> np.ndarray:
    """Positions of the ``count`` highest-loss examples, highest first (ties: first first)."""
    return np.argsort(-predictions.losses, kind="stable")[:count]


def error_report(predictions: Predictions, split: str, *,
                 shown: int = SHEET_IMAGES) -> dict[str, Any]:  # fmt: skip
    """Everything ``report.json`` holds, computed from ``predictions`` alone.

    Args:
      predictions: one pass over ``split``.
      split: its name, for the record.
      shown: how many highest-loss examples to list.

    Returns:
      A JSON-ready dict: count, accuracy, macro and per-class precision/recall/F1, the
      confusion matrix, the most-confused pairs, calibration and the highest-loss examples.
    """
    names = list(predictions.class_names)
    predicted, probabilities = predictions.predicted, predictions.probabilities
    confusion = confusion_matrix(predictions.labels, predicted, len(names))
    per_class = per_class_metrics(confusion)
    losses = predictions.losses
    n = len(predictions.labels)
    worst = []
    for i in highest_loss(predictions, shown):
        worst.append({"example": predictions.example_ids[i],
                      "true": names[predictions.labels[i]], "predicted": names[predicted[i]],
                      "probability_true": float(probabilities[i, predictions.labels[i]]),
                      "probability_predicted": float(probabilities[i, predicted[i]]),
                      "loss": float(losses[i])})  # fmt: skip
    return {
        "split": split, "count": n,
        "accuracy": float(np.trace(confusion) / n) if n else float("nan"),
        "loss": float(losses.mean()) if n else float("nan"),
        "macro": {key: float(per_class[key].mean()) for key in ("precision", "recall", "f1")},
        "per_class": [{"class": name, **{key: float(per_class[key][c])
                                         for key in ("precision", "recall", "f1")},
                       "support": int(per_class["support"][c])}
                      for c, name in enumerate(names)],
        "most_confused": most_confused_pairs(confusion, names),
        "calibration": calibration(probabilities, predictions.labels),
        "highest_loss": worst,
        "class_names": names,
        "confusion_matrix": confusion.tolist(),
    }  # fmt: skip


def _save(fig, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=analysis_figures.DPI)
    plt.close(fig)
    os.replace(tmp, path)


def predictions_csv(predictions: Predictions) -> str:
    """One row per example: id, true class, predicted class, its probability, the true
    class's probability, the loss."""
    names, probabilities = predictions.class_names, predictions.probabilities
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["example", "true", "predicted", "probability_predicted",
                     "probability_true", "loss"])  # fmt: skip
    for i, (label, pred, loss) in enumerate(zip(predictions.labels, predictions.predicted,
                                                predictions.losses, strict=True)):  # fmt: skip
        writer.writerow([predictions.example_ids[i], names[label], names[pred],
                         f"{probabilities[i, pred]:.6f}", f"{probabilities[i, label]:.6f}",
                         f"{loss:.6f}"])  # fmt: skip
    return table.getvalue()


def write_analysis(folder: str | os.PathLike, report: Mapping[str, Any],
                   predictions: Predictions, images: np.ndarray, *,
                   what: str) -> pathlib.Path:  # fmt: skip
    """Writes report.json, predictions.csv and the two PNGs into ``folder`` (created).

    Args:
      folder: e.g. ``WORKDIR/analysis/validation``.
      report: from :func:`error_report`.
      predictions: the same predictions (for the CSV).
      images: uint8 ``[m, h, w, 3]``, the first ``m`` of ``report['highest_loss']``.
      what: how the figures name the split and checkpoint, e.g. ``'validation, best
        checkpoint (epoch 12)'``.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(folder / "report.json", json.dumps(report, indent=1) + "\n")
    replace_file(folder / "predictions.csv", predictions_csv(predictions))
    for name, fig in analysis_figures.report_figures(report, images, what=what).items():
        _save(fig, folder / name)
    return folder


def summary_lines(report: Mapping[str, Any], what: str, folder: str | os.PathLike) -> list[str]:
    """The console's error-analysis lines: headline numbers, a per-class table (every class
    up to ``TABLE_CLASSES``, else the lowest F1s), the most-confused pairs, where the files
    are."""
    cal = report["calibration"]
    lines = [f"error analysis, {what}: {report['count']} images, accuracy "
             f"{report['accuracy']:.4f}, macro F1 {report['macro']['f1']:.4f}, ECE "
             f"{cal['ece']:.4f} ({cal['binning']})"]  # fmt: skip
    rows = report["per_class"]
    if len(rows) > TABLE_CLASSES:
        rows = sorted(rows, key=lambda r: r["f1"])[: TABLE_CLASSES // 2]
        lines.append(f"  the {len(rows)} classes with the lowest F1 (all in report.json):")
    width = max(5, *(len(shorten(r["class"])) for r in rows))
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    lines += [f"  {shorten(r['class']):<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  "
              f"{r['f1']:.4f}  {r['support']:7d}" for r in rows]  # fmt: skip
    pairs = ", ".join(f"{shorten(p['true'])} -> {shorten(p['predicted'])} {p['count']} "
                      f"({p['share_of_true']:.1%})" for p in report["most_confused"])  # fmt: skip
    lines.append("  most confused (true -> predicted: count, share of the true class): "
                 + (pairs or "none, no errors"))  # fmt: skip
    lines.append(f"  report, confusion matrix and highest-loss images: {folder}")
    return lines


def gather_predictions(
    logits_fn: Callable, variables: Any, dataset, split: str, mesh, *, batch_size: int,
    image_size: int | Sequence[int], preprocessing: str, process_index: int = 0,
    process_count: int = 1,
) -> Predictions:  # fmt: skip
    """One pass of ``logits_fn(variables, images)`` over ``split`` (every process takes part;
    every one gets all the predictions back).

    Args:
      logits_fn: e.g. ``lambda v, x: model.apply(v, x, train=False)``; jitted here.
      variables: replicated over ``mesh``.
      dataset: a ``flaxcnn.data.ImageDataset``.
      split: 'validation' or 'test'.
      mesh: the device mesh.
      batch_size, image_size, preprocessing, process_index, process_count: as for
        ``flaxcnn.data.eval_batches``.
    """
    import jax

    from flaxcnn import compiler, data, sharding

    def outputs(v, batch):
        return logits_fn(v, batch["image"]).astype("float32"), batch["label"], batch["mask"]

    fn = compiler.jit(outputs,
                      in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))  # fmt: skip
    logits, labels = [], []
    for batch in data.eval_batches(dataset, split, batch_size=batch_size,
                                   image_size=image_size, preprocessing=preprocessing,
                                   process_index=process_index,
                                   process_count=process_count):  # fmt: skip
        out, label, keep = jax.device_get(fn(variables, sharding.to_global(batch, mesh)))
        logits.append(np.asarray(out)[keep])
        labels.append(np.asarray(label)[keep])
    k = len(dataset.class_names)
    return Predictions(np.concatenate([np.zeros((0, k), np.float32), *logits]),
                       np.concatenate([np.zeros(0, np.int32), *labels]).astype(np.int32),
                       data.example_ids(dataset, split), tuple(dataset.class_names))  # fmt: skip


def analyse(
    logits_fn: Callable, variables: Any, dataset, mesh, workdir: str | os.PathLike, *,
    checkpoint: str, pipeline: Mapping[str, Any], write: bool = True,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Error analysis of ``variables`` on the validation split and the test split if present:
    writes ``WORKDIR/analysis/<split>/`` (``write``: process 0) and logs the summary lines.

    Args:
      logits_fn, variables, dataset, mesh: as for :func:`gather_predictions`.
      workdir: the run folder.
      checkpoint: names the weights in the figures and the log, e.g. 'best checkpoint,
        epoch 12'.
      pipeline: ``batch_size``, ``image_size``, ``preprocessing`` (and the process shard).
      write: whether this process writes the files.

    Returns:
      Per split, the headline numbers and the folder (for metrics.json).
    """
    from flaxcnn import data

    results = {}
    for split in ("validation", "test"):
        if split not in dataset.split_sizes:
            continue
        predictions = gather_predictions(logits_fn, variables, dataset, split, mesh,
                                         **pipeline)  # fmt: skip
        report = error_report(predictions, split)
        what = f"{split}, {checkpoint}"
        folder = pathlib.Path(workdir) / ANALYSIS_DIR / split
        if write:
            positions = highest_loss(predictions)
            images = data.decoded_images(dataset, split, positions, pipeline["image_size"])
            write_analysis(folder, report, predictions, images, what=what)
            for line in summary_lines(report, what, folder):
                log.info("%s", line)
        results[split] = {"accuracy": report["accuracy"], "macro_f1": report["macro"]["f1"],
                          "ece": report["calibration"]["ece"],
                          "folder": str(folder)}  # fmt: skip
    return results
