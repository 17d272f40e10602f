"""Exit confidence and exit decisions: pure numerics shared by the agent and the optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

Rule = Literal["max_softmax", "entropy", "margin"]
FloatArray = npt.NDArray[np.floating]


def softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Row-wise softmax, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: npt.NDArray[np.float64] = e / e.sum(axis=-1, keepdims=True)
    return out


def confidence(probs: npt.ArrayLike, rule: Rule) -> npt.NDArray[np.float64]:
    """Confidence in [0, 1] per row; a frame exits when confidence >= threshold.

    max_softmax: top-1 probability. margin: top-1 minus top-2 probability.
    entropy: 1 - H(p) / log(C), so 1 is certain and 0 is uniform.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    classes = p.shape[-1]
    if classes < 2:
        raise ValueError(f"confidence needs at least 2 classes, got {classes}")
    if rule == "max_softmax":
        out: npt.NDArray[np.float64] = p.max(axis=-1)
    elif rule == "margin":
        top2 = np.partition(p, classes - 2, axis=-1)[:, -2:]
        out = top2[:, 1] - top2[:, 0]
    elif rule == "entropy":
        safe = np.clip(p, 1e-12, 1.0)
        h = -(p * np.log(safe)).sum(axis=-1)
        out = 1.0 - h / np.log(classes)
    else:
        raise ValueError(f"unknown confidence rule {rule!r}")
    return np.clip(out, 0.0, 1.0)


def decide_exits(
    confidences: Sequence[npt.ArrayLike], thresholds: Sequence[float | None]
) -> npt.NDArray[np.int64]:
    """Index of the exit each sample takes: the first early exit whose confidence passes.

    confidences holds one array per early exit (N values each); samples that pass none
    take the final head, index len(thresholds).
    """
    if len(confidences) != len(thresholds):
        raise ValueError(f"{len(confidences)} confidence arrays for {len(thresholds)} thresholds")
    n_exits = len(thresholds)
    if n_exits == 0:
        return np.zeros(0, dtype=np.int64)
    n = len(np.asarray(confidences[0]))
    taken = np.full(n, n_exits, dtype=np.int64)
    for k in range(n_exits - 1, -1, -1):
        t = thresholds[k]
        if t is None:
            continue
        passes = np.asarray(confidences[k]) >= t
        taken[passes] = k
    return taken
