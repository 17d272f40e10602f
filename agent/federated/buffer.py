"""A bounded, thread-safe ring of per-frame exit features and labels for local head training."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Source = Literal["pseudo", "supplied"]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class FeatureBuffer:
    """The last `capacity` frames: each exit's flattened features, a label, its confidence.

    Storage is preallocated (per exit, on the first frame that ran it), so memory is fixed
    once every exit has been seen and nbytes is exact. The inference loop adds while a
    training thread reads: one lock guards every access, and add copies the features into
    the ring (the caller's buffers are reused for the next frame).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._lock = threading.Lock()
        self._labels = np.zeros(capacity, dtype=np.int64)
        self._confidence = np.zeros(capacity, dtype=np.float32)
        self._supplied = np.zeros(capacity, dtype=np.bool_)
        # One entry per exit, fixed by the first add; an array per exit once it has run.
        self._features: list[F32 | None] | None = None
        self._present: npt.NDArray[np.bool_] | None = None
        self._added = 0

    @property
    def capacity(self) -> int:
        """Frames held at most."""
        return self._capacity

    @property
    def added(self) -> int:
        """Frames ever added."""
        with self._lock:
            return self._added

    @property
    def dropped(self) -> int:
        """Frames overwritten because the ring was full (oldest first)."""
        with self._lock:
            return max(0, self._added - self._capacity)

    def __len__(self) -> int:
        with self._lock:
            return min(self._added, self._capacity)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's arrays (fixed once every exit has been seen)."""
        with self._lock:
            arrays: list[npt.NDArray[Any]] = [self._labels, self._confidence, self._supplied]
            if self._present is not None:
                arrays.append(self._present)
            arrays.extend(f for f in self._features or [] if f is not None)
            return sum(a.nbytes for a in arrays)

    def add(
        self,
        features: Sequence[npt.ArrayLike | None],
        label: int,
        confidence: float,
        source: Source,
    ) -> None:
        """Store one frame; features[k] is exit k's features (None: that exit did not run)."""
        if source not in ("pseudo", "supplied"):
            raise ValueError(f"source must be 'pseudo' or 'supplied', got {source!r}")
        if int(label) != label or label < 0:
            raise ValueError(f"label must be a non-negative integer, got {label!r}")
        if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
            raise ValueError(f"confidence must lie in [0, 1], got {confidence!r}")
        flat = [None if f is None else np.asarray(f, np.float32).reshape(-1) for f in features]
        with self._lock:
            self._check(flat)
            if self._features is None:
                self._features = [None] * len(flat)
                self._present = np.zeros((self._capacity, len(flat)), dtype=np.bool_)
            assert self._present is not None
            row = self._added % self._capacity
            for k, vec in enumerate(flat):
                if vec is None:
                    continue
                store = self._features[k]
                if store is None:
                    store = np.zeros((self._capacity, vec.size), dtype=np.float32)
                    self._features[k] = store
                store[row] = vec  # the copy: the caller may reuse its buffer
            self._present[row] = [vec is not None for vec in flat]
            self._labels[row] = int(label)
            self._confidence[row] = confidence
            self._supplied[row] = source == "supplied"
            self._added += 1

    def _check(self, flat: Sequence[F32 | None]) -> None:
        # Everything is checked before anything is written: a bad frame leaves no half row.
        if self._features is not None and len(flat) != len(self._features):
            raise ValueError(f"{len(flat)} exits given, the buffer holds {len(self._features)}")
        for k, vec in enumerate(flat):
            if vec is None:
                continue
            store = None if self._features is None else self._features[k]
            if store is not None and vec.size != store.shape[1]:
                held = store.shape[1]
                raise ValueError(f"exit {k}: {vec.size} features, the buffer holds {held}")
            if not np.isfinite(vec).all():
                raise ValueError(f"exit {k}: features hold NaN or infinite values")

    def examples(self, head_index: int, *, min_confidence: float) -> tuple[F32, I64]:
        """(x (n, D), y (n,)) for one exit, oldest first: supplied labels always, pseudo labels
        only at or above min_confidence. Copies, safe to use while frames keep arriving."""
        with self._lock:
            if self._features is None or self._present is None:
                return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
            if not 0 <= head_index < len(self._features):
                raise IndexError(f"exit {head_index} out of range ({len(self._features)} exits)")
            store = self._features[head_index]
            if store is None:
                return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
            count = min(self._added, self._capacity)
            start = self._added % self._capacity if self._added > self._capacity else 0
            order = (start + np.arange(count)) % self._capacity
            keep = self._present[order, head_index] & (
                self._supplied[order] | (self._confidence[order] >= min_confidence)
            )
            rows = order[keep]
            return store[rows], self._labels[rows].copy()


def split(
    x: npt.ArrayLike, y: npt.ArrayLike, val_fraction: float, rng: np.random.Generator
) -> tuple[F32, I64, F32, I64]:
    """(x_train, y_train, x_val, y_val): a random split, reproducible from the rng's state.

    round(n * val_fraction) rows go to validation, but never all of them.
    """
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if xs.ndim != 2 or ys.shape != (xs.shape[0],):
        raise ValueError(f"x {xs.shape} and y {ys.shape} are not (n, D) and (n,)")
    n = xs.shape[0]
    n_val = min(round(n * val_fraction), max(n - 1, 0))
    order = rng.permutation(n)
    val, train = order[:n_val], order[n_val:]
    return xs[train], ys[train], xs[val], ys[val]
