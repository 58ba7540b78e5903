"""``jax.jit`` with flaxcnn's XLA compiler options for the backend it compiles for.

jaxlib (0.8 and later) hands XLA:CPU's dots, convolutions and reductions to YNNPACK. Its
dense convolutions run on one thread: a 3x3 conv of 32x56x56x64 takes the same ~60 ms
forward on one core as on two, while Eigen's threaded convolution, which XLA:CPU uses
without YNNPACK, takes ~30 ms forward and 2.5x less forward+backward. YNNPACK's dots, on the
other hand, beat Eigen's in the backward pass (fine-tuning steps up to 1.4x slower with
YNNPACK off altogether). So on CPU every flaxcnn computation keeps YNNPACK for dots and
reductions and leaves convolutions to Eigen: at batch 32, inference steps of the families
with dense convolutions 7-20% faster, the other families and the fine-tuning steps equal
within the run-to-run spread (experiments/benchmarks/cpu-2core.md).

These are options of each compilation (``jax.jit(..., compiler_options=...)``), not process
flags: they reach flaxcnn's own computations only, never a user's or another framework's. A
user who sets the same option in ``XLA_FLAGS`` keeps theirs; a jaxlib that does not know
the option (one without YNNPACK) gets none.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# YNNPACK's default set less INDIVIDUAL_CONVOLUTION (same HLO as XLA_FLAGS'
# ``-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``, which compiler options do not parse).
CPU_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _jaxlib_accepts(option: str, value: str) -> bool:
    """Whether this jaxlib's XLA:CPU compiles with ``option=value`` (one tiny compilation)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def options(backend: str | None = None) -> dict[str, str]:
    """The compiler options of flaxcnn's computations on ``backend`` (default: JAX's).

    Empty off CPU, where the defaults are right, and for any option that ``XLA_FLAGS`` sets.
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    user_flags = os.environ.get("XLA_FLAGS", "")
    return {option: value for option, value in CPU_OPTIONS.items()
            if option not in user_flags and _jaxlib_accepts(option, value)}  # fmt: skip


def jit(fun: Callable, **jit_kwargs: Any) -> Any:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`options`."""
    return jax.jit(fun, compiler_options=options() or None, **jit_kwargs)
