"""SimpleCNN: the classic conv -> ReLU -> max-pool stacks followed by dense layers.

With the defaults it is the seed project's PyTorch network (532,202 parameters for 32x32 RGB
inputs and 10 classes); the flatten size follows from the input shape instead of a
hard-coded ``32 * 8 * 8``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class SimpleCNN(nn.Module):
    """``[conv3x3(pad 1) -> ReLU -> maxpool 2] * len(features) -> flatten -> dense -> logits``.

    Attributes:
      num_classes: output logits.
      features: channels of each conv stage.
      dense_features: width of the hidden dense layers.
      dropout_rate: dropout before the classifier (0 in the seed network).
      dtype: computation dtype.
    """

    num_classes: int = 10
    features: Sequence[int] = (16, 32)
    dense_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images ``[N, H, W, C]`` to logits ``[N, num_classes]``."""
        for i, width in enumerate(self.features):
            pad = ((1, 1), (1, 1))
            conv = nn.Conv(width, (3, 3), padding=pad, dtype=self.dtype, name=f"conv_{i}")
            x = conv(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.dense_features):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="predictions")(x)
