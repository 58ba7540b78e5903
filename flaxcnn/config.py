"""The one run configuration: every choice a training run makes, validated, JSON round-trip.

Only ``train.fit`` and the CLIs read it; functions below take explicit arguments. Each run
writes it to ``workdir/config.json``, and recorded experiments keep theirs beside their results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from flaxcnn.models import ALPHAS, CONV_IMPLS

DTYPES = ("float32", "bfloat16")
MODELS = ("mobilenet_v2", "simple_cnn")
FEATURE_CACHE = ("auto", "on", "off")
LR_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """An invalid setting; the message names the flag and the allowed values."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Field names are the CLI flags with ``_`` for ``-``.

    Defaults are the transfer recipe (see README "Default recipe" for why each value).
    """

    # Data.
    data: str = "cats_vs_dogs"
    data_dir: str | None = None
    download: bool = True
    image_size: int = 160
    batch_size: int = 32
    augment: bool = True
    validation_fraction: float = 0.2
    # Model.
    model: str = "mobilenet_v2"
    alpha: float = 1.0
    weights: str | None = "imagenet"
    dropout_rate: float = 0.2
    dtype: str = "float32"
    conv_impl: str = "auto"
    # Phase 1 (transfer: feature extraction; simple_cnn: the only phase).
    head_epochs: int | None = None  # None: 50 on cached features, else 10
    head_learning_rate: float = 1e-2
    feature_cache: str = "auto"
    early_stopping_patience: int = 0
    # Phase 2: fine-tuning.
    finetune_epochs: int = 10
    finetune_learning_rate: float = 5e-5
    finetune_head_learning_rate: float = 1e-3
    fine_tune_at: str = "100"
    lr_schedule: str = "cosine"  # per phase: from the phase's learning rate to 0
    weight_decay: float = 0.1  # AdamW, trainable kernels: keeps the cached-feature head calibrated
    # Run.
    seed: int = 0
    workdir: str | None = None
    keep_checkpoints: int = 3
    checkpoint_every_seconds: float = 30.0  # 0: every epoch (see README "Checkpoints")
    log_every: int = 10

    def __post_init__(self) -> None:
        def check(ok: bool, flag: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, flag.replace("-", "_"))
                raise ConfigError(f"--{flag} {value!r} is invalid; allowed: {allowed}")

        check(self.model in MODELS, "model", ", ".join(MODELS))
        check(self.image_size >= 32, "image-size", "an integer >= 32")
        check(self.batch_size >= 1, "batch-size", "a positive integer")
        check(0.0 < self.validation_fraction < 1.0, "validation-fraction", "0 < f < 1")
        check(self.model != "mobilenet_v2" or self.alpha in ALPHAS, "alpha", str(ALPHAS))
        check(0.0 <= self.dropout_rate < 1.0, "dropout-rate", "0 <= rate < 1")
        check(self.dtype in DTYPES, "dtype", ", ".join(DTYPES))
        check(self.conv_impl in CONV_IMPLS, "conv-impl", ", ".join(CONV_IMPLS))
        check(self.head_epochs is None or self.head_epochs >= 0, "head-epochs",
              "an integer >= 0")
        check(self.finetune_epochs >= 0, "finetune-epochs", "an integer >= 0")
        # `inf` passes `> 0`, and would train on NaN weights from the first step on.
        positive = lambda x: 0 < x < math.inf
        check(positive(self.head_learning_rate), "head-learning-rate", "a positive number")
        check(positive(self.finetune_learning_rate), "finetune-learning-rate",
              "a positive number")
        check(positive(self.finetune_head_learning_rate), "finetune-head-learning-rate",
              "a positive number")
        check(self.lr_schedule in LR_SCHEDULES, "lr-schedule", ", ".join(LR_SCHEDULES))
        check(self.feature_cache in FEATURE_CACHE, "feature-cache", ", ".join(FEATURE_CACHE))
        check(self.early_stopping_patience >= 0, "early-stopping-patience", "an integer >= 0")
        check(0 <= self.weight_decay < math.inf, "weight-decay", "a number >= 0")
        check(0 <= self.checkpoint_every_seconds < math.inf, "checkpoint-every-seconds",
              "a number >= 0")
        check(self.keep_checkpoints >= 1, "keep-checkpoints", "an integer >= 1")
        check(self.log_every >= 1, "log-every", "an integer >= 1")
        if self.model == "simple_cnn":
            check(self.weights is None, "weights", "none (simple_cnn trains from scratch)")
        else:  # a bad layer should fail here, not after the first phase has trained
            from flaxcnn.optim import fine_tune_layer

            try:
                fine_tune_layer(self.fine_tune_at, self.alpha)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    @property
    def compute_dtype(self) -> Any:
        """The dtype the model computes in (parameters stay float32)."""
        import jax.numpy as jnp

        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def model_config(self, num_classes: int) -> dict[str, Any]:
        """The ``models.build_model`` config of this run's model (saved in checkpoints)."""
        if self.model == "simple_cnn":
            return {"arch": "simple_cnn", "num_classes": num_classes,
                    "dropout_rate": self.dropout_rate}  # fmt: skip
        return {
            "arch": "transfer",
            "backbone": {"arch": "mobilenet_v2", "alpha": self.alpha, "include_top": False,
                         "pooling": "avg"},
            "num_classes": num_classes,
            "dropout_rate": self.dropout_rate,
            "freeze_backbone_batch_norm": True,
        }  # fmt: skip

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = json.loads(text)
        unknown = set(values) - fields
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")
