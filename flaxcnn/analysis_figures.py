"""The error analysis's figures: the confusion matrix and the contact sheet of the
highest-loss images (``flaxcnn.analysis`` writes them as PNGs).

Sizes are fixed in inches (x ``DPI`` = pixels) and grow with the class and image counts;
long class and file names are shortened so that no text runs into another.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DPI = 100
SHEET_COLUMNS = 4
# Contact-sheet tile and title heights, in inches.
TILE_WIDTH, TILE_HEIGHT, SHEET_TITLE_HEIGHT = 2.5, 3.1, 0.6
ANNOTATE_CLASSES = 40  # the confusion matrix shows counts up to this many classes
NAME_CHARS = 24  # labels longer than this are shortened with an ellipsis


def shorten(text: str, limit: int = NAME_CHARS, *, keep_end: bool = False) -> str:
    """``text`` in at most ``limit`` characters; file names keep their ending."""
    if len(text) <= limit:
        return text
    if keep_end:
        head = (limit - 1) // 2
        return text[:head] + "…" + text[-(limit - 1 - head) :]
    return text[: limit - 1] + "…"


def _cell_inches(num_classes: int) -> float:
    return float(np.interp(num_classes, [20, 100], [0.55, 0.2]))


def confusion_figure_size(num_classes: int) -> tuple[float, float]:
    """Inches: cells of 0.55" up to 20 classes, shrinking to 0.2" for 100+, plus room for
    the longest (shortened) labels, the colour bar and the title."""
    side = _cell_inches(num_classes) * num_classes
    label_room = 1.9 if num_classes <= 40 else 2.3
    return round(max(side + label_room + 1.3, 5.5), 2), round(side + label_room + 1.0, 2)


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str):
    """The confusion matrix as a heat map: colour is the share of the true class (so small
    classes show), the number in a cell its count (up to ``ANNOTATE_CLASSES`` classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    k = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    fontsize = float(np.interp(k, [10, 40, 100], [9, 8, 5]))
    fig, ax = plt.subplots(figsize=confusion_figure_size(k), dpi=DPI, layout="constrained")
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [shorten(str(name)) for name in class_names]
    # Column labels run horizontally when the longest fits its cell (a DejaVu Sans character
    # is at most ~0.65 em wide), vertically otherwise: never slanted into each other.
    fits = max(map(len, labels)) * 0.65 * fontsize <= 72 * _cell_inches(k)
    ax.set_xticks(range(k), labels, rotation=0 if fits else 90, fontsize=fontsize)
    ax.set_yticks(range(k), labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    if k <= ANNOTATE_CLASSES:
        for (true, pred), count in np.ndenumerate(confusion):
            if count or true == pred:
                ax.text(pred, true, str(count), ha="center", va="center",
                        fontsize=fontsize * (0.95 if count < 1000 else 0.75),
                        color="white" if share[true, pred] > 0.55 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def contact_sheet_size(count: int) -> tuple[float, float]:
    """Inches of a sheet of ``count`` tiles in ``SHEET_COLUMNS`` columns."""
    columns = min(SHEET_COLUMNS, max(count, 1))
    rows = max(1, math.ceil(count / SHEET_COLUMNS))
    return columns * TILE_WIDTH, rows * TILE_HEIGHT + SHEET_TITLE_HEIGHT


def contact_sheet_figure(images: np.ndarray, examples: Sequence[Mapping[str, Any]], title: str):
    """Tiles of ``images`` (uint8 ``[n, h, w, 3]``), each headed by its true and predicted
    class (red when they differ) and footed by its file name and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = contact_sheet_size(len(examples))
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    top = 1 - SHEET_TITLE_HEIGHT / height
    tile_w, tile_h = TILE_WIDTH / width, TILE_HEIGHT / height
    for i, (image, example) in enumerate(zip(images, examples, strict=True)):
        row, col = divmod(i, SHEET_COLUMNS)
        # The image fills the tile's width less margins; text above and below it.
        left = (col + 0.06) * tile_w
        bottom = top - (row + 1) * tile_h + 0.62 / height
        ax = fig.add_axes((left, bottom, 0.88 * tile_w, (TILE_HEIGHT - 1.0) / height))
        ax.imshow(image, interpolation="nearest" if image.shape[0] < 96 else "antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        wrong = example["true"] != example["predicted"]
        ax.set_title(f"true: {shorten(example['true'])}\npred: {shorten(example['predicted'])}",
                     fontsize=8, color="#b00020" if wrong else "black", loc="left")  # fmt: skip
        name = shorten(pathlib.PurePath(example["example"]).name, 30, keep_end=True)
        p_pred = example["probability_predicted"]
        footer = f"{name}\nloss {example['loss']:.2f}, p(pred) {p_pred:.2f}"
        ax.set_xlabel(footer, fontsize=7, loc="left")
    return fig


def report_figures(report: Mapping[str, Any], images: np.ndarray, *, what: str) -> dict[str, Any]:
    """The figures of a report by file name: the confusion matrix, and the contact sheet of
    ``images`` (the first ``len(images)`` of ``report['highest_loss']``) if there are any."""
    figures = {"confusion_matrix.png": confusion_figure(
        np.array(report["confusion_matrix"]), report["class_names"],
        f"Confusion matrix\n{what}, {report['count']} images")}  # fmt: skip
    if len(images):
        size = "x".join(map(str, images.shape[1:3]))
        figures["highest_loss.png"] = contact_sheet_figure(
            images, report["highest_loss"][: len(images)],
            f"Highest-loss images: {what}\nas the model saw them ({size}, not augmented); "
            "full names in report.json")  # fmt: skip
    return figures
