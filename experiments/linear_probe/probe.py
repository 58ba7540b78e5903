"""Does the default head phase reach a converged linear probe on the same frozen features?

For each dataset: (1) run flaxcnn's head phase exactly as the CLI does (``fit`` with the default
TrainConfig, ``finetune_epochs=0``); (2) fit a converged multinomial logistic regression
(scikit-learn, L-BFGS, C chosen on the validation split from a small grid) on the same pooled
MobileNetV2 features of the un-augmented images; print both validation accuracies.

    python experiments/linear_probe/probe.py --data ../shared/data/cats_vs_dogs --weights W.h5
    python experiments/linear_probe/probe.py --digits /tmp/digits --weights W.h5

``--digits DIR`` first writes scikit-learn's 8x8 handwritten digits (10 classes, 1,797 images,
shipped with scikit-learn) as a class-per-folder PNG directory (80/20 split, seeded), a
multi-class problem with ~145 training images per class.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax
import numpy as np


def write_digits(root: pathlib.Path) -> pathlib.Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    for rank, i in enumerate(order):
        split = "validation" if rank % 5 == 0 else "train"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((64, 64), Image.NEAREST).save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--digits")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--head-learning-rate", type=float, default=None,
                        help="override the default head learning rate")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    from flaxcnn import data, sharding, train
    from flaxcnn.config import TrainConfig
    from flaxcnn.models import build_model
    from flaxcnn.run import fit, initial_variables

    source = str(write_digits(pathlib.Path(args.digits))) if args.digits else args.data
    config = TrainConfig(data=source, download=False, weights=args.weights,
                         image_size=args.image_size, finetune_epochs=0).resolved()
    if args.head_learning_rate is not None:
        config = config.replace(head_learning_rate=args.head_learning_rate)
    with tempfile.TemporaryDirectory() as workdir:
        result = fit(config, workdir)
    head_accuracy = result.summary["epochs"][-1]["val_accuracy"]

    dataset = data.open_dataset(source, download=False)
    hw = (args.image_size, args.image_size)
    model = build_model(config.model_config(len(dataset.class_names)))
    variables = initial_variables(config, model, hw, jax.random.PRNGKey(0))
    mesh = sharding.make_mesh()
    common = dict(batch_size=32, image_size=hw, preprocessing=config.backbone.preprocessing)
    feats = {s: train.extract_features(model, variables, data.eval_batches(dataset, s, **common),
                                       mesh) for s in ("train", "validation")}
    best = None
    for c in (0.01, 0.1, 1.0, 10.0):
        probe = LogisticRegression(C=c, max_iter=5000).fit(feats["train"]["features"],
                                                           feats["train"]["label"])
        acc = probe.score(feats["validation"]["features"], feats["validation"]["label"])
        best = max(best or (acc, c), (acc, c))
    row = {"data": source, "classes": len(dataset.class_names),
           "train_images": dataset.split_sizes["train"],
           "head_phase_val_accuracy": round(head_accuracy, 4),
           "linear_probe_val_accuracy": round(best[0], 4), "probe_C": best[1],
           "head_epochs": [round(e["val_accuracy"], 4) for e in result.summary["epochs"]]}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
