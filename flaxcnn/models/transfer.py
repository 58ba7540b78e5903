"""A pretrained backbone with a new classification head, for transfer learning.

Architecture (the TensorFlow transfer-learning tutorial's): backbone -> global average pooling
(done by the backbone, ``pooling='avg'``) -> dropout -> dense logits. The head always emits
``num_classes`` logits trained with softmax cross-entropy; for two classes this is the same
model family as the tutorial's single sigmoid logit (the sigmoid of the logit difference).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class TransferClassifier(nn.Module):
    """``backbone(x) -> dropout -> Dense(num_classes)``; variables ``backbone/...`` and ``head``.

    Attributes:
      backbone: a module mapping images to feature vectors ``[N, C]`` whose ``__call__`` takes
        ``train`` (e.g. ``MobileNetV2(include_top=False, pooling='avg')``).
      num_classes: logits of the new head.
      dropout_rate: dropout on the pooled features while training.
      freeze_backbone_batch_norm: run the backbone's BatchNorm on its running averages, and
        never update them, even when ``train=True``. Keras's rule for fine-tuning: a small new
        dataset's batch statistics would overwrite the ImageNet ones the frozen (and the
        unfrozen) layers were trained against and wreck what was learned. It is a model flag,
        not a consequence of the optimiser's freeze mask, because BatchNorm statistics are
        not gradients.
      dtype: computation dtype of the head.
    """

    backbone: nn.Module
    num_classes: int
    dropout_rate: float = 0.2
    freeze_backbone_batch_norm: bool = True
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.dropout = nn.Dropout(self.dropout_rate)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def features(self, x: jax.Array, train: bool = False, **stages: int) -> jax.Array:
        """Backbone features ``[N, C]``; what the feature cache stores.

        ``stages`` (``start``/``stop``) run part of a backbone that can be cut into stages
        (``MobileNetV2``): ``stop=k`` gives the activation that ``start=k`` continues from.
        """
        return self.backbone(x, train=train and not self.freeze_backbone_batch_norm, **stages)

    def classify_features(self, features: jax.Array, train: bool = False) -> jax.Array:
        """Head logits from backbone features."""
        return self.head(self.dropout(features, deterministic=not train))

    def __call__(self, x: jax.Array, train: bool = False, **stages: int) -> jax.Array:
        """Logits from images (or, with ``start=k``, from the activation entering stage ``k``)."""
        return self.classify_features(self.features(x, train, **stages), train)
