"""Pretrained weights: file specs, the cache, Keras HDF5 conversion, strict merging.

Nothing here knows a model family: the families list their files (``PretrainedSpec``) in
their own modules, and ``flaxcnn.pretrained`` joins the two.
"""

from flaxcnn.weights.cache import CACHE_ENV, WEIGHTS_ENV, cache_dir, fetch, resolve
from flaxcnn.weights.errors import WeightsError
from flaxcnn.weights.keras_h5 import keras_to_flax, load_keras_h5, read_keras_h5
from flaxcnn.weights.merge import merge_variables
from flaxcnn.weights.registry import PretrainedSpec, find_spec

__all__ = [
    "CACHE_ENV",
    "WEIGHTS_ENV",
    "PretrainedSpec",
    "WeightsError",
    "cache_dir",
    "fetch",
    "find_spec",
    "keras_to_flax",
    "load_keras_h5",
    "merge_variables",
    "read_keras_h5",
    "resolve",
]
