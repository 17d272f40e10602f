"""Aggregation of federated weight deltas: FedAvg and robust rules, pure functions.

An update maps parameter names ("exit0.weight", "exit0.bias", ...) to arrays; every update of a
round has the same names and shapes. Each rule stacks the updates once into an (n, P) float64
matrix (names in sorted order), works on its rows and returns float32 arrays shaped like the
input. No I/O, no randomness: the same updates give the same bytes.

FedAvg weighs devices by their sample counts. The robust rules (median, trimmed mean, Krum)
treat every device alike and ignore the weights, because a count is only what a device claims:
a poisoner could otherwise buy influence by reporting a huge one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]
Update = Mapping[str, npt.NDArray[Any]]
Vector = npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float64]


class AggregatorError(ValueError):
    """Bad aggregator name, parameter, weights or updates; the message says which."""


def param_names(like: Update) -> list[str]:
    """The fixed order of parameters in a flattened vector: sorted names."""
    return sorted(like)


def flatten(update: Update, names: Sequence[str] | None = None) -> Vector:
    """One float64 vector of the update's arrays in `names` order (default: sorted names)."""
    order = param_names(update) if names is None else names
    return np.concatenate([np.asarray(update[k], np.float64).ravel() for k in order])


def unflatten(vector: npt.NDArray[Any], like: Update) -> dict[str, Array]:
    """Float32 arrays shaped like `like`'s, from a vector in sorted-name order."""
    names = param_names(like)
    sizes = [int(np.prod(np.shape(like[k]))) for k in names]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise AggregatorError(f"vector of shape {vector.shape} does not hold {sum(sizes)} values")
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return {
        k: p.astype(np.float32).reshape(np.shape(like[k]))
        for k, p in zip(names, parts, strict=True)
    }


def _stack(updates: Sequence[Update]) -> Matrix:
    if not updates:
        raise AggregatorError("no updates to aggregate")
    first = updates[0]
    names = param_names(first)
    for i, u in enumerate(updates[1:], start=1):
        if param_names(u) != names:
            raise AggregatorError(f"update {i} has names {param_names(u)}, update 0 {names}")
        for k in names:
            if np.shape(u[k]) != np.shape(first[k]):
                raise AggregatorError(
                    f"update {i}: {k} shape {np.shape(u[k])}, update 0 {np.shape(first[k])}"
                )
    matrix = np.stack([flatten(u, names) for u in updates])
    if not np.isfinite(matrix).all():
        raise AggregatorError("updates hold NaN or inf; validate them before aggregating")
    return matrix


def _weights(weights: Sequence[float] | None, n: int) -> Vector:
    """Weights renormalised to sum 1 over the updates present (absent devices simply drop)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise AggregatorError(f"{w.size} weights for {n} updates")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise AggregatorError(f"weights must be positive and finite, got {w.tolist()}")
    return np.asarray(w / w.sum(), np.float64)


def _mean_rows(m: Matrix, w: Vector) -> Vector:
    # An explicit reduction over rows rather than BLAS: the same order on every machine.
    return np.asarray((w[:, None] * m).sum(axis=0), np.float64)


def _median_rows(m: Matrix) -> Vector:
    return np.asarray(np.median(m, axis=0), np.float64)


def _trimmed_rows(m: Matrix, trim: float) -> Vector:
    if not 0.0 <= trim < 0.5:
        raise AggregatorError(f"trim must be in [0, 0.5), got {trim}")
    n = m.shape[0]
    # The epsilon keeps 0.29 * 100 = 28.999... from trimming one row fewer than meant.
    k = max(1, math.floor(trim * n + 1e-9)) if trim > 0 else 0
    k = min(k, (n - 1) // 2)
    return np.asarray(np.sort(m, axis=0)[k : n - k].mean(axis=0), np.float64)


def _clip_rows(m: Matrix, bound: float) -> Matrix:
    if not (math.isfinite(bound) and bound > 0):
        raise AggregatorError(f"norm bound must be positive and finite, got {bound}")
    norms = np.linalg.norm(m, axis=1)
    # Rows within the bound are multiplied by exactly 1.0, so they come back bit-identical.
    scale = np.where(norms > bound, bound / np.maximum(norms, bound), 1.0)
    return m * scale[:, None]


def _krum_rows(m: Matrix, f: int, k: int) -> Vector:
    n = m.shape[0]
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise AggregatorError(f"f (Byzantine updates tolerated) must be an int >= 0, got {f!r}")
    if n < 2 * f + 3:
        raise AggregatorError(f"Krum needs n >= 2f + 3 updates: f={f} needs {2 * f + 3}, got {n}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - f:
        raise AggregatorError(
            f"m (updates averaged) must be an int in [1, n - f = {n - f}], got {k!r}"
        )
    # Distances do not change under translation; centring on the median keeps the Gram form
    # |x|^2 + |y|^2 - 2xy from cancelling away small honest distances next to huge rows.
    x = m - np.median(m, axis=0)
    sq = (x * x).sum(axis=1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(d, np.inf)
    scores = np.sort(d, axis=1)[:, : n - f - 2].sum(axis=1)
    best = np.argsort(scores, kind="stable")[:k]  # ties go to the lower index
    return np.asarray(m[np.sort(best)].mean(axis=0), np.float64)


def fedavg(updates: Sequence[Update], weights: Sequence[float] | None) -> dict[str, Array]:
    """Weighted mean (weights: sample counts, renormalised over the updates given)."""
    return unflatten(_mean_rows(_stack(updates), _weights(weights, len(updates))), updates[0])


def coordinate_median(updates: Sequence[Update]) -> dict[str, Array]:
    """Coordinate-wise median (the mean of the two middle values when n is even)."""
    return unflatten(_median_rows(_stack(updates)), updates[0])


def trimmed_mean(updates: Sequence[Update], trim: float) -> dict[str, Array]:
    """Coordinate-wise mean after dropping floor(trim * n) values, at least 1, from each end.

    trim is in [0, 0.5); 0 is the plain mean. With too few updates the cut shrinks so that at
    least one value stays: k = min(max(1, floor(trim * n)), (n - 1) // 2), so n <= 2 gives the
    plain mean and n = 3 the median.
    """
    return unflatten(_trimmed_rows(_stack(updates), trim), updates[0])


def clip_norms(updates: Sequence[Update], bound: float) -> list[dict[str, Array]]:
    """New updates, each scaled to global L2 norm <= bound (up to float32 rounding)."""
    return [unflatten(row, updates[0]) for row in _clip_rows(_stack(updates), bound)]


def norm_clipped_fedavg(
    updates: Sequence[Update], weights: Sequence[float] | None, bound: float
) -> dict[str, Array]:
    """FedAvg of the updates clipped to norm <= bound: each device's pull is bounded, not nil."""
    m = _clip_rows(_stack(updates), bound)
    return unflatten(_mean_rows(m, _weights(weights, len(updates))), updates[0])


def krum(updates: Sequence[Update], f: int, m: int = 1) -> dict[str, Array]:
    """Krum (m=1) or Multi-Krum (Blanchard et al. 2017), tolerating f Byzantine updates.

    Score of update i: sum of squared distances to its n - f - 2 nearest other updates; the
    mean of the m lowest-scoring updates is returned. Needs n >= 2f + 3 (AggregatorError).
    """
    return unflatten(_krum_rows(_stack(updates), f, m), updates[0])


@dataclass(frozen=True)
class Aggregator:
    """A registered rule: its maths over (matrix, normalised weights, params) and its params."""

    rows: Callable[..., Vector]
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    uses_weights: bool = False  # whether sample counts change the result (for the round report)


AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": Aggregator(lambda x, w: _mean_rows(x, w), uses_weights=True),
    "median": Aggregator(lambda x, w: _median_rows(x)),
    "trimmed_mean": Aggregator(lambda x, w, trim: _trimmed_rows(x, trim), frozenset({"trim"})),
    "norm_clipped_fedavg": Aggregator(
        lambda x, w, bound: _mean_rows(_clip_rows(x, bound), w),
        frozenset({"bound"}),
        uses_weights=True,
    ),
    "krum": Aggregator(
        lambda x, w, f, m=1: _krum_rows(x, f, m), frozenset({"f"}), frozenset({"m"})
    ),
}


def aggregate(
    name: str, updates: Sequence[Update], weights: Sequence[float] | None = None, **params: Any
) -> dict[str, Array]:
    """Run the aggregator called `name`; weights are checked even by rules that ignore them."""
    rule = AGGREGATORS.get(name)
    if rule is None:
        raise AggregatorError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    unknown = set(params) - rule.required - rule.optional
    missing = rule.required - set(params)
    if unknown or missing:
        raise AggregatorError(
            f"aggregator {name!r} takes {sorted(rule.required)} and optionally "
            f"{sorted(rule.optional)}; unknown {sorted(unknown)}, missing {sorted(missing)}"
        )
    x = _stack(updates)
    w = _weights(weights, len(updates))
    try:
        return unflatten(rule.rows(x, w, **params), updates[0])
    except TypeError as exc:  # e.g. trim="0.2" compared with a float
        raise AggregatorError(f"aggregator {name!r}: bad parameter value: {exc}") from exc
