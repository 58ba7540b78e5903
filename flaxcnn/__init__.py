"""flaxcnn: CNN image classifiers and transfer learning in JAX/Flax."""

from __future__ import annotations

import os

# TensorFlow (tf.data) and XLA print C++ log lines straight to stderr; flaxcnn reports problems
# in its own one-line messages. XLA reads this when JAX loads, so it is set here, the first
# flaxcnn code any entry point runs, and only when unset: a value you set is kept (0 shows
# everything). See flaxcnn/tf_runtime.py.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def __getattr__(name: str) -> str:
    # The version is the installed package's (pyproject.toml is its one source), read on
    # first use rather than at import: importing flaxcnn does no I/O.
    if name == "__version__":
        import importlib.metadata

        try:
            return importlib.metadata.version("flaxcnn")
        except importlib.metadata.PackageNotFoundError:  # a source tree that was not installed
            return "0+unknown"
    raise AttributeError(f"module 'flaxcnn' has no attribute {name!r}")
