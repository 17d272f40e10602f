"""Latency as the benchmark rules say: warm-up, fixed threads, medians, side by side.

The one interleaved timer of the project: the optimizer's report (`compare`), the demo and
the benchmarks in bench/ all time their contenders through `interleaved`, so a figure in a
report and the same figure in a benchmark mean the same thing. It lives here, not in bench/,
because the installed optimizer needs it and bench/ is not installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy.typing as npt

T = TypeVar("T")
Runner = Callable[[npt.NDArray[Any]], object]
Clock = Callable[[], float]  # seconds, monotonic
Rounds = dict[str, list[float]]  # contender -> mean ms per item, one value per round


def interleaved(
    contenders: Mapping[str, Callable[[T], object]],
    items: Sequence[T],
    *,
    rounds: int,
    chunk: int,
    warmup: int,
    clock: Clock = time.perf_counter,
) -> Rounds:
    """Mean ms per item of every contender, one value per round, contenders run round-robin.

    Each round runs every contender over all items, chunk by chunk, in an order that rotates
    with both the round and the chunk: a noisy neighbour's burst spreads over all contenders
    (short chunks) and no contender always runs right after the same other one. Per-round
    values are kept so that ratios can be paired round by round (see `round_ratios`). Every
    contender first runs the first `warmup` items untimed.
    """
    if not items:
        raise ValueError("interleaved: no items to time")
    if rounds < 1 or chunk < 1 or not contenders:
        raise ValueError(
            f"interleaved: need contenders, rounds >= 1, chunk >= 1 (got "
            f"{len(contenders)}, {rounds}, {chunk})"
        )
    names = list(contenders)
    for run in contenders.values():
        for x in items[:warmup]:
            run(x)
    per_round: Rounds = {k: [] for k in names}
    for r in range(rounds):
        total = dict.fromkeys(names, 0.0)
        for c, start in enumerate(range(0, len(items), chunk)):
            part = items[start : start + chunk]
            shift = (r + c) % len(names)
            for name in names[shift:] + names[:shift]:
                run = contenders[name]
                for x in part:
                    t0 = clock()
                    run(x)
                    total[name] += clock() - t0
        for name in names:
            per_round[name].append(total[name] * 1000.0 / len(items))
    return per_round


def medians(per_round: Rounds) -> dict[str, float]:
    """Median over rounds of each contender's per-round mean ms."""
    return {k: statistics.median(v) for k, v in per_round.items()}


def round_ratios(per_round: Rounds, num: str, den: str) -> list[float]:
    """num's time over den's within each round: a burst slows both sides of the pair alike."""
    return [a / b for a, b in zip(per_round[num], per_round[den], strict=True)]


def ratio_spread(
    per_round: Rounds, ratios: Callable[[dict[str, float]], dict[str, float]]
) -> dict[str, list[float]]:
    """[min, max] over rounds of each ratio computed within one round: how noisy it was."""
    n = len(next(iter(per_round.values())))
    each = [ratios({k: v[i] for k, v in per_round.items()}) for i in range(n)]
    return {k: [min(r[k] for r in each), max(r[k] for r in each)] for k in each[0]}


def compare(
    runners: Mapping[str, Runner],
    samples: Sequence[npt.NDArray[Any]],
    *,
    rounds: int = 5,
    warmup: int = 20,
) -> dict[str, float]:
    """Median ms per sample of each runner, interleaved round by round so noise hits all alike.

    Each round times every runner over all the samples in one go (the order rotating from
    round to round); the result is the median over rounds of each round's mean, which resists
    a noisy neighbour better than one long run.
    """
    per_round = interleaved(runners, samples, rounds=rounds, chunk=len(samples), warmup=warmup)
    return medians(per_round)
