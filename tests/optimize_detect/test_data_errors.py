"""Bad detection data and a wrong decoder are refused with a message naming the cause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.server.cli import main
from edgefleet.server.optimize.detect.data import load_detection
from edgefleet.server.optimize.errors import DataError

IMAGES = np.zeros((2, 32, 48), np.uint8)


def _npz(tmp_path: Path, **boxes: np.ndarray) -> Path:
    arrays: dict[str, Any] = {f"{s}_images": IMAGES for s in ("calibration", "validation", "test")}
    ok = np.array([[0, 0, 1, 1, 10, 10], [1, 1, 2, 2, 20, 20]], np.float32)
    arrays |= {"validation_boxes": ok, "test_boxes": ok}
    arrays |= {f"{k}": v for k, v in boxes.items()}
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_good_data_loads_labelled(tmp_path: Path) -> None:
    data = load_detection(_npz(tmp_path), classes=2)
    assert data.labelled and data.names == ["0", "1"]
    assert [len(d) for d in data.truth["validation"] or []] == [1, 1]


def test_box_outside_the_image(tmp_path: Path) -> None:
    bad = np.array([[0, 0, 1, 1, 10, 10], [1, 1, 40, 2, 60, 20]], np.float32)
    with pytest.raises(DataError, match=r"'validation_boxes' row 1: .* outside image 1 of 48x32"):
        load_detection(_npz(tmp_path, validation_boxes=bad), classes=2)


def test_class_id_not_below_label_count(tmp_path: Path) -> None:
    bad = np.array([[0, 0, 1, 1, 10, 10], [1, 2, 2, 2, 20, 20]], np.float32)
    with pytest.raises(DataError, match="class id 2 is not below the label count 2"):
        load_detection(_npz(tmp_path, test_boxes=bad), classes=2)


def test_labels_do_not_match_the_model(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has 3 label\(s\) .* model outputs 2 class"):
        load_detection(_npz(tmp_path, labels=np.array(["a", "b", "c"])), classes=2)


def test_class_without_validation_box(tmp_path: Path) -> None:
    only0 = np.array([[0, 0, 1, 1, 10, 10]], np.float32)
    with pytest.raises(DataError, match=r"validation has no box of class\(es\) \['1'\]"):
        load_detection(_npz(tmp_path, validation_boxes=only0), classes=2)


def test_no_boxes_is_unlabelled(tmp_path: Path) -> None:
    path = tmp_path / "u.npz"
    np.savez(path, **{f"{s}_images": IMAGES for s in ("calibration", "validation", "test")})  # type: ignore[arg-type]
    data = load_detection(path, classes=1)
    assert not data.labelled and data.truth["test"] is None


def test_output_shape_not_matching_decoder(
    ddddocr_det: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ddddocr's (1, 3549, 6) rows are the grids of strides 8, 16, 32 over 416x416.
    data = tmp_path / "u.npz"
    np.savez(data, **{f"{s}_images": IMAGES for s in ("calibration", "validation", "test")})  # type: ignore[arg-type]
    rc = main(
        [
            "optimize", str(ddddocr_det), "--task", "detect", "--decoder", "yolox",
            "--strides", "8,16", "--data", str(data), "--out", str(tmp_path / "o"),
            "--color", "BGR", "--scale", "1", "--keys-dir", str(tmp_path / "k"),
        ]
    )  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "output 'output' has shape [1, 3549, 6]; decoder yolox" in err
    assert "N = 3380 rows" in err
