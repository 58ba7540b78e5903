"""What a benchmark process states about itself: the standard library only.

``compare_keras.py``, its Keras side and its flaxcnn side each import this module from their
own folder, so that the Keras process never imports jax or flaxcnn and still reports the
same facts: which process it is, the cores it may use, its malloc arenas, the settings that
reached it through the environment, and whether jax's native library is loaded in it.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

# Environment variables that change how a framework uses the CPU or memory.
SETTINGS_PREFIXES = ("XLA_", "JAX_", "TF_", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "KMP_",
                     "MKL_", "ONEDNN_", "DNNL_", "KERAS_", "CUDA_VISIBLE_DEVICES")  # fmt: skip


def cores() -> int:
    """The cores this process may run on (its affinity mask, as TensorFlow and XLA count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def append_row(path: str, row: dict[str, Any]) -> None:
    """One JSON line: how each side hands its rows to the coordinator."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or the platform's guess). The same as
    ``flaxcnn.bench.cpu_model``: this module also runs in the Keras process, which must never
    import flaxcnn (or JAX), so it cannot share that one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def malloc_arenas() -> int | None:
    """The number of glibc malloc arenas (``malloc_info``'s heaps), ``None`` off glibc.

    glibc gives each new thread that allocates an arena of its own, up to 8 per core, so a
    multi-threaded runtime under default settings has several; ``M_ARENA_MAX=1`` (flaxcnn's
    ``cli.tune_glibc_malloc``) leaves exactly one for every thread.
    """
    if platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p] * 2
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as report:
        stream = libc.fopen(report.name.encode(), b"w")
        if not stream:
            return None
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        return report.read().count(b"<heap nr=")


def mapped_libraries(fragment: str) -> list[str]:
    """The shared objects mapped into this process whose path contains ``fragment``."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line and fragment in line}
    except OSError:
        return []
    return sorted(paths)


def describe_process(side: str, packages: Sequence[str]) -> dict[str, Any]:
    """This process's identity and the facts that decide whether its timing is its own.

    Args:
      side: ``'flaxcnn'``, ``'keras3'`` or ``'tf_keras'``.
      packages: top-level packages whose presence in ``sys.modules`` is reported.
    """
    settings = {k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIXES)}
    return {
        "side": side,
        "pid": os.getpid(),
        "python": platform.python_version(),
        "cores": cores(),
        "malloc_arenas": malloc_arenas(),
        "settings": dict(sorted(settings.items())),
        "imported": {name: name in sys.modules for name in packages},
        "jaxlib_mapped": bool(mapped_libraries("jaxlib")),
        "load_average": load_average(),
        "time": time.time(),
    }
