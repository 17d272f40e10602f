"""Latency as the benchmark rules say: warm-up, fixed threads, medians, side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Runner = Callable[[npt.NDArray[Any]], object]


def time_runner(run: Runner, samples: Sequence[npt.NDArray[Any]]) -> list[float]:
    """Milliseconds per sample for one pass over samples."""
    out = []
    for x in samples:
        t0 = time.perf_counter()
        run(x)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def compare(
    runners: dict[str, Runner],
    samples: Sequence[npt.NDArray[Any]],
    *,
    rounds: int = 5,
    warmup: int = 20,
) -> dict[str, float]:
    """Median ms per sample of each runner, interleaved round by round so noise hits all alike.

    Each round times every runner over the same samples; the result is the median over rounds
    of each round's mean, which resists a noisy neighbour better than one long run.
    """
    for run in runners.values():
        for x in list(samples)[:warmup]:
            run(x)
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            per_round[name].append(float(np.mean(time_runner(run, samples))))
    return {k: statistics.median(v) for k, v in per_round.items()}
