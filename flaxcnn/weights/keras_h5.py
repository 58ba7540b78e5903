"""Keras HDF5 weight files -> Flax ``{'params', 'batch_stats'}``, with h5py alone.

Reads the legacy layout that ``keras.applications`` downloads and that Keras 2's
``save_weights('x.h5')`` / ``model.save('x.h5')`` write: a root (or ``model_weights``) group
with attribute ``layer_names``; one group per layer with attribute ``weight_names``; datasets
named ``<layer>/<weight>:0``. Keras loads such files by layer order; we load by name, which
is what lets a mismatch be reported precisely.

Layout transforms (all of them live here):
  - ``kernel`` of Conv2D/Dense: same layout in Flax (HWIO / IO).
  - ``depthwise_kernel`` ``(kh, kw, C, 1)`` -> Flax depthwise ``kernel`` ``(kh, kw, 1, C)``.
  - BatchNormalization ``gamma``/``beta`` -> params ``scale``/``bias``;
    ``moving_mean``/``moving_variance`` -> batch_stats ``mean``/``var``.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from flaxcnn.weights.errors import WeightsError

# Keras weight name -> (Flax collection, Flax name).
_WEIGHT_MAP = {
    "kernel": ("params", "kernel"),
    "depthwise_kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reads every layer's weights from a legacy Keras HDF5 file.

    Args:
      path: a ``.h5`` weights file or full-model file.

    Returns:
      ``{layer_name: {weight_name: array}}`` in file order, weight names without the layer
      prefix and ``:0`` suffix (``{'block_1_depthwise': {'depthwise_kernel': ...}}``);
      layers without weights are left out.

    Raises:
      WeightsError: the file is missing, truncated, not HDF5, or not in the Keras layout.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist; pass an existing .h5 file")
    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            if "layer_names" not in group.attrs:
                raise WeightsError(
                    f"{path} is HDF5 but not a Keras weights file (no 'layer_names' attribute); "
                    "pass a file saved by Keras or downloaded by keras.applications"
                )
            layers: dict[str, dict[str, np.ndarray]] = {}
            for layer_name in map(_text, group.attrs["layer_names"]):
                layer_group = group[layer_name]
                weights = {}
                for full_name in map(_text, layer_group.attrs.get("weight_names", [])):
                    short = full_name.rsplit("/", 1)[-1].split(":", 1)[0]
                    weights[short] = np.asarray(layer_group[full_name])
                if weights:
                    layers[layer_name] = weights
            return layers
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(
            f"{path} is not a readable Keras HDF5 file ({reason}); it may be truncated or "
            "corrupt: pass a complete copy"
        ) from None


def keras_to_flax(layers: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Converts :func:`read_keras_h5` output into Flax variables keyed by Keras layer name.

    Args:
      layers: ``{layer_name: {weight_name: array}}``.

    Returns:
      ``{'params': {layer: {...}}, 'batch_stats': {layer: {...}}}`` (``batch_stats`` only
      when the file has BatchNorm layers).

    Raises:
      WeightsError: a weight kind this converter does not know (e.g. an RNN cell).
    """
    variables: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    for layer_name, weights in layers.items():
        for weight_name, value in weights.items():
            if weight_name not in _WEIGHT_MAP:
                raise WeightsError(
                    f"layer {layer_name!r} has weight {weight_name!r}, which flaxcnn cannot "
                    f"convert (known: {sorted(_WEIGHT_MAP)})"
                )
            collection, flax_name = _WEIGHT_MAP[weight_name]
            if weight_name == "depthwise_kernel":
                if value.shape[-1] != 1:
                    raise WeightsError(
                        f"layer {layer_name!r}: depthwise multiplier {value.shape[-1]} is not "
                        "supported (the registered models use 1)"
                    )
                value = np.transpose(value, (0, 1, 3, 2))
            variables[collection].setdefault(layer_name, {})[flax_name] = value
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    return variables


def load_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``keras_to_flax(read_keras_h5(path))``."""
    return keras_to_flax(read_keras_h5(path))
