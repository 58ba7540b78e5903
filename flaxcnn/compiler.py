"""``jax.jit`` with flaxcnn's XLA compiler options for the backend it compiles for.

jaxlib (0.8 and later) hands XLA:CPU's dots, convolutions and reductions to YNNPACK. Its
dense convolutions run on one thread: a 3x3 conv of 32x56x56x64 takes the same ~60 ms
forward on one core as on two, while Eigen's threaded convolution, which XLA:CPU uses
without YNNPACK, takes ~30 ms forward and 2.5x less forward+backward. YNNPACK's dots, on the
other hand, beat Eigen's in the backward pass (fine-tuning steps up to 1.4x slower with
YNNPACK off altogether), but not in inference steps, which took 0.81-1.01x the time with
their dots left to Eigen as well (per family at batch 32 on the 2-core CPU; without
YNNPACK's reductions too, 0.59-1.28x). So on CPU a computation that is differentiated (a
training step) keeps YNNPACK for dots and reductions and leaves convolutions to Eigen; one
that is not (evaluation, feature caching, predict) keeps YNNPACK for reductions only.
Measured in experiments/benchmarks/cpu-2core.md.

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
# Differentiated: YNNPACK's default set less INDIVIDUAL_CONVOLUTION (same HLO as XLA_FLAGS'
# ``-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``, which compiler options do not parse).
CPU_TRAINING_OPTIONS = {
    YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
CPU_INFERENCE_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _jaxlib_accepts(option: str, value: str) -> bool:
    """Whether this jaxlib's XLA:CPU compiles with ``option=value`` (one tiny compilation)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={option: value}).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def options(backend: str | None = None, *, differentiated: bool = False) -> dict[str, str]:
    """The compiler options of flaxcnn's computations on ``backend`` (default: JAX's), for
    one that runs a backward pass (``differentiated``) or not.

    Empty off CPU, where the defaults are right, and for any option that ``XLA_FLAGS`` sets.
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    user_flags = os.environ.get("XLA_FLAGS", "")
    chosen = CPU_TRAINING_OPTIONS if differentiated else CPU_INFERENCE_OPTIONS
    return {option: value for option, value in chosen.items()
            if option not in user_flags and _jaxlib_accepts(option, value)}  # fmt: skip


def jit(fun: Callable, *, differentiated: bool = False, **jit_kwargs: Any) -> Any:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`options` (``differentiated``: the
    computation takes gradients, e.g. a training step)."""
    chosen = options(differentiated=differentiated) or None
    return jax.jit(fun, compiler_options=chosen, **jit_kwargs)
