"""Classify image files with a trained (or converted) checkpoint.

    python -m flaxcnn.predict --checkpoint checkpoints/cats_vs_dogs_mobilenet_v2 cat.jpg dog.png
    python -m flaxcnn.predict --checkpoint RUN --json *.jpg        # one JSON object per line

The preprocessing contract (input size, scaling, class names) is read from the checkpoint's
metadata, so predictions see exactly what training saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flaxcnn import checkpoints, data


def predict_files(
    model: Any, variables: Any, metadata: dict, paths: Sequence[str | os.PathLike], top_k: int = 1,
    batch_size: int = 32,
) -> list[dict[str, Any]]:  # fmt: skip
    """Top-k classes and probabilities for each image file.

    Args:
      model, variables, metadata: as returned by ``flaxcnn.checkpoints.restore``.
      paths: image files.
      top_k: how many classes to return per image.
      batch_size: images per forward pass.

    Returns:
      One dict per image: ``{'image', 'label', 'probability', 'top_k': [[label, p], ...]}``.
    """
    names = metadata.get("class_names") or [str(i) for i in range(metadata["model"].get(
        "num_classes", 1000))]  # fmt: skip
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False).astype("float32")))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        images = data.load_images(chunk, metadata["image_size"], metadata["preprocessing"])
        probs = np.asarray(apply(variables, images))
        for path, p in zip(chunk, probs, strict=True):
            order = np.argsort(-p)[:top_k]
            results.append({
                "image": str(path), "label": names[order[0]], "probability": float(p[order[0]]),
                "top_k": [[names[i], float(p[i])] for i in order],
            })  # fmt: skip
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxcnn.predict", description=__doc__.split(
        "\n")[0])  # fmt: skip
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, its best/ or checkpoints/ folder, or one step folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--top-k", type=int, default=1, help="classes to print per image")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    try:
        model, variables, metadata = checkpoints.restore(args.checkpoint)
        results = predict_files(model, variables, metadata, args.images, top_k=args.top_k)
    except (checkpoints.CheckpointError, data.DataError, OSError) as e:
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            ranked = ", ".join(f"{label} {p:.3f}" for label, p in r["top_k"])
            print(f"{r['image']}: {ranked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
