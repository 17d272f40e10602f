"""Gate operating points for a detector: calibrated on a clip so that recall stays in budget.

`edgefleet optimize --task detect --gate-clip VIDEO [--gate-truth JSON]` runs the draft
bundle through the agent's own DetectorModel on every frame of the clip and measures the
agent's MotionGate on every frame (server/optimize/gating.py explains why one pass is
enough). With a truth file, recall is against its boxes; without one (a clip from the
user's own camera), against the detector's own detections on every frame, so the figure is
what the gate costs, not what the detector misses anyway.

The points go from accurate to fast: "always" (no gate), then half the most skipping
threshold within half the recall budget, then half the one within the budget (a margin for
changes a little smaller than the clip's). The default is the last: the budget
is what the operator allowed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.bundle.manifest import Gate, OperatingPoint
from edgefleet.agent.detect.gate import MotionGate
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.runtime.preprocess import Preprocessor

from ..errors import DataError
from ..gating import FrameObjects, GateFigures, choose, replay, sweep

ALWAYS = "always"
MARGIN = 0.5  # of the most skipping threshold within budget, kept as the gate


def read_truth(path: Path, frames: int) -> list[FrameObjects]:
    """Per-frame boxes of a clip's truth file: {"frames": [[{"class": c, "box": [x1, y1, x2,
    y2]}, ...], ...]} in frame pixels (the format of the reference det_video_truth.json)."""
    try:
        doc = json.loads(path.read_text())
        rows = doc["frames"]
        out = []
        for i, frame in enumerate(rows):
            boxes = np.array([o["box"] for o in frame], np.float32).reshape(-1, 4)
            classes = np.array([o["class"] for o in frame], np.int64)
            if len(boxes) and (boxes[:, 2] < boxes[:, 0]).any() | (boxes[:, 3] < boxes[:, 1]).any():
                raise DataError(f"{path}: frame {i} has a box with x2 < x1 or y2 < y1")
            out.append(FrameObjects(boxes, classes))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: not a clip truth file ({type(exc).__name__}: {exc}); expected "
            '{"frames": [[{"class": c, "box": [x1, y1, x2, y2]}, ...], ...]}'
        ) from exc
    if len(out) != frames:
        raise DataError(f"{path}: truth has {len(out)} frames, the clip has {frames}")
    return out


def measure(
    verified: VerifiedBundle, frames: Sequence[np.ndarray], gate: Gate
) -> tuple[np.ndarray, list[FrameObjects]]:
    """Moved fraction per frame (the gate's measure) and the bundle's detections on every frame."""
    model = DetectorModel(verified, threads=1)
    pre = Preprocessor(verified.manifest.preprocessing, verified.manifest.input.dtype)
    probe = MotionGate(gate.model_copy(update={"motion": 0.0}))
    moved = np.zeros(len(frames))
    found: list[FrameObjects] = []
    for i, frame in enumerate(frames):
        probe.should_run(frame)
        moved[i] = probe.moved_fraction or 0.0
        d = model.detect_frame(frame, pre).detections
        found.append(FrameObjects(d.boxes, d.classes))
    return moved, found


def calibrate(
    verified: VerifiedBundle,
    frames: Sequence[np.ndarray],
    truth: list[FrameObjects] | None,
    max_drop_pt: float,
    base: Gate,
) -> tuple[list[OperatingPoint], int, dict[str, Any]]:
    """Operating points (always, half budget, budget), the default index and a report."""
    if len(frames) < 2:
        raise DataError(f"the gate clip has {len(frames)} frame(s); it needs a sequence")
    moved, found = measure(verified, frames, base)
    reference = truth if truth is not None else found
    figures = sweep(moved, found, reference, base.max_skip)
    full = figures[0].recall
    chosen: list[tuple[str, GateFigures]] = [(ALWAYS, figures[0])]
    for name, budget in (("motion-half-budget", max_drop_pt / 2), ("motion", max_drop_pt)):
        pick = choose(figures, budget)
        if pick.motion is None:
            continue
        # The most skipping threshold sits right below the motion of the smallest change the
        # clip shows; another clip's changes may be a little smaller. Half of it keeps a
        # margin at a small cost in skipped frames (measured again, below).
        motion = pick.motion * MARGIN
        skip, recall = replay(moved, found, reference, motion, base.max_skip)
        if all(motion != f.motion for _, f in chosen):
            chosen.append((name, GateFigures(motion, skip, recall, (full - recall) * 100.0)))
    points = [
        OperatingPoint(
            name=name,
            thresholds=[],
            gate=None if f.motion is None else base.model_copy(update={"motion": f.motion}),
            skip_fraction=f.skip_fraction,
            val_recall=f.recall,
        )
        for name, f in chosen
    ]
    report = {
        "frames": len(frames),
        "truth": "given" if truth is not None else "the detector's own detections",
        "max_recall_drop_pt": max_drop_pt,
        "max_skip": base.max_skip,
        "pixel_threshold": base.pixel_threshold,
        "width": base.width,
        "sweep": [
            {
                "motion": f.motion,
                "skip_fraction": round(f.skip_fraction, 4),
                "recall": round(f.recall, 4),
                "recall_drop_pt": round(f.recall_drop_pt, 3),
            }
            for f in figures
        ],
        "points": [
            {
                "name": p.name,
                "motion": None if p.gate is None else p.gate.motion,
                "skip_fraction": p.skip_fraction,
                "recall": p.val_recall,
            }
            for p in points
        ],
    }
    return points, len(points) - 1, report
