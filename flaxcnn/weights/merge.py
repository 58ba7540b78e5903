"""Merge loaded (pretrained) variables into a model's initial variables, strictly.

Silent partial loads are the classic transfer-learning bug (timm's ``strict=False``, Keras's
``skip_mismatch``): a run trains for hours on random layers. Here every variable of the model
must come from the file and every array of the file must land in the model with the right
shape, except paths matched by ``dont_load`` (the classifier, when the caller asked for a new
head), which keep their initial values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from flaxcnn.weights.errors import WeightsError


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """Leaves by key path in model order, ``params`` first (so errors name the earliest layer).

    Paths stay tuples: Keras layer names may themselves hold ``/`` (``expanded_conv/expand``),
    so a joined string could not be split back.
    """
    ordered = sorted(tree, key=lambda collection: collection != "params")
    return {
        (collection, *k): v
        for collection in ordered
        for k, v in traverse_util.flatten_dict(dict(tree[collection])).items()
    }


def merge_variables(
    init_variables: Mapping[str, Any],
    loaded_variables: Mapping[str, Any],
    *,
    dont_load: Sequence[str] = (),
    source: str = "weights file",
) -> dict[str, Any]:
    """Returns ``init_variables`` with every leaf replaced by its loaded counterpart.

    Args:
      init_variables: the model's variables (``{'params': ..., 'batch_stats': ...}``); only
        their structure, shapes and dtypes are used, except for ``dont_load`` paths.
      loaded_variables: converted file contents with the same structure.
      dont_load: regexes over ``/``-joined paths (``'params/predictions/kernel'``) that keep
        their initial values and may be absent from, or shaped differently in, the file.
      source: how to name the file in error messages.

    Returns:
      Variables with the structure of ``init_variables`` (numpy/jax leaves, init dtypes).

    Raises:
      WeightsError: naming the first mismatching layer, with every missing, unexpected and
        wrong-shape path counted.
    """
    patterns = [re.compile(p) for p in dont_load]
    skip = lambda key: any(p.fullmatch("/".join(key)) for p in patterns)
    init_flat = _flat(init_variables)
    loaded_flat = _flat(loaded_variables)
    name = lambda key: "/".join(key)

    missing = [p for p in init_flat if p not in loaded_flat and not skip(p)]
    unexpected = [p for p in loaded_flat if p not in init_flat and not skip(p)]
    wrong_shape = [
        (p, tuple(np.shape(loaded_flat[p])), tuple(np.shape(init_flat[p])))
        for p in init_flat
        if p in loaded_flat and not skip(p) and np.shape(loaded_flat[p]) != np.shape(init_flat[p])
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if wrong_shape:
            path, got, want = wrong_shape[0]
            problems.append(
                f"layer {name(path)!r} has shape {got} in the file but {want} in the model"
            )
        if missing:
            problems.append(f"layer {name(missing[0])!r} is missing from the file")
        if unexpected:
            problems.append(f"the file has {name(unexpected[0])!r}, which the model does not")
        raise WeightsError(
            f"{source} does not fit the model: {'; '.join(problems)} "
            f"({len(wrong_shape)} wrong-shape, {len(missing)} missing, {len(unexpected)} "
            "unexpected); is it for another architecture, alpha or include_top setting?"
        )

    merged = {
        path: init if skip(path) else np.asarray(loaded_flat[path], dtype=init.dtype)
        for path, init in init_flat.items()
    }
    return traverse_util.unflatten_dict(merged)
