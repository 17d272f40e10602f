"""COCO mAP against hand-worked cases (pycocotools' 101-point interpolated AP)."""

from __future__ import annotations

import pytest

from edgefleet.agent.detect.boxes import Detections
from edgefleet.server.optimize.detect.metrics import agreement_map50, coco_map

TWO = Detections.of([[10, 10, 50, 50], [60, 60, 100, 100]], [1, 1], [0, 0])


def test_perfect_predictions_score_one() -> None:
    r = coco_map([TWO], [TWO])
    assert (r.map50, r.map50_95) == (1.0, 1.0)
    assert agreement_map50([TWO], [TWO]) == 1.0


def test_one_of_two_missed_gives_51_of_101() -> None:
    # Recall reaches 0.5 at precision 1: the recall points 0.00..0.50 (51 of 101) score 1.
    found = Detections.of([[10, 10, 50, 50]], [0.9], [0])
    r = coco_map([found], [TWO])
    assert r.map50 == pytest.approx(51 / 101)
    assert r.map50_95 == pytest.approx(51 / 101)


def test_false_positive_ranked_first_halves_precision() -> None:
    # A wrong box scored above the right one: precision 1/2 at recall 1 for one truth box.
    truth = Detections.of([[10, 10, 50, 50]], [1], [0])
    preds = Detections.of([[200, 200, 240, 240], [10, 10, 50, 50]], [0.9, 0.8], [0, 0])
    assert coco_map([preds], [truth]).map50 == pytest.approx(0.5)


def test_shifted_box_passes_050_not_095() -> None:
    # IoU of a 40-wide box shifted by 8 px: 32*40 / (2*1600 - 1280) = 2/3.
    truth = Detections.of([[0, 0, 40, 40]], [1], [0])
    pred = Detections.of([[8, 0, 48, 40]], [0.9], [0])
    r = coco_map([pred], [truth])
    assert r.map50 == pytest.approx(1.0)
    # IoU 0.667 passes thresholds 0.50..0.65 (4 of 10).
    assert r.map50_95 == pytest.approx(0.4)


def test_mean_over_classes_with_truth_and_wrong_class_counts_nothing() -> None:
    truth = Detections.of([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [0, 1])
    preds = Detections.of([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.9], [0, 2])
    r = coco_map([preds], [truth])
    assert r.per_class50 == pytest.approx({0: 1.0, 1: 0.0})
    assert r.map50 == pytest.approx(0.5)


def test_no_truth_anywhere() -> None:
    none = Detections.empty()
    assert agreement_map50([none], [none]) == 1.0
    assert agreement_map50([TWO], [none]) == 0.0
    assert coco_map([none], [TWO]).map50 == 0.0
