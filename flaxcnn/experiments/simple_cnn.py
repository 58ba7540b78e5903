"""Train the classic SimpleCNN from scratch (every parameter trainable).

    python -m flaxcnn.experiments.simple_cnn --data cifar10
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flaxcnn import cli
from flaxcnn.config import TrainConfig

DEFAULTS = TrainConfig(
    data="cifar10", model="simple_cnn", weights=None, image_size=32, batch_size=64,
    head_epochs=10, head_learning_rate=1e-3, finetune_epochs=0, dropout_rate=0.0,
    augment=False, weight_decay=0.0, lr_schedule="constant",
)  # fmt: skip
FLAGS = (
    "data", "data_dir", "download", "image_size", "batch_size", "head_epochs",
    "head_learning_rate", "lr_schedule", "augment", "dropout_rate", "validation_fraction",
    "early_stopping_patience", "weight_decay", "dtype", "seed", "keep_checkpoints",
    "checkpoint_every_seconds", "log_every",
)  # fmt: skip
# One phase, every parameter trainable from random init: the transfer texts would mislead.
HELP_TEXTS = {
    "download": "allow TFDS downloads (--no-download: offline, never touch the network)",
    "image_size": "square input size in pixels (the flatten size follows it)",
    "head_epochs": "epochs of training: one phase, every parameter trainable, from random "
    "initialisation",
    "head_learning_rate": "peak AdamW learning rate of that phase",
    "lr_schedule": "learning rate over the run: cosine decay from --head-learning-rate to 0, "
    "or constant",
    "early_stopping_patience": "stop training after this many epochs without validation "
    "accuracy improvement (0: off)",
    "weight_decay": "decoupled weight decay on the kernels (AdamW)",
    "dtype": "computation dtype; parameters and optimizer state stay float32",
}


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, prog="python -m flaxcnn.experiments.simple_cnn",
                    description=__doc__.splitlines()[0], defaults=DEFAULTS, flags=FLAGS,
                    help_texts=HELP_TEXTS)


if __name__ == "__main__":
    sys.exit(main())
