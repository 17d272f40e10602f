"""match_detections, the detector health rule, on hand-made boxes (pure numerics)."""

from __future__ import annotations

import numpy as np

from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.update.health import match_detections

LABELS = ["car", "person"]
THR = np.array([0.5, 0.4], np.float32)


def dets(*rows: tuple[float, float, float, float, float, int]) -> Detections:
    """Detections from rows (x1, y1, x2, y2, score, class)."""
    if not rows:
        return Detections.empty()
    a = np.array(rows, np.float64)
    return Detections.of(a[:, :4], a[:, 4], a[:, 5])


def match(golden: Detections, found: Detections, min_iou: float = 0.8, atol: float = 0.05):  # type: ignore[no-untyped-def]
    return match_detections(golden, found, THR, LABELS, min_iou=min_iou, atol=atol)


def test_the_same_boxes_match_with_iou_one() -> None:
    g = dets((0, 0, 10, 10, 0.9, 0), (20, 20, 40, 40, 0.8, 1))
    r = match(g, dets((20, 20, 40, 40, 0.8, 1), (0, 0, 10, 10, 0.9, 0)))
    assert (r.matched, r.excused, r.new_below, r.failures) == (2, 0, 0, [])
    assert r.worst_iou == 1.0 and r.max_score_diff == 0.0


def test_a_box_moved_by_a_tenth_passes_and_by_a_quarter_fails_naming_the_iou() -> None:
    g = dets((0, 0, 100, 100, 0.9, 0))
    ok = match(g, dets((5, 0, 105, 100, 0.88, 0)))  # IoU 95/105 = 0.905
    assert ok.failures == [] and abs(ok.worst_iou - 95 / 105) < 1e-9
    bad = match(g, dets((25, 0, 125, 100, 0.9, 0)))  # IoU 75/125 = 0.6
    assert bad.matched == 0 and len(bad.failures) == 2  # the golden box lost, a new one
    assert bad.failures[0] == (
        "class 'car' golden box [0.0, 0.0, 100.0, 100.0] score 0.900: best match "
        "[25.0, 0.0, 125.0, 100.0] at IoU 0.600 (min 0.8)"
    )
    assert "new box [25.0, 0.0, 125.0, 100.0] score 0.900" in bad.failures[1]
    assert "best IoU 0.600" in bad.failures[1]


def test_a_box_of_another_class_does_not_match() -> None:
    r = match(dets((0, 0, 10, 10, 0.9, 0)), dets((0, 0, 10, 10, 0.9, 1)))
    assert r.matched == 0
    assert r.failures[0].endswith("score 0.900: no box of that class found")
    assert r.failures[1].startswith("class 'person' new box")


def test_near_threshold_boxes_may_vanish_or_appear() -> None:
    # car threshold 0.5, person 0.4, atol 0.05: 0.54 and 0.44 are within it.
    g = dets((0, 0, 10, 10, 0.54, 0))
    r = match(g, dets((50, 50, 60, 60, 0.44, 1)))
    assert (r.matched, r.excused, r.new_below, r.failures) == (0, 1, 1, [])
    # Just outside atol, either way, fails.
    assert match(dets((0, 0, 10, 10, 0.56, 0)), dets()).failures
    assert match(dets(), dets((50, 50, 60, 60, 0.46, 1))).failures


def test_a_matched_score_must_be_within_atol() -> None:
    r = match(dets((0, 0, 10, 10, 0.9, 0)), dets((0, 0, 10, 10, 0.8, 0)))
    assert r.matched == 1 and abs(r.max_score_diff - 0.1) < 1e-6
    assert r.failures == [
        "class 'car' golden box [0.0, 0.0, 10.0, 10.0] score 0.900 is found at IoU 1.000 "
        "but scores 0.800 (atol 0.05)"
    ]


def test_one_found_box_matches_one_golden_box_only() -> None:
    # Two golden boxes over the same place (NMS kept both at the optimizer) and one found:
    # the better golden box takes it, the other is missing.
    g = dets((0, 0, 10, 10, 0.9, 0), (0, 0, 10, 9, 0.7, 0))
    r = match(g, dets((0, 0, 10, 10, 0.9, 0)))
    assert r.matched == 1 and len(r.failures) == 1
    assert "golden box [0.0, 0.0, 10.0, 9.0] score 0.700" in r.failures[0]


def test_no_boxes_on_either_side_is_a_match() -> None:
    r = match(dets(), dets())
    assert (r.matched, r.excused, r.new_below, r.failures, r.worst_iou) == (0, 0, 0, [], 1.0)
