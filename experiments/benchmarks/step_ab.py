"""Interleaved A/B timing of the product's steps compiled under several settings.

Every setting's step is built and compiled in one process, then the steps are timed
alternating, each round in the opposite order, so that the machine's drift (10-30% between
processes on the 2-core CPU) falls on all settings alike. The records' A/B scripts
(``records-*/inference_options_ab.py``, ``records-*/winograd_ab.py``) call it; import it
before JAX starts (it applies the CLIs' malloc tuning, as the product runs).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from flaxcnn.cli import tune_glibc_malloc

tune_glibc_malloc()  # before JAX starts its threads

import jax  # noqa: E402


def interleaved(build: Callable[[str], object], settings: Sequence[str], rounds: int,
                calls: int = 2) -> dict[str, list[float]]:  # fmt: skip
    """ms per call of each setting's step: ``build(name)`` returns a ``flaxcnn.bench.Step``
    compiled under setting ``name``; ``rounds`` rounds of ``calls`` calls per setting."""
    steps = {}
    for name in settings:
        steps[name] = build(name)
        jax.block_until_ready(steps[name].run())
    times = {name: [] for name in settings}
    for r in range(rounds):
        for name in settings if r % 2 == 0 else settings[::-1]:
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(steps[name].run())
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    """One line per setting: median and minimum, and the median against the first setting's."""
    names = list(times)
    base = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"{label} {name:16s} median {median:7.1f} ms, min {min(times[name]):7.1f} ms, "
              f"{median / base:.2f}x of {names[0]}", flush=True)  # fmt: skip
