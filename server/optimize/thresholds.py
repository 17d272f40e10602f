"""Exit thresholds from validation measurements: evaluation, Pareto operating points, default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle.manifest import OperatingPoint
from edgefleet.agent.runtime.confidence import decide_exits

Thresholds = tuple[float | None, ...]
IntArray = npt.NDArray[np.int64]

# Up to this many early exits the full grid is searched (42^3 threshold sets, vectorised).
_EXHAUSTIVE_MAX_EXITS = 3
# Accuracy comparisons in choose_default forgive float rounding of reference - max_drop.
_EPS = 1e-12


@dataclass(frozen=True)
class PointStats:
    """What one threshold set gives on the validation split."""

    thresholds: Thresholds  # one per early exit; None = exit disabled
    accuracy: float
    mean_cost: float  # mean MACs per sample
    exit_rates: tuple[float, ...]  # fraction of samples per exit, final head last (E+1 values)

    def to_operating_point(self, name: str) -> OperatingPoint:
        """The manifest's form of this point."""
        return OperatingPoint(
            name=name,
            thresholds=list(self.thresholds),
            val_accuracy=self.accuracy,
            expected_macs=self.mean_cost,
            exit_rates=list(self.exit_rates),
        )


class DefaultChoice(NamedTuple):
    """The default operating point and whether it stays within the accuracy budget."""

    chosen: int  # index into the points
    within_budget: bool


@dataclass(frozen=True)
class _Measurements:
    conf: list[npt.NDArray[np.float64]]  # E arrays (N,)
    correct: npt.NDArray[np.bool_]  # (E+1, N)
    cost: npt.NDArray[np.float64]  # (E+1,)

    @property
    def n(self) -> int:
        return int(self.correct.shape[1])

    @property
    def n_exits(self) -> int:
        return len(self.conf)


def _measurements(
    conf: Sequence[npt.ArrayLike], correct: Sequence[npt.ArrayLike], cost: Sequence[float]
) -> _Measurements:
    n_exits = len(conf)
    if len(correct) != n_exits + 1 or len(cost) != n_exits + 1:
        raise ValueError(
            f"{n_exits} early exit(s) need {n_exits + 1} correct arrays and costs "
            f"(final head last), got {len(correct)} and {len(cost)}"
        )
    conf_arrays = [np.asarray(c, dtype=np.float64) for c in conf]
    correct_arrays = [np.asarray(c) for c in correct]
    n = correct_arrays[-1].shape[0] if correct_arrays[-1].ndim == 1 else -1
    for name, arrays in (("conf", conf_arrays), ("correct", correct_arrays)):
        for e, a in enumerate(arrays):
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(f"{name}[{e}] has shape {a.shape}, expected ({n},)")
    if n == 0:
        raise ValueError("no validation samples (N=0)")
    for e, a in enumerate(correct_arrays):
        if a.dtype != np.bool_:
            raise ValueError(f"correct[{e}] must be bool, got dtype {a.dtype}")
    for e, c in enumerate(conf_arrays):
        if not np.isfinite(c).all():
            raise ValueError(f"conf[{e}] contains NaN or inf")
    cost_array = np.asarray(cost, dtype=np.float64)
    if (cost_array < 0).any() or (np.diff(cost_array) < 0).any():
        raise ValueError(f"costs must be >= 0 and non-decreasing along the exits, got {cost}")
    return _Measurements(conf_arrays, np.stack(correct_arrays), cost_array)


def _stats(m: _Measurements, thresholds: Thresholds, hits: int, counts: IntArray) -> PointStats:
    # Integer hit and exit counts make equal points compare exactly equal, whatever the order
    # in which they were found.
    return PointStats(
        thresholds=thresholds,
        accuracy=hits / m.n,
        mean_cost=float(counts @ m.cost) / m.n,
        exit_rates=tuple(float(c) / m.n for c in counts),
    )


def _evaluate(m: _Measurements, thresholds: Thresholds) -> PointStats:
    hits, counts = _count(m, thresholds)
    return _stats(m, thresholds, hits, counts)


def evaluate_thresholds(
    conf: Sequence[npt.ArrayLike],
    correct: Sequence[npt.ArrayLike],
    cost: Sequence[float],
    thresholds: Sequence[float | None],
) -> PointStats:
    """Accuracy, mean cost and exit rates of one threshold set on the validation measurements.

    conf: E arrays (N,) of early-exit confidences; correct: E+1 bool arrays (N,), final head
    last; cost: E+1 cumulative MACs to reach and evaluate each exit, final head last.
    """
    m = _measurements(conf, correct, cost)
    if len(thresholds) != m.n_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {m.n_exits} early exit(s)")
    return _evaluate(m, tuple(thresholds))


def _candidates(conf: npt.NDArray[np.float64], count: int) -> list[float | None]:
    # Observed confidences at evenly spaced quantiles: each candidate is a real split point of
    # the validation data. None (disabled) first, then from cautious to eager, so a lower
    # candidate index always means a more cautious threshold.
    qs = np.quantile(conf, np.linspace(0.0, 1.0, count), method="lower")
    values = sorted({float(v) for v in qs}, reverse=True)
    return [None, *(between(conf, v) for v in values)]


def between(conf: npt.NDArray[np.float64], value: float) -> float:
    """A threshold that splits `conf` where `value` does, placed halfway to the next lower one.

    A threshold equal to an observed confidence decides that frame on the last bit: a device
    whose arithmetic rounds once differently (another BLAS, another CPU) would take the other
    exit. Halfway between two observed confidences, the same frames pass on this data and a
    rounding difference moves nothing.
    """
    below = conf[conf < value]
    lower = float(below.max()) if below.size else 0.0
    mid = (value + lower) / 2.0
    return mid if lower < mid < value else value


def per_sample_correct(
    conf: Sequence[npt.ArrayLike], correct: Sequence[npt.ArrayLike], thresholds: Thresholds
) -> npt.NDArray[np.bool_]:
    """Whether each sample ends right under a threshold set (the exit it takes decides)."""
    m = _measurements(conf, correct, [0.0] * len(correct))
    if len(thresholds) != m.n_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {m.n_exits} early exit(s)")
    taken = decide_exits(m.conf, list(thresholds)) if m.n_exits else np.zeros(m.n, np.int64)
    out: npt.NDArray[np.bool_] = m.correct[taken, np.arange(m.n)]
    return out


@dataclass(frozen=True)
class _Evaluated:
    index: IntArray  # (M, E) candidate index per exit
    hits: IntArray  # (M,) correct samples
    counts: IntArray  # (M, E+1) samples per exit


def _exhaustive(m: _Measurements, cands: list[list[float | None]]) -> _Evaluated:
    # Walk the grid exit by exit, carrying which samples are still running; the last early
    # exit's candidates are handled in one (K, N) array operation. Equivalent to decide_exits
    # on every threshold set (the tests check this), without 41^E Python calls.
    last = m.n_exits - 1
    last_pass = np.stack(
        [np.zeros(m.n, dtype=np.bool_) if t is None else m.conf[last] >= t for t in cands[last]]
    )
    k_last = len(cands[last])
    index: list[IntArray] = []
    hits: list[IntArray] = []
    counts: list[IntArray] = []

    def walk(
        e: int, prefix: list[int], alive: npt.NDArray[np.bool_], n_hit: int, n_exit: IntArray
    ) -> None:
        if e == last:
            here = last_pass & alive
            stay = alive & ~last_pass
            rows = np.empty((k_last, m.n_exits), dtype=np.int64)
            rows[:, :last] = prefix
            rows[:, last] = np.arange(k_last)
            index.append(rows)
            hits.append(
                n_hit + (here & m.correct[last]).sum(axis=1) + (stay & m.correct[-1]).sum(axis=1)
            )
            c = np.repeat(n_exit[None, :], k_last, axis=0)
            c[:, last] = here.sum(axis=1)
            c[:, -1] = stay.sum(axis=1)
            counts.append(c)
            return
        for k, t in enumerate(cands[e]):
            here = np.zeros_like(alive) if t is None else alive & (m.conf[e] >= t)
            c = n_exit.copy()
            c[e] = int(here.sum())
            n_here = int((here & m.correct[e]).sum())
            walk(e + 1, [*prefix, k], alive & ~here, n_hit + n_here, c)

    walk(0, [], np.ones(m.n, dtype=np.bool_), 0, np.zeros(m.n_exits + 1, dtype=np.int64))
    return _Evaluated(
        np.concatenate(index), np.concatenate(hits).astype(np.int64), np.concatenate(counts)
    )


def _count(m: _Measurements, thresholds: Thresholds) -> tuple[int, IntArray]:
    taken = decide_exits(m.conf, list(thresholds))
    if m.n_exits == 0:
        taken = np.zeros(m.n, dtype=np.int64)
    hits = int(m.correct[taken, np.arange(m.n)].sum())
    return hits, np.bincount(taken, minlength=m.n_exits + 1).astype(np.int64)


def _coordinate_descent(m: _Measurements, cands: list[list[float | None]]) -> _Evaluated:
    # Too many exits for a grid: minimise errors/N + w * mean_cost / full_cost one exit at a
    # time, for a sweep of trade-off weights w, each run started from the previous answer so the
    # runs trace the front from accurate to fast. Every set evaluated is kept for the front.
    seen: dict[tuple[int, ...], tuple[int, IntArray]] = {}
    full_cost = float(m.cost[-1]) or 1.0

    def objective(key: tuple[int, ...], weight: float) -> float:
        if key not in seen:
            seen[key] = _count(m, tuple(cands[e][k] for e, k in enumerate(key)))
        n_hit, n_exit = seen[key]
        return (m.n - n_hit) / m.n + weight * float(n_exit @ m.cost) / (m.n * full_cost)

    current = (0,) * m.n_exits
    for weight in [0.0, *np.geomspace(1e-3, 1e2, 26).tolist()]:
        for _ in range(10):
            moved = False
            for e in range(m.n_exits):
                best, best_value = current, objective(current, weight)
                for k in range(len(cands[e])):
                    trial = (*current[:e], k, *current[e + 1 :])
                    # Strict '<' keeps the more cautious (lower index) set on a tie.
                    value = objective(trial, weight)
                    if value < best_value:
                        best, best_value = trial, value
                if best != current:
                    current, moved = best, True
            if not moved:
                break
    keys = sorted(seen)
    return _Evaluated(
        np.array(keys, dtype=np.int64).reshape(len(keys), m.n_exits),
        np.array([seen[k][0] for k in keys], dtype=np.int64),
        np.stack([seen[k][1] for k in keys]),
    )


def _pareto(ev: _Evaluated, mean_cost: npt.NDArray[np.float64]) -> IntArray:
    # Cheapest first; among equal cost the most accurate; among equal points the most cautious
    # thresholds (lowest candidate indices, exit 0 first), which over-exit least on unseen data.
    n_exits = ev.index.shape[1]
    keys = [ev.index[:, e] for e in reversed(range(n_exits))] + [-ev.hits, mean_cost]
    order = np.lexsort(keys)
    h = ev.hits[order]
    best_before = np.concatenate([[-1], np.maximum.accumulate(h)[:-1]])
    front: IntArray = order[h > best_before][::-1]
    return front


def _thin(
    acc: npt.NDArray[np.float64], cost: npt.NDArray[np.float64], max_points: int
) -> list[int]:
    # Farthest-point selection by arc length along the front, both axes scaled to [0, 1]:
    # keeps both ends and spreads the rest evenly, whatever the front's shape.
    if len(acc) <= max_points:
        return list(range(len(acc)))
    acc_span = float(np.ptp(acc)) or 1.0
    cost_span = float(np.ptp(cost)) or 1.0
    steps = np.hypot(np.diff(acc) / acc_span, np.diff(cost) / cost_span)
    position = np.concatenate([[0.0], np.cumsum(steps)])
    chosen = [0] if max_points == 1 else [0, len(acc) - 1]
    while len(chosen) < max_points:
        gap = np.min(np.abs(position[:, None] - position[chosen][None, :]), axis=1)
        chosen.append(int(np.argmax(gap)))
    return sorted(chosen)


def pareto_operating_points(
    conf: Sequence[npt.ArrayLike],
    correct: Sequence[npt.ArrayLike],
    cost: Sequence[float],
    *,
    candidates_per_exit: int = 41,
    max_points: int = 8,
    search: Literal["auto", "grid", "greedy"] = "auto",
) -> list[PointStats]:
    """Pareto-optimal threshold sets (accuracy up, mean cost down), from accurate to fast.

    Candidates per exit are quantiles of its validation confidences plus None (disabled).
    search="auto" tries the full grid up to 3 early exits and coordinate descent beyond. The
    first point is the most accurate one (the cheapest of those, so it may let some sure
    samples exit early); the last is the fastest. Ties go to the most cautious thresholds.
    """
    if candidates_per_exit < 2:
        raise ValueError(f"candidates_per_exit must be >= 2, got {candidates_per_exit}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    m = _measurements(conf, correct, cost)
    if m.n_exits == 0:
        return [_evaluate(m, ())]
    cands = [_candidates(c, candidates_per_exit) for c in m.conf]
    grid = search == "grid" or (search == "auto" and m.n_exits <= _EXHAUSTIVE_MAX_EXITS)
    ev = _exhaustive(m, cands) if grid else _coordinate_descent(m, cands)
    mean_cost = (ev.counts @ m.cost) / m.n
    front = _pareto(ev, mean_cost)
    keep = _thin(ev.hits[front] / m.n, mean_cost[front], max_points)
    points = []
    for row in front[keep]:
        thresholds = tuple(cands[e][k] for e, k in enumerate(ev.index[row]))
        points.append(_stats(m, thresholds, int(ev.hits[row]), ev.counts[row]))
    return points


def common_threshold_path(n_exits: int) -> list[Thresholds]:
    """Threshold sets from cautious to eager that no data chose: one threshold for every exit.

    Every exit disabled first, then a common threshold falling from 1 - 1e-9 to 0: in steps
    of 0.05 in -log10(1 - t) down to 0.9 (confidences crowd just below 1, where one step
    lets a tenth of the frames out), then in steps of 0.01. A sequence for fixed-sequence
    testing (risk.py) must not depend on the samples it is tested on; this one depends on
    nothing. Measured on the reference model against the calibration split's own ordering of
    every grid set: the cheapest certified set cost 21% of the MACs instead of 55%, within a
    point of the cheapest set that a look at the validation labels would pick (which
    certifies nothing), because the per-exit sets that calibration ranks safe include eager
    outliers that stop the walk early.
    """
    digits = np.arange(9.0, 1.0 - 1e-9, -0.05)
    values = [*(1.0 - 10.0**-digits), *np.linspace(0.89, 0.0, 90)]
    return [(None,) * n_exits, *(((float(v),) * n_exits) for v in values)]


def choose_default(
    points: Sequence[PointStats], reference_accuracy: float, max_drop: float
) -> DefaultChoice:
    """The fastest point within max_drop of reference_accuracy, else the most accurate one.

    The fallback is flagged by within_budget=False rather than raised: a bundle still needs a
    default, and the caller decides whether missing the budget is fatal.
    """
    if not points:
        raise ValueError("no operating points to choose from")
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    floor = reference_accuracy - max_drop - _EPS
    ok = [i for i, p in enumerate(points) if p.accuracy >= floor]
    if ok:
        fastest = min(ok, key=lambda i: (points[i].mean_cost, -points[i].accuracy, i))
        return DefaultChoice(fastest, True)
    best = min(range(len(points)), key=lambda i: (-points[i].accuracy, points[i].mean_cost, i))
    return DefaultChoice(best, False)
