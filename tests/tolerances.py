"""Float comparisons whose bound is derived from what is compared, not picked to pass.

A bound is ``rtol * scale``: ``scale`` is the magnitude of the compared values (by default the
expected value's largest magnitude), or of what produced the difference (for parameters after
training steps: the size of the update, learning rate x steps for Adam, not the parameter's);
``rtol`` counts float32 roundings (``F32_EPS`` each, times the reduction terms that can round
differently) and leaves a margin over what was measured, so the test holds on any x86-64 CPU
(XLA, oneDNN and Eigen pick other kernels, hence other summation orders, on AVX2 and AVX-512)
and still fails on a real bug (a wrong layer or constant, per-device statistics: errors of
order 1e-3 to 1 of the scale). Each call site says why its ``rtol`` is what it is.

``FLAXCNN_TOLERANCE_LOG=FILE`` appends one JSON line per check (test, what, measured fraction
of the scale, bound), so the margins can be re-measured on another machine::

    FLAXCNN_TOLERANCE_LOG=/tmp/tol.jsonl python -m pytest -q tests
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7: one float32 rounding is <= EPS/2 relative


def max_abs(tree) -> float:
    """The largest magnitude over every leaf of a pytree (or an array, or a list of numbers)."""
    leaves = [np.abs(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
    return max((float(np.max(x, initial=0.0)) for x in leaves), default=0.0)


def max_diff(a, b) -> float:
    """The largest elementwise difference between two pytrees of the same structure."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), (len(leaves_a), len(leaves_b))
    diffs = []
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        diffs.append(float(np.max(np.abs(x - y), initial=0.0)))
    return max(diffs, default=0.0)


def assert_within(diff: float, rtol: float, scale: float, what: str) -> None:
    """``diff <= rtol * scale``, for a difference measured elsewhere (e.g. in a subprocess)."""
    diff, rtol, scale = float(diff), float(rtol), float(scale)  # NumPy scalars too
    bound = rtol * scale
    log = os.environ.get("FLAXCNN_TOLERANCE_LOG")
    if log:
        row = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "what": what,
               "diff": diff, "scale": scale, "measured": diff / scale if scale else None,
               "rtol": rtol, "margin": bound / diff if diff else None}  # fmt: skip
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert diff <= bound, (
        f"{what}: max |difference| {diff:.3g} exceeds {rtol:.3g} x {scale:.3g} = {bound:.3g} "
        f"(measured {diff / scale if scale else float('inf'):.3g} of the scale)"
    )


def assert_close(got, want, rtol: float, *, scale: float | None = None, what: str = "") -> None:
    """``max|got - want| <= rtol * scale``; ``scale`` defaults to ``max|want|``.

    Args:
      got, want: arrays or pytrees of the same structure and shapes.
      rtol: the bound as a fraction of ``scale``.
      scale: the magnitude that the difference is relative to (default: ``max|want|``).
      what: names the comparison in the failure message.
    """
    scale = max_abs(want) if scale is None else scale
    assert scale > 0, f"{what}: the scale is 0, so a relative bound means nothing"
    assert_within(max_diff(got, want), rtol, scale, what)
