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
PIXEL_THRESHOLDS = (6, 10, 16, 25)  # grey levels tried besides the given gate's


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
    verified: VerifiedBundle, frames: Sequence[np.ndarray], gates: Sequence[Gate]
) -> tuple[list[np.ndarray], list[FrameObjects]]:
    """Moved fraction per frame under each gate's sensitivity, and the bundle's detections on
    every frame (the model runs once; each gate only measures)."""
    model = DetectorModel(verified, threads=1)
    pre = Preprocessor(verified.manifest.preprocessing, verified.manifest.input.dtype)
    probes = [MotionGate(g.model_copy(update={"motion": 0.0})) for g in gates]
    moved = [np.zeros(len(frames)) for _ in gates]
    found: list[FrameObjects] = []
    for i, frame in enumerate(frames):
        for probe, m in zip(probes, moved, strict=True):
            probe.should_run(frame)
            m[i] = probe.moved_fraction or 0.0
        d = model.detect_frame(frame, pre).detections
        found.append(FrameObjects(d.boxes, d.classes))
    return moved, found


def sensitivities(base: Gate) -> list[Gate]:
    """The motion measures tried: the given one and finer ones (lower pixel threshold, wider).

    A digit creeping at half a pixel per frame barely changes a 64-pixel-wide thumbnail by
    25 grey levels, and the running average absorbs it; a finer measure sees it, at the cost
    of more frames run for noise.
    """
    out = [base]
    for width in (base.width, 2 * base.width):
        for pt in PIXEL_THRESHOLDS:
            g = base.model_copy(update={"width": min(width, 1024), "pixel_threshold": pt})
            if g not in out:
                out.append(g)
    return out


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
    gates = sensitivities(base)
    moved, found = measure(verified, frames, gates)
    reference = truth if truth is not None else found
    sweeps = [sweep(m, found, reference, base.max_skip) for m in moved]
    full = sweeps[0][0].recall
    chosen: list[tuple[str, Gate | None, GateFigures]] = [(ALWAYS, None, sweeps[0][0])]
    for name, budget in (("motion-half-budget", max_drop_pt / 2), ("motion", max_drop_pt)):
        picks = [(choose(fs, budget), k) for k, fs in enumerate(sweeps)]
        pick, k = max(picks, key=lambda pk: (pk[0].skip_fraction, -pk[1]))
        if pick.motion is None:
            continue
        # The most skipping threshold sits right below the motion of the smallest change the
        # clip shows; another clip's changes may be a little smaller. Half of it keeps a
        # margin at a small cost in skipped frames (measured again, below).
        motion = pick.motion * MARGIN
        skip, recall = replay(moved[k], found, reference, motion, base.max_skip)
        gate = gates[k].model_copy(update={"motion": motion})
        if all(gate != g for _, g, _ in chosen):
            figures = GateFigures(motion, skip, recall, (full - recall) * 100.0)
            chosen.append((name, gate, figures))
    # From accurate to fast: a point that skips no more than the one before it is no
    # faster (the two budgets can pick different measures whose halves cross); the fastest
    # kept is the default, "motion".
    kept = chosen[:1]
    for item in chosen[1:]:
        if item[2].skip_fraction > kept[-1][2].skip_fraction:
            kept.append(item)
    if len(kept) > 1:
        kept[-1] = ("motion", kept[-1][1], kept[-1][2])
    chosen = kept
    points = [
        OperatingPoint(
            name=name,
            thresholds=[],
            gate=gate,
            skip_fraction=f.skip_fraction,
            val_recall=f.recall,
        )
        for name, gate, f in chosen
    ]
    report = {
        "frames": len(frames),
        "truth": "given" if truth is not None else "the detector's own detections",
        "max_recall_drop_pt": max_drop_pt,
        "max_skip": base.max_skip,
        "margin": MARGIN,
        "sweep": [
            {
                "width": g.width,
                "pixel_threshold": g.pixel_threshold,
                "motion": f.motion,
                "skip_fraction": round(f.skip_fraction, 4),
                "recall": round(f.recall, 4),
                "recall_drop_pt": round(f.recall_drop_pt, 3),
            }
            for g, fs in zip(gates, sweeps, strict=True)
            for f in fs[1:]
        ],
        "points": [
            {
                "name": p.name,
                "gate": None if p.gate is None else p.gate.model_dump(),
                "skip_fraction": p.skip_fraction,
                "recall": p.val_recall,
            }
            for p in points
        ],
    }
    return points, len(points) - 1, report
