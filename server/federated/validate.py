"""Checks on one device's weight delta before it may join a round's aggregate, pure.

A round expects the heads it announced: these names, these shapes. An update that differs, holds
NaN or inf, or is far larger than it could be from honest local training is dropped with a
short reason (kept in the round's history) rather than passed to the aggregator: one bad device
must never turn the fleet's new heads into garbage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Update = Mapping[str, npt.NDArray[Any]]

# How many times the median norm of a round an honest update may reach (robust_norm_bound).
DEFAULT_NORM_FACTOR = 5.0


def update_norm(update: Update) -> float:
    """Global L2 norm over every array of the update, computed in float64."""
    # float64 because squaring a large float32 value overflows to inf long before the norm does.
    squares = (float(np.sum(np.square(np.asarray(a, np.float64)))) for a in update.values())
    return math.sqrt(sum(squares))


def check_update(
    update: Update, expected: Mapping[str, tuple[int, ...]], *, max_norm: float | None
) -> str | None:
    """None if the update fits `expected` and max_norm, else a short reason naming the key.

    Checked in order: missing names, extra names, then per name (sorted) dtype (floating point),
    shape and finiteness, and last the global L2 norm against max_norm (None: not checked).
    """
    missing = sorted(set(expected) - set(update))
    if missing:
        return f"missing {', '.join(missing)}"
    extra = sorted(set(update) - set(expected))
    if extra:
        return f"unexpected {', '.join(extra)}"
    for name in sorted(expected):
        array = np.asarray(update[name])
        if not np.issubdtype(array.dtype, np.floating):
            return f"{name}: dtype {array.dtype}, expected floating point"
        if array.shape != tuple(expected[name]):
            return f"{name}: shape {array.shape}, expected {tuple(expected[name])}"
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            return f"{name}: {bad} non-finite values (NaN/inf)"
    if max_norm is not None:
        norm = update_norm(update)
        if norm > max_norm:
            largest = max(expected, key=lambda k: update_norm({k: update[k]}))
            return f"norm {norm:.6g} above max_norm {max_norm:.6g} (largest part: {largest})"
    return None


def robust_norm_bound(norms: Sequence[float], factor: float = DEFAULT_NORM_FACTOR) -> float:
    """A data-driven norm bound for a round: factor x the median of its updates' norms.

    Used when no fixed bound is configured: updates with a norm above it are dropped before
    aggregation. The median is an honest norm while fewer than half the updates are hostile,
    so a few huge updates cannot raise the bound that judges them. Honest non-IID devices
    differ in norm by small factors; the default 5 keeps them and drops a x10 or x100 update.
    """
    values = np.asarray(norms, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("robust_norm_bound needs at least one norm")
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise ValueError(f"norms must be finite and >= 0, got {values.tolist()}")
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(
            f"factor must be finite and >= 1 (below 1 most honest updates fail), got {factor}"
        )
    return float(factor * np.median(values))
