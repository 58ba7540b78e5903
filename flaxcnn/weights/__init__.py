"""Pretrained weights: the published-file registry, the cache, Keras HDF5 conversion, merging."""

from flaxcnn.weights.cache import CACHE_ENV, WEIGHTS_ENV, cache_dir, fetch, resolve
from flaxcnn.weights.errors import WeightsError
from flaxcnn.weights.keras_h5 import keras_to_flax, load_keras_h5, read_keras_h5
from flaxcnn.weights.merge import merge_variables
from flaxcnn.weights.registry import SPECS, PretrainedSpec, find_spec

__all__ = [
    "CACHE_ENV",
    "SPECS",
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
