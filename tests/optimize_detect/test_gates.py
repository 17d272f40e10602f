"""Gate operating points calibrated on a clip through the agent's own detector and gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.bundle.manifest import Gate
from edgefleet.server.optimize.detect.gates import calibrate, read_truth
from edgefleet.server.optimize.errors import DataError
from edgefleet.server.optimize.gating import FrameObjects
from tests.detect_agent.helpers import CELL, FRAME, SIDE, detect_bundle, frame_with_square

SQUARE = CELL * FRAME // SIDE  # side of the square in frame pixels


def clip() -> tuple[list[np.ndarray], list[FrameObjects]]:
    """10 empty frames, a square still for 40 frames, a jump, still for 40, then empty for 30."""
    cells = [None] * 10 + [(1, 2)] * 40 + [(2, 0)] * 40 + [None] * 30
    frames = [frame_with_square(c) for c in cells]
    truth = []
    for c in cells:
        if c is None:
            truth.append(FrameObjects(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
        else:
            r, col = c
            box = [col * SQUARE, r * SQUARE, (col + 1) * SQUARE, (r + 1) * SQUARE]
            truth.append(FrameObjects(np.array([box], np.float32), np.zeros(1, np.int64)))
    return frames, truth


def test_points_skip_still_frames_within_the_recall_budget(tmp_path: Path) -> None:
    bundle, key = detect_bundle(tmp_path)
    verified = verify_bundle(bundle, [key.public])
    frames, truth = clip()
    points, default, report = calibrate(verified, frames, truth, 1.0, Gate(max_skip=30))
    assert points[0].name == "always" and points[0].gate is None
    assert points[0].val_recall == pytest.approx(1.0)
    gated = points[default]
    assert gated.gate is not None and gated.gate.motion is not None
    # Three changes in 120 frames (appear, jump, leave): most frames are still.
    assert gated.skip_fraction is not None and gated.skip_fraction > 0.6
    assert gated.val_recall is not None and gated.val_recall >= 0.99
    assert len(report["sweep"]) > 1 and report["sweep"][0]["motion"] is not None


def test_without_truth_recall_is_against_the_detectors_own_boxes(tmp_path: Path) -> None:
    bundle, key = detect_bundle(tmp_path)
    verified = verify_bundle(bundle, [key.public])
    frames, _ = clip()
    points, _, report = calibrate(verified, frames, None, 1.0, Gate(max_skip=30))
    assert report["truth"] == "the detector's own detections"
    assert points[0].val_recall == 1.0


def test_a_gate_that_misses_changes_is_not_chosen(tmp_path: Path) -> None:
    bundle, key = detect_bundle(tmp_path)
    verified = verify_bundle(bundle, [key.public])
    frames, truth = clip()
    # A budget of 0 recall points: only thresholds that miss nothing may be chosen, though
    # some on the sweep skip more and lose the jump.
    points, _, report = calibrate(verified, frames, truth, 0.0, Gate(max_skip=30))
    assert any(r["recall_drop_pt"] > 0 for r in report["sweep"])
    assert len(points) >= 2
    assert all(p.val_recall == pytest.approx(1.0) for p in points)


def test_truth_file_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "truth.json"
    bad.write_text(json.dumps({"frames": [[{"class": 0, "box": [5, 5, 1, 9]}]]}))
    with pytest.raises(DataError, match="frame 0 has a box with x2 < x1"):
        read_truth(bad, 1)
    bad.write_text(json.dumps({"frames": [[], []]}))
    with pytest.raises(DataError, match="truth has 2 frames, the clip has 3"):
        read_truth(bad, 3)
    bad.write_text("{}")
    with pytest.raises(DataError, match="not a clip truth file"):
        read_truth(bad, 3)
