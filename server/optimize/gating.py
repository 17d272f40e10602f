"""Calibrating a detector's motion gate: how much to skip for a recall budget (pure numerics).

The agent's gate (agent/detect/gate.py) updates its background on every frame whether the
detector runs or not, so the fraction of moved pixels per frame does not depend on the
gate's threshold. Calibration therefore measures it once over a validation clip, runs the
detector once on every frame, and then replays the gate's decision rule for each candidate
threshold: a skipped frame keeps the objects of the last frame the detector ran on, which is
exactly what the agent reports for it. Recall is counted per ground-truth box at IoU >= 0.5
with the same class, the way a person checks "was the object seen".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.agent.detect.boxes import iou_matrix

Boxes = npt.NDArray[np.float32]
Classes = npt.NDArray[np.int64]
RECALL_IOU = 0.5


@dataclass(frozen=True)
class FrameObjects:
    """Boxes (K, 4) xyxy in frame pixels with their classes (K,), of one frame."""

    boxes: Boxes
    classes: Classes


@dataclass(frozen=True)
class GateFigures:
    """What one gate threshold gives on a clip."""

    motion: float | None
    skip_fraction: float
    recall: float
    recall_drop_pt: float


def found(truth: FrameObjects, seen: FrameObjects, iou: float = RECALL_IOU) -> int:
    """Ground-truth boxes matched one to one by a seen box of the same class at IoU >= iou."""
    if len(truth.boxes) == 0 or len(seen.boxes) == 0:
        return 0
    overlap = iou_matrix(truth.boxes, seen.boxes)
    overlap[truth.classes[:, None] != seen.classes[None, :]] = 0.0
    matched = 0
    # Greedy by IoU, highest first: one seen box explains at most one true box.
    pairs = np.argwhere(overlap >= iou)
    order = np.argsort(-overlap[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_t: set[int] = set()
    used_s: set[int] = set()
    for t, s in pairs[order]:
        if t in used_t or s in used_s:
            continue
        used_t.add(int(t))
        used_s.add(int(s))
        matched += 1
    return matched


def gate_decisions(
    moved: npt.NDArray[np.float64], motion: float | None, max_skip: int
) -> npt.NDArray[np.bool_]:
    """Which frames the agent's gate runs the detector on (True = runs), as agent/detect/gate.py.

    The first frame always runs; a frame runs when its moved fraction reaches `motion`, or
    when `max_skip` frames in a row were skipped before it; `motion` None runs every frame.
    """
    runs = np.ones(len(moved), dtype=bool)
    if motion is None:
        return runs
    skipped = 0
    for i in range(1, len(moved)):
        if moved[i] >= motion or skipped >= max_skip:
            skipped = 0
        else:
            runs[i] = False
            skipped += 1
    return runs


def replay(
    moved: npt.NDArray[np.float64],
    detections: Sequence[FrameObjects],
    truth: Sequence[FrameObjects],
    motion: float | None,
    max_skip: int,
) -> tuple[float, float]:
    """(skip fraction, recall) of the gate on a clip whose detections were taken on every frame."""
    if not len(moved) == len(detections) == len(truth):
        raise ValueError(
            f"clip lengths differ: {len(moved)} motion values, {len(detections)} detection "
            f"frames, {len(truth)} truth frames"
        )
    runs = gate_decisions(moved, motion, max_skip)
    total = sum(len(t.boxes) for t in truth)
    hits = 0
    last = 0
    for i, t in enumerate(truth):
        if runs[i]:
            last = i
        hits += found(t, detections[last])
    recall = hits / total if total else 1.0
    return float(1.0 - runs.mean()) if len(runs) else 0.0, recall


def sweep(
    moved: npt.NDArray[np.float64],
    detections: Sequence[FrameObjects],
    truth: Sequence[FrameObjects],
    max_skip: int,
    candidates: Sequence[float] | None = None,
) -> list[GateFigures]:
    """Figures for no gate and for each candidate threshold (default: quantiles of `moved`)."""
    _, full = replay(moved, detections, truth, None, max_skip)
    if candidates is None:
        qs: list[float] = (
            np.unique(np.quantile(moved[1:], np.linspace(0.05, 0.95, 19))).tolist()
            if len(moved) > 1
            else []
        )
        # Slightly above each observed value, so that a quantile frame itself is skipped.
        candidates = sorted({float(np.nextafter(q, 1.0)) for q in qs if q < 1.0})
    out = [GateFigures(None, 0.0, full, 0.0)]
    for m in candidates:
        skip, recall = replay(moved, detections, truth, m, max_skip)
        out.append(GateFigures(m, skip, recall, (full - recall) * 100.0))
    return out


def choose(figures: Sequence[GateFigures], max_drop_pt: float) -> GateFigures:
    """The most skipping threshold whose recall drop stays within the budget (no gate if none)."""
    allowed = [f for f in figures if f.recall_drop_pt <= max_drop_pt]
    return max(allowed, key=lambda f: (f.skip_fraction, -(f.motion or 0.0)))
