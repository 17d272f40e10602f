"""The decoders against hand-worked outputs: thresholds, NMS, layouts, YOLOX grids, errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.agent.bundle.manifest import Detection
from edgefleet.agent.detect.boxes import Detections, iou_matrix
from edgefleet.agent.detect.decode import DecodeError, decode, nms, yolox_grid

LABELS = ["person", "car"]

# Six yolov8 rows: cx, cy, w, h, score(person), score(car); worked out by hand below.
ROWS = [
    (50, 50, 20, 20, 0.9, 0.1),  # b0 person .9 -> (40, 40, 60, 60)
    (52, 50, 20, 20, 0.8, 0.05),  # b1 person .8, IoU with b0 = 360 / 440 = .82: suppressed
    (52, 50, 20, 20, 0.1, 0.7),  # b2 car .7, on b1's place: another class, kept
    (150, 50, 20, 20, 0.2, 0.1),  # b3 best .2 < .25: dropped
    (60, 50, 20, 20, 0.6, 0.0),  # b4 person .6, IoU with b0 = 200 / 600 = .33: kept
    (100, 100, 10, 40, 0.0, 0.3),  # b5 car .3 -> (95, 80, 105, 120)
]
BOX = {
    0: (40, 40, 60, 60),
    2: (42, 40, 62, 60),
    4: (50, 40, 70, 60),
    5: (95, 80, 105, 120),
}
SCORE = {0: 0.9, 2: 0.7, 4: 0.6, 5: 0.3}
CLASS = {0: 0, 2: 1, 4: 0, 5: 1}


def _v8(rows: Sequence[Sequence[float]] = ROWS, layout: str = "attributes_first") -> Any:
    boxes_first = np.asarray(rows, np.float32)[None]  # (1, N, 4 + C)
    return boxes_first if layout == "boxes_first" else boxes_first.transpose(0, 2, 1).copy()


def _spec(**kw: Any) -> Detection:
    return Detection.model_validate({"decoder": "yolov8", "outputs": ["out"], **kw})


def _expect(dets: Detections, rows: list[int]) -> None:
    np.testing.assert_allclose(dets.boxes, [BOX[r] for r in rows], atol=1e-5)
    np.testing.assert_allclose(dets.scores, [SCORE[r] for r in rows], atol=1e-6)
    assert dets.classes.tolist() == [CLASS[r] for r in rows]
    assert dets.boxes.dtype == np.float32 and dets.scores.dtype == np.float32
    assert dets.classes.dtype == np.int64


@pytest.mark.parametrize("layout", ["attributes_first", "boxes_first"])
def test_yolov8_threshold_and_per_class_nms(layout: str) -> None:
    dets = decode([_v8(layout=layout)], _spec(layout=layout), LABELS, (160, 160))
    _expect(dets, [0, 2, 4, 5])


def test_layouts_give_identical_results_also_in_float16() -> None:
    a = decode([_v8()], _spec(), LABELS, (160, 160))
    b = decode([_v8(layout="boxes_first")], _spec(layout="boxes_first"), LABELS, (160, 160))
    c = decode([_v8().astype(np.float16)], _spec(), LABELS, (160, 160))
    for x in (b, c):
        assert x.classes.tolist() == a.classes.tolist()
        np.testing.assert_allclose(x.boxes, a.boxes, atol=0.05)
        np.testing.assert_allclose(x.scores, a.scores, atol=1e-3)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_class_agnostic_nms_suppresses_across_classes() -> None:
    # b2 (car .7) overlaps b0 (person .9) with IoU .82: gone; b4 and b5 stay.
    _expect(decode([_v8()], _spec(class_agnostic=True), LABELS, (160, 160)), [0, 4, 5])


def test_class_thresholds_from_manifest_and_agent_overrides() -> None:
    _expect(decode([_v8()], _spec(class_thresholds={"car": 0.8}), LABELS, (160, 160)), [0, 4])
    _expect(decode([_v8()], _spec(), LABELS, (160, 160), thresholds={0: 0.95}), [2, 5])
    _expect(decode([_v8()], _spec(), LABELS, (160, 160), score_threshold=0.65), [0, 2])
    # The agent's own threshold wins over the manifest's per-class one...
    spec = _spec(class_thresholds={"car": 0.8})
    _expect(decode([_v8()], spec, LABELS, (160, 160), score_threshold=0.5), [0, 2, 4])
    # ... and the agent's per-class threshold over its own global one.
    got = decode([_v8()], spec, LABELS, (160, 160), score_threshold=0.5, thresholds={1: 0.2})
    _expect(got, [0, 2, 4, 5])


def test_score_equal_to_threshold_is_kept_and_iou_equal_to_nms_iou_is_not_suppressed() -> None:
    rows = [(10, 10, 20, 20, 0.5, 0.0), (10, 5, 20, 10, 0.5, 0.0), (80, 80, 10, 10, 0.4, 0.0)]
    # boxes (0, 0, 20, 20) and (0, 0, 20, 10): IoU = 200 / 400 = .5 exactly
    dets = decode([_v8(rows)], _spec(score_threshold=0.5, nms_iou=0.5), LABELS, (100, 100))
    np.testing.assert_allclose(dets.boxes, [(0, 0, 20, 20), (0, 0, 20, 10)])
    dets = decode([_v8(rows)], _spec(score_threshold=0.5, nms_iou=0.49), LABELS, (100, 100))
    np.testing.assert_allclose(dets.boxes, [(0, 0, 20, 20)])


def test_max_detections_keeps_the_best() -> None:
    _expect(decode([_v8()], _spec(max_detections=2), LABELS, (160, 160)), [0, 2])


def test_nothing_above_threshold_gives_empty_detections() -> None:
    dets = decode([_v8()], _spec(score_threshold=0.99), LABELS, (160, 160))
    assert len(dets) == 0 and dets.boxes.shape == (0, 4)


def test_broken_rows_are_dropped_not_passed_to_nms() -> None:
    rows = [
        (np.nan, 10, 20, 20, 0.9, 0.0),  # NaN centre
        (10, 10, -4, 20, 0.9, 0.0),  # negative width
        (50, 50, 10, 10, np.nan, 0.9),  # a NaN score: the row is broken, whatever the others
        (80, 80, 10, 10, 0.0, 0.3),  # the one sound row
    ]
    dets = decode([_v8(rows)], _spec(), LABELS, (100, 100))
    np.testing.assert_allclose(dets.boxes, [(75, 75, 85, 85)])
    assert dets.classes.tolist() == [1]


def test_per_class_nms_holds_for_boxes_outside_the_input() -> None:
    # OpenCV's NMSBoxesBatched shifts class k by k * (max + 1) = 101: the car box at
    # (-10, -10, 0, 0) would land on (91, 91, 101, 101), over the person box. Ours may not.
    dets = Detections.of([(90, 90, 100, 100), (-10, -10, 0, 0)], [0.9, 0.8], [0, 1])
    kept = nms(dets, 0.45, 100)
    assert len(kept) == 2
    np.testing.assert_allclose(kept.boxes, dets.boxes)


# YOLOX on a 16x16 input with strides 8 and 16: a 2x2 grid (rows 0-3, x fastest), then 1x1.
def _yolox_rows() -> npt.NDArray[np.float32]:
    ln2 = math.log(2.0)
    return np.asarray(
        [
            # raw x, raw y, log w, log h, obj, person, car
            (0.5, 0.5, 0.0, 0.0, 0.9, 0.9, 0.1),  # cell (0, 0) s8: (4, 4) 8x8, .81 person
            (0.25, 0.5, ln2, 0.0, 0.5, 0.2, 0.8),  # cell (1, 0) s8: (10, 4) 16x8, .4 car
            (0.5, 0.5, 0.0, 0.0, 0.9, 0.2, 0.2),  # cell (0, 1) s8: .18 < .25, dropped
            (0.5, 0.5, 0.0, 0.0, 0.1, 0.9, 0.9),  # cell (1, 1) s8: .09, dropped
            (0.5, 0.5, -ln2, 0.0, 0.8, 0.6, 0.0),  # cell (0, 0) s16: (8, 8) 8x16, .48 person
        ],
        np.float32,
    )[None]


def _yolox_spec(**kw: Any) -> Detection:
    return Detection.model_validate(
        {"decoder": "yolox", "outputs": ["head"], "strides": [8, 16], **kw}
    )


def test_yolox_grid_decoded_by_hand() -> None:
    dets = decode([_yolox_rows()], _yolox_spec(), LABELS, (16, 16))
    # (0, 0, 8, 8) and (4, 0, 12, 16): IoU = 32 / 160 = .2, both kept, best first
    np.testing.assert_allclose(dets.boxes, [(0, 0, 8, 8), (4, 0, 12, 16), (2, 0, 18, 8)], atol=1e-5)
    np.testing.assert_allclose(dets.scores, [0.81, 0.48, 0.4], atol=1e-6)
    assert dets.classes.tolist() == [0, 0, 1]


def test_yolox_grid_order_is_row_major_with_x_fastest() -> None:
    grid, stride = yolox_grid((16, 32), (8, 16))
    assert grid[:8].tolist() == [[x, y] for y in range(2) for x in range(4)]
    assert grid[8:].tolist() == [[0, 0], [1, 0]]
    assert stride.tolist() == [8.0] * 8 + [16.0] * 2


def _raises(
    outputs: list[Any], spec: Detection, *needles: str, hw: tuple[int, int] = (16, 16)
) -> str:
    with pytest.raises(DecodeError) as err:
        decode(outputs, spec, LABELS, hw)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    return str(err.value)


def test_yolov8_shape_errors_name_tensor_shape_and_decoder() -> None:
    three_classes = np.zeros((1, 7, 10), np.float32)
    _raises([three_classes], _spec(), "'out'", "(1, 7, 10)", "yolov8", "4 + C = 6")
    _raises([np.zeros((6, 10), np.float32)], _spec(), "'out'", "(6, 10)")
    _raises([np.zeros((2, 6, 10), np.float32)], _spec(), "(2, 6, 10)")
    # An attributes_first tensor read as boxes_first: the declaration is believed, and fails.
    _raises([np.zeros((1, 6, 10), np.float32)], _spec(layout="boxes_first"), "(1, N, 4 + C)")


def test_yolox_shape_errors_name_rows_and_columns() -> None:
    _raises([np.zeros((1, 4, 7), np.float32)], _yolox_spec(), "'head'", "(1, 4, 7)", "N = 5")
    _raises([np.zeros((1, 5, 6), np.float32)], _yolox_spec(), "'head'", "5 + C = 7")
    _raises([_yolox_rows()], _yolox_spec(), "N = 10", hw=(16, 32))


def test_output_count_and_threshold_errors() -> None:
    _raises([_v8(), _v8()], _spec(), "exactly one output")
    _raises([_v8()], _spec(class_thresholds={"bicycle": 0.5}), "'bicycle'")
    with pytest.raises(DecodeError, match="class 2"):
        decode([_v8()], _spec(), LABELS, (16, 16), thresholds={2: 0.5})
    with pytest.raises(DecodeError, match="outside"):
        decode([_v8()], _spec(), LABELS, (16, 16), score_threshold=0.0)
    with pytest.raises(DecodeError, match="label"):
        decode([_v8()], _spec(), [], (16, 16))


def test_detections_take_and_iou() -> None:
    dets = Detections.of([(0, 0, 10, 10), (5, 0, 15, 10)], [0.9, 0.8], [0, 1])
    assert len(dets.take([1])) == 1 and dets.take(np.array([False, True])).classes.tolist() == [1]
    assert len(Detections.empty()) == 0
    np.testing.assert_allclose(iou_matrix(dets.boxes, dets.boxes), [[1, 1 / 3], [1 / 3, 1]])
    assert iou_matrix(dets.boxes, np.zeros((0, 4))).shape == (2, 0)
    with pytest.raises(ValueError, match="boxes"):
        Detections(np.zeros((2, 4), np.float32), np.zeros(1, np.float32), np.zeros(2, np.int64))
