"""Two-phase transfer learning with a pretrained backbone: feature extraction, then fine-tuning.

    python -m flaxcnn.experiments.transfer --data cats_vs_dogs
    python -m flaxcnn.experiments.transfer --data ../shared/data/cats_vs_dogs --no-download
    python -m flaxcnn.experiments.transfer --model NAME --data DIR   # any registered model
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flaxcnn import cli  # nothing heavier here: cli.main installs the signal handlers first

FLAGS = (
    "data", "data_dir", "download", "model", "model_options", "weights", "image_size",
    "batch_size",
    "head_epochs", "head_learning_rate", "feature_cache", "finetune_epochs",
    "finetune_learning_rate", "finetune_head_learning_rate", "fine_tune_at", "lr_schedule",
    "early_stopping_patience", "weight_decay", "finetune_weight_decay", "augment",
    "dropout_rate", "validation_fraction", "class_weight", "tta", "dtype", "conv_impl", "seed",
    "keep_checkpoints",
    "checkpoint_every_seconds", "log_every",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, prog="python -m flaxcnn.experiments.transfer",
                    description=__doc__.splitlines()[0], flags=FLAGS)


if __name__ == "__main__":
    sys.exit(main())
