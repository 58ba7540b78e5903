"""TensorFlow for the host side of a run (tf.data, image decoding, TensorBoard events):
imported once, quietly, with its GPUs hidden so that JAX keeps the accelerator memory.

TensorFlow's C++ libraries print start-up lines to file descriptor 2 while they load
(oneDNN, CUDA stubs, ``cuInit``, absl's "before absl::InitializeLog()" warning) whatever
``TF_CPP_MIN_LOG_LEVEL`` says, and decode errors later (``jpeg_mem.cc`` for a truncated JPEG)
unless it is 3. flaxcnn reports every problem in its own one-line messages, so:

- ``TF_CPP_MIN_LOG_LEVEL`` defaults to 3 (set by ``import flaxcnn``, before JAX loads: XLA's
  logging, which TensorFlow's then goes through, reads it once; a value you set is kept, 0
  shows everything);
- the import writes fd 2 into a temporary file, shown only if the import fails or
  ``TF_CPP_MIN_LOG_LEVEL`` is 0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

_IMPORT_LOCK = threading.Lock()  # fd 2 is process-wide: one redirected import at a time


@functools.cache
def tensorflow() -> Any:
    """The ``tensorflow`` module, imported quietly, GPUs hidden from it."""
    failure = None
    with _IMPORT_LOCK:
        with _stderr_captured() as captured:
            try:
                import tensorflow as tf

                # RuntimeError: the caller already initialised TF's devices; leave them be.
                with contextlib.suppress(RuntimeError):
                    tf.config.set_visible_devices([], "GPU")
            except BaseException as e:  # shown below, with what TensorFlow printed
                failure = e
        if failure is not None or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
            sys.stderr.write(captured[0])
    if failure is not None:
        raise failure
    return tf


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Points fd 2 at a temporary file; the yielded list gets the text written meanwhile."""
    text: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text.append(captured.read().decode(errors="replace"))
