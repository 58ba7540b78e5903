"""The one run configuration: every choice a training run makes, validated, JSON round-trip.

Only ``run.fit`` and the CLIs read it; functions below take explicit arguments. Each run
writes it, with the model's defaults filled in (:meth:`TrainConfig.resolved`), to
``workdir/config.json``; recorded experiments keep theirs beside their results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from flaxcnn import models
from flaxcnn.models import CONV_IMPLS
from flaxcnn.tta import MODES as TTA_MODES

DTYPES = ("float32", "bfloat16")
FEATURE_CACHE = ("auto", "on", "off")
LR_SCHEDULES = ("cosine", "constant")
CLASS_WEIGHTS = ("none", "balanced")
# The head recipe where the head phase cannot search it (no cached features, or a model
# trained from scratch): an unset field takes these (README "Default recipe").
DEFAULT_HEAD_RECIPE = {"head_learning_rate": 1e-2, "weight_decay": 0.1}


class ConfigError(ValueError):
    """An invalid setting; the message names the flag and the allowed values."""


def model_names() -> tuple[str, ...]:
    """Every ``--model``: the registered backbones, then the from-scratch models."""
    return (*models.list_models(), *models.SCRATCH_MODELS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Field names are the CLI flags with ``_`` for ``-``.

    Defaults are the transfer recipe (see README "Default recipe" for why each value).
    ``None`` for ``image_size`` and ``fine_tune_at`` means the model's own default (the
    resolution its weights were trained at; its contract's fine-tuning point). ``None`` for
    ``head_learning_rate`` and ``weight_decay`` means the head phase picks it on the cached
    features (``flaxcnn.head_search``; the run records the pick), or takes
    :data:`DEFAULT_HEAD_RECIPE`'s where it cannot.
    """

    # Data.
    data: str = "cats_vs_dogs"
    data_dir: str | None = None
    download: bool = True
    image_size: int | None = None
    batch_size: int = 32
    augment: bool = True
    validation_fraction: float = 0.2
    class_weight: str = "none"  # 'balanced': the training loss weighs classes n / (k * n_c)
    # Model.
    model: str = models.DEFAULT_MODEL
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = "imagenet"
    dropout_rate: float = 0.2
    dtype: str = "float32"
    conv_impl: str = "auto"
    # Phase 1 (transfer: feature extraction; from-scratch models: the only phase).
    head_epochs: int | None = None  # None: 50 on cached features, else 10
    head_learning_rate: float | None = None  # None: searched (see the docstring)
    feature_cache: str = "auto"
    early_stopping_patience: int = 0
    # Phase 2: fine-tuning.
    # 3 at the weights' own resolution: as accurate on cats vs dogs as 5 or 10, and the whole
    # default run within half the Keras recipe's time (experiments/transfer_cats_vs_dogs)
    finetune_epochs: int = 3
    finetune_learning_rate: float = 5e-5
    finetune_head_learning_rate: float = 1e-3
    fine_tune_at: str | None = None
    lr_schedule: str = "cosine"  # per phase: from the phase's learning rate to 0
    weight_decay: float | None = None  # AdamW on trainable kernels; None: searched
    finetune_weight_decay: float | None = None  # None: --weight-decay if given, else 0.1
    tta: str = "none"  # test-time augmentation of validation, test and predict (flaxcnn.tta)
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

        if self.model not in models.SCRATCH_MODELS:
            try:
                # Keras's names are accepted too; the config records the registered one.
                object.__setattr__(self, "model", models.get_backbone(self.model).name)
            except models.UnknownModelError as e:
                raise ConfigError(f"--model: {e}") from None
        object.__setattr__(self, "model_options", dict(self.model_options))
        check(self.image_size is None or self.image_size >= 32, "image-size", "an integer >= 32")
        check(self.batch_size >= 1, "batch-size", "a positive integer")
        check(0.0 < self.validation_fraction < 1.0, "validation-fraction", "0 < f < 1")
        check(0.0 <= self.dropout_rate < 1.0, "dropout-rate", "0 <= rate < 1")
        check(self.dtype in DTYPES, "dtype", ", ".join(DTYPES))
        check(self.conv_impl in CONV_IMPLS, "conv-impl", ", ".join(CONV_IMPLS))
        check(self.head_epochs is None or self.head_epochs >= 0, "head-epochs",
              "an integer >= 0")  # fmt: skip
        check(self.finetune_epochs >= 0, "finetune-epochs", "an integer >= 0")
        # `inf` passes `> 0`, and would train on NaN weights from the first step on.
        positive = lambda x: 0 < x < math.inf
        check(self.head_learning_rate is None or positive(self.head_learning_rate),
              "head-learning-rate", "a positive number")  # fmt: skip
        check(positive(self.finetune_learning_rate), "finetune-learning-rate",
              "a positive number")  # fmt: skip
        check(positive(self.finetune_head_learning_rate), "finetune-head-learning-rate",
              "a positive number")  # fmt: skip
        check(self.lr_schedule in LR_SCHEDULES, "lr-schedule", ", ".join(LR_SCHEDULES))
        check(self.feature_cache in FEATURE_CACHE, "feature-cache", ", ".join(FEATURE_CACHE))
        check(self.early_stopping_patience >= 0, "early-stopping-patience", "an integer >= 0")
        for flag in ("weight-decay", "finetune-weight-decay"):
            value = getattr(self, flag.replace("-", "_"))
            check(value is None or 0 <= value < math.inf, flag, "a number >= 0")
        check(self.tta in TTA_MODES, "tta", ", ".join(TTA_MODES))
        check(self.class_weight in CLASS_WEIGHTS, "class-weight", ", ".join(CLASS_WEIGHTS))
        check(0 <= self.checkpoint_every_seconds < math.inf, "checkpoint-every-seconds",
              "a number >= 0")  # fmt: skip
        check(self.keep_checkpoints >= 1, "keep-checkpoints", "an integer >= 1")
        check(self.log_every >= 1, "log-every", "an integer >= 1")
        if self.backbone is None:
            check(self.weights is None, "weights", f"none ({self.model} trains from scratch)")
            check(not self.model_options, "model-options", f"none for {self.model}")
            return
        backbone = self.backbone
        for key, value in self.model_options.items():
            allowed = backbone.options.get(key)
            if allowed is None:
                having = [b.name for b in models.BACKBONES.values() if key in b.options]
                raise ConfigError(f"--{key.replace('_', '-')} applies to {', '.join(having)}, "
                                  f"not {self.model}")  # fmt: skip
            if value not in allowed:
                listed = ", ".join(map(str, allowed))
                raise ConfigError(f"--{key.replace('_', '-')} {value!r} is invalid for "
                                  f"{self.model}; allowed: {listed}")  # fmt: skip
        if self.image_size is not None and self.image_size < backbone.min_input_size:
            check(False, "image-size", f"an integer >= {backbone.min_input_size}")
        try:  # a bad layer should fail here, not after the first phase has trained
            backbone.fine_tune_layer(self.resolved_fine_tune_at, **self.model_options)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def backbone(self) -> models.Backbone | None:
        """The pretrained model's contract (``None`` for a from-scratch model)."""
        return None if self.model in models.SCRATCH_MODELS else models.get_backbone(self.model)

    @property
    def options(self) -> dict[str, Any]:
        """The model's options, defaults filled in."""
        return {} if self.backbone is None else self.backbone.check_options(self.model_options)

    @property
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        if self.backbone is None:
            raise ConfigError(f"--image-size is required for {self.model}")
        return self.backbone.default_input_size

    @property
    def resolved_fine_tune_at(self) -> str:
        if self.fine_tune_at is not None:
            return str(self.fine_tune_at)
        return self.backbone.default_fine_tune_at if self.backbone else ""

    @property
    def resolved_finetune_weight_decay(self) -> float:
        """Fine-tuning's decay: its own, else ``--weight-decay``'s if given, else the default
        (a decay the head phase searches is the head phase's alone)."""
        for value in (self.finetune_weight_decay, self.weight_decay):
            if value is not None:
                return value
        return DEFAULT_HEAD_RECIPE["weight_decay"]

    @property
    def head_on_cached_features(self) -> bool:
        """Whether the head phase trains on cached backbone features (README "Default
        recipe": always, unless ``feature_cache='off'`` or there is no head phase)."""
        return self.backbone is not None and (
            self.feature_cache == "on" or (self.feature_cache == "auto" and self.head_epochs != 0)
        )

    def head_recipe(self) -> dict[str, float]:
        """The head recipe in force: the given (or picked) values, :data:`DEFAULT_HEAD_RECIPE`'s
        for unset ones."""
        return {field: default if getattr(self, field) is None else getattr(self, field)
                for field, default in DEFAULT_HEAD_RECIPE.items()}  # fmt: skip

    @property
    def searches_head_recipe(self) -> bool:
        """Whether the head phase picks the unset fields of its recipe (on cached features)."""
        unset = any(getattr(self, field) is None for field in DEFAULT_HEAD_RECIPE)
        return unset and self.head_on_cached_features and self.head_epochs != 0

    def resolved(self) -> TrainConfig:
        """This config with the model's defaults written in (what ``config.json`` records);
        the head recipe stays unset where the head phase will search it."""
        recipe = {} if self.searches_head_recipe else {
            field: value for field, value in DEFAULT_HEAD_RECIPE.items()
            if getattr(self, field) is None}  # fmt: skip
        return self.replace(
            image_size=self.resolved_image_size,
            fine_tune_at=self.resolved_fine_tune_at or None,
            model_options=self.options,
            finetune_weight_decay=self.resolved_finetune_weight_decay,
            **recipe,
        )

    @property
    def compute_dtype(self) -> Any:
        """The dtype the model computes in (parameters stay float32)."""
        import jax.numpy as jnp

        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def model_config(self, num_classes: int) -> dict[str, Any]:
        """The ``models.build_model`` config of this run's model (saved in checkpoints)."""
        if self.backbone is None:
            return {"arch": self.model, "num_classes": num_classes,
                    "dropout_rate": self.dropout_rate}  # fmt: skip
        return {
            "arch": "transfer",
            "backbone": self.backbone.model_config(include_top=False, pooling="avg",
                                                   **self.options),
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
        """Reads ``config.json`` (also those written before family options moved into
        ``model_options``, e.g. a top-level ``alpha``); its run record (``invocations``,
        see ``flaxcnn.resume.write_record``) is not part of the config."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = json.loads(text)
        values.pop("invocations", None)
        # What ran before these fields existed: no TTA, one decay for both phases.
        values.setdefault("tta", "none")
        values.setdefault("finetune_weight_decay", values.get("weight_decay"))
        options = {name for backbone in models.BACKBONES.values() for name in backbone.options}
        moved = {k: values.pop(k) for k in list(values) if k in options - fields}
        if moved:
            values["model_options"] = {**moved, **values.get("model_options", {})}
        unknown = set(values) - fields
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")
