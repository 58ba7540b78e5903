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
    ``moving_mean``/``moving_variance`` -> batch_stats ``mean``/``var``. LayerNormalization's
    ``gamma``/``beta`` and any other ``gamma`` (a learned per-channel ``LayerScale``) map the
    same way.

Layout rules for models Keras builds from pieces:
  - A nested model (a ``Sequential`` used as one layer, such as a stem ``<model>_stem``) is one
    group in the file whose weights are named after its own layers (``<model>_stem_conv/
    kernel:0``): they become a Flax submodule per inner layer,
    ``params/<model>_stem/<model>_stem_conv/kernel``, so the outer Keras layer stays the unit
    that freeze rules select.
  - Layers Keras names itself carry a per-session counter (``layer_normalization_3``: the
    class name in snake_case, numbered from the second instance of a session on), so the same
    model saved in two sessions names them differently. A file's only layer of such a name is
    keyed by the name without the counter (``layer_normalization``), as the layer lists of
    ``flaxcnn.models`` give it; two of one class are left as they are (no guessing).
"""

from __future__ import annotations

import collections
import os
import re
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


# Keras's automatic names of the weighted layer classes (``backend.unique_object_name`` of the
# class name in snake_case): the base name, then ``_1``, ``_2``, ... within one session.
_AUTO_NAMED = re.compile(
    r"(batch_normalization|conv2d|dense|depthwise_conv2d|layer_normalization)(_\d+)?"
)


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _weight_key(layer_name: str, full_name: str) -> str:
    """``'<layer>/kernel:0'`` -> ``'kernel'``; a nested model's ``'<inner>/kernel:0'`` ->
    ``'<inner>/kernel'`` (the inner layer's name kept, see the module docstring)."""
    owner, _, short = full_name.rpartition("/")
    short = short.split(":", 1)[0]
    if not owner or owner == layer_name or owner.endswith("/" + layer_name):
        return short
    return f"{owner}/{short}"


def _without_session_counters(names: list[str]) -> dict[str, str]:
    """File layer name -> the name to key it by (see the module docstring)."""
    bases = [m.group(1) if (m := _AUTO_NAMED.fullmatch(name)) else None for name in names]
    counts = collections.Counter(base for base in bases if base)
    return {name: base if base and counts[base] == 1 else name
            for name, base in zip(names, bases, strict=True)}  # fmt: skip


def read_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reads every layer's weights from a legacy Keras HDF5 file.

    Args:
      path: a ``.h5`` weights file or full-model file.

    Returns:
      ``{layer_name: {weight_name: array}}`` in file order, weight names without the layer
      prefix and ``:0`` suffix (``{'block_1_depthwise': {'depthwise_kernel': ...}}``); a
      nested model's weights keep their inner layer's name
      (``{'<model>_stem': {'<model>_stem_conv/kernel': ...}}``); layers without weights are
      left out.

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
                    weights[_weight_key(layer_name, full_name)] = np.asarray(layer_group[full_name])
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
      when the file has BatchNorm layers); a nested model's inner layers one level down, and
      auto-named layers without their session counter (see the module docstring).

    Raises:
      WeightsError: a weight kind this converter does not know (e.g. an RNN cell).
    """
    variables: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    keyed_as = _without_session_counters(list(layers))
    for file_name, weights in layers.items():
        layer_name = keyed_as[file_name]
        for key, value in weights.items():
            inner, _, weight_name = key.rpartition("/")
            where = f"{file_name}/{inner}" if inner else file_name
            if weight_name not in _WEIGHT_MAP:
                raise WeightsError(
                    f"layer {where!r} has weight {weight_name!r}, which flaxcnn cannot "
                    f"convert (known: {sorted(_WEIGHT_MAP)})"
                )
            collection, flax_name = _WEIGHT_MAP[weight_name]
            if weight_name == "depthwise_kernel":
                if value.shape[-1] != 1:
                    raise WeightsError(
                        f"layer {where!r}: depthwise multiplier {value.shape[-1]} is not "
                        "supported (the registered models use 1)"
                    )
                value = np.transpose(value, (0, 1, 3, 2))
            target = variables[collection].setdefault(layer_name, {})
            if inner:
                target = target.setdefault(inner, {})
            target[flax_name] = value
    if not variables["batch_stats"]:
        del variables["batch_stats"]
    return variables


def load_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``keras_to_flax(read_keras_h5(path))``."""
    return keras_to_flax(read_keras_h5(path))
