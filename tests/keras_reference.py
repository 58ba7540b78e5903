"""Reference Keras models (tf_keras, TensorFlow backend) with random, non-trivial weights.

Parity tests compare a flaxcnn port with Keras given the same weights. Keras's initial
weights are too tame to catch a swapped or missing layer (BatchNorm at mean 0, variance 1,
scale 1, offset 0 is the identity), so every weight is redrawn: norm statistics and scales
around 1, offsets and means around 0, kernels scaled to keep activations of order 1.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def randomize_weights(model, seed: int = 0):
    """Redraws every float weight of a tf_keras ``model`` in place; returns the model.

    Variances and scales (``moving_variance``, ``gamma``) are uniform in [0.5, 1.5]; means,
    offsets and biases centred on 0 with std 0.1; kernels centred with std ``1/sqrt(fan_in)``
    (variance-preserving, so the signal stays of order 1 through a hundred layers). All are
    uniform draws in float32: ~350M normals for the largest models took seconds.
    Weights of other kinds (e.g. a ``Normalization`` layer's statistics) are left alone.
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def uniform(low, high, shape):
        x = rng.random(shape, dtype=f32)
        x *= high - low
        x += low
        return x

    def centred(std, mean, shape):  # uniform with this std: 5x cheaper to draw than normal
        return uniform(mean - std * np.sqrt(3.0), mean + std * np.sqrt(3.0), shape)

    values = []
    for w in model.weights:
        name, shape = w.name.rsplit("/", 1)[-1], tuple(w.shape)
        if name.startswith(("moving_variance", "gamma")):
            value = uniform(0.5, 1.5, shape)
        elif name.startswith(("moving_mean", "beta", "bias")):
            value = centred(0.1, 0.0, shape)
        elif "kernel" in name:
            fan_in = np.prod(shape[:2]) if name.startswith("depthwise") else np.prod(shape[:-1])
            value = centred(1.0 / np.sqrt(fan_in), 0.0, shape)
        else:
            value = w.numpy()
        values.append(value)
    model.set_weights(values)
    return model


def keras_mobilenet_v2(alpha, input_shape, include_top, pooling=None, seed=0, weights=None):
    """A tf_keras MobileNetV2 whose every weight (BN statistics included) is random, unless
    ``weights`` (an .h5 path) is given. Returns logits with the top (no softmax)."""
    import tensorflow as tf
    import tf_keras

    tf.config.set_visible_devices([], "GPU")
    model = tf_keras.applications.MobileNetV2(
        input_shape=input_shape,
        alpha=alpha,
        include_top=include_top,
        weights=None,
        pooling=pooling,
        classifier_activation=None,
    )
    if weights is not None:
        model.load_weights(str(weights))
        return model
    return randomize_weights(model, seed)


def save_legacy_h5(model, path: pathlib.Path) -> pathlib.Path:
    """Writes the legacy Keras HDF5 weights layout (what keras.applications downloads)."""
    model.save_weights(str(path), save_format="h5")
    return path
