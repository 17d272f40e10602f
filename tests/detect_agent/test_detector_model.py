"""DetectorModel on a real detect bundle: boxes in frame pixels, thresholds, bad outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.runtime.detector import DecodeError, DetectorModel
from edgefleet.agent.runtime.preprocess import Preprocessor

from .helpers import FRAME, detect_bundle, frame_with_square


def _model(tmp_path: Path, **changes: object) -> tuple[DetectorModel, Preprocessor]:
    bundle, key = detect_bundle(tmp_path, **changes)
    model = DetectorModel(verify_bundle(bundle, [key.public]))
    m = model.manifest
    return model, Preprocessor(m.preprocessing, dtype=m.input.dtype)


def test_a_square_is_one_box_in_frame_pixels(tmp_path: Path) -> None:
    model, pre = _model(tmp_path)
    assert model.warm_up(1) > 0
    found = model.detect_frame(frame_with_square((1, 2)), pre)
    d = found.detections
    assert len(d) == 1 and int(d.classes[0]) == 0 and d.scores[0] > 0.95
    # Cell (row 1, col 2) of the 32x32 input is x 16..24, y 8..16; the frame is twice as big.
    np.testing.assert_allclose(d.boxes[0], [32, 16, 48, 32], atol=1e-4)
    assert len(found.stage_ms) == 1 and found.stage_ms[0] >= 0


def test_letterbox_maps_back_to_a_wide_frame(tmp_path: Path) -> None:
    model, pre = _model(tmp_path)
    wide = np.zeros((FRAME, 2 * FRAME, 3), np.uint8)  # 64x128: scale 1/4, 8 rows of padding
    wide[0:32, 64:96] = 255  # input x 16..24, y 8..16: cell (1, 2)
    d = model.detect_frame(wide, pre).detections
    assert len(d) == 1
    np.testing.assert_allclose(d.boxes[0], [64, 0, 96, 32], atol=1e-4)


def test_empty_frame_has_no_boxes_and_device_thresholds_apply(tmp_path: Path) -> None:
    model, pre = _model(tmp_path)
    assert len(model.detect_frame(frame_with_square(None), pre).detections) == 0
    grey = frame_with_square((0, 0))
    grey[grey == 255] = 153  # score 0.6: above the bundle's 0.5
    assert len(model.detect_frame(grey, pre).detections) == 1
    model.set_class_thresholds({"square": 0.7})  # this device asks for more
    assert len(model.detect_frame(grey, pre).detections) == 0


def test_unknown_label_and_exit_thresholds_are_refused(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    with pytest.raises(ValueError, match=r"'person'.*does not have"):
        model.set_class_thresholds({"person": 0.5})
    with pytest.raises(ValueError, match="no exits"):
        model.set_thresholds([0.9])
    model.set_thresholds([])  # what a detector's operating points carry


def test_outputs_that_do_not_match_the_declaration_raise_decode_error(tmp_path: Path) -> None:
    # The model emits (1, 5, 16); declared boxes_first it reads as 5 boxes of 16 attributes.
    model, pre = _model(tmp_path, layout="boxes_first")
    with pytest.raises(DecodeError, match="boxes"):
        model.detect_frame(frame_with_square((1, 2)), pre)
