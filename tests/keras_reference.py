"""Builds reference Keras MobileNetV2 models (tf_keras, TensorFlow backend) for parity tests."""

from __future__ import annotations

import os
import pathlib

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
    rng = np.random.default_rng(seed)
    randomized = []
    for w in model.weights:
        name = w.name
        if "moving_variance" in name or "gamma" in name:
            value = rng.uniform(0.5, 1.5, w.shape)
        elif "moving_mean" in name or "beta" in name or "bias" in name:
            value = rng.normal(0.0, 0.1, w.shape)
        else:  # kernels: variance-preserving scale keeps activations of order 1 through 50 layers
            fan_in = np.prod(w.shape[:-1]) if "depthwise" not in name else np.prod(w.shape[:2])
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), w.shape)
        randomized.append(value.astype(np.float32))
    model.set_weights(randomized)
    return model


def save_legacy_h5(model, path: pathlib.Path) -> pathlib.Path:
    """Writes the legacy Keras HDF5 weights layout (what keras.applications downloads)."""
    model.save_weights(str(path), save_format="h5")
    return path
