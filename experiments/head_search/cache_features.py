"""Caches a folder's frozen-backbone features (train, validation, mirrored validation) to .npz.

    python experiments/head_search/cache_features.py --data ../shared/data/cats_vs_dogs \
        --out /tmp/cvd_224.npz

The features are exactly what the head phase trains on (``train.extract_features`` of the
default model at its default size, with the run's preprocessing), so the head-recipe and TTA
studies in this folder run in seconds on them.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from flaxcnn import data, run, sharding, train
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    config = TrainConfig(data=args.data, download=False, image_size=args.image_size).resolved()
    dataset = data.open_dataset(config.data, download=False, split_seed=config.seed)
    hw = (config.image_size, config.image_size)
    model = build_model(config.model_config(len(dataset.class_names)))
    variables = run.initial_variables(config, model, hw, jax.random.PRNGKey(1))
    mesh = sharding.make_mesh()
    pipeline = dict(batch_size=args.batch_size, image_size=hw,
                    preprocessing=config.backbone.preprocessing)  # fmt: skip
    out = {"class_names": np.array(dataset.class_names)}
    for split in ("train", "validation"):
        t0 = time.time()
        cached = train.extract_features(model, variables, data.eval_batches(dataset, split,
                                                                            **pipeline), mesh)
        out[f"{split}_features"], out[f"{split}_label"] = cached["features"], cached["label"]
        print(split, cached["features"].shape, f"{time.time() - t0:.0f} s", flush=True)
    mirrored = ({**b, "image": b["image"][:, :, ::-1]}
                for b in data.eval_batches(dataset, "validation", **pipeline))  # fmt: skip
    cached = train.extract_features(model, variables, mirrored, mesh)
    out["validation_mirrored_features"] = cached["features"]
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
