"""The whole `edgefleet optimize --task detect` on nudenet's YOLOv8n (dynamic input dims).

nudenet 3.4.2's 320n.onnx takes ['batch', 3, 'height', 'width'] and writes (1, 22, N):
yolov8 attributes_first over 18 classes. `--size 320` fixes the dims; the scenes (the Grace
Hopper photo pasted on scikit-learn's sample photos, bench.det_data.face_scenes) carry no
boxes, so INT8 is measured against fp32's own FACE_FEMALE boxes. The signed bundle then runs
in the agent's DetectorModel on a 4:3 frame and must find the pasted face in frame pixels.
"""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.det_data import Split, face_scenes, face_scenes_with_pastes, write_unlabelled
from bench.det_models import CACHE, DETECTORS, NUDENET_LABELS, fetch_detector
from bench.zoo_models import fetch_wheel
from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.cli import main
from edgefleet.server.keystore import FleetKey

NUDENET = DETECTORS["nudenet_320n"]
SIZES: dict[Split, tuple[int, int]] = {"calibration": (6, 1), "validation": (8, 2), "test": (4, 3)}


@pytest.fixture(scope="module")
def nudenet() -> Path:
    """320n.onnx out of its wheel (pip download, never installed); a failure, not a skip."""
    try:
        return fetch_detector(NUDENET.name)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.fail(f"cannot fetch {NUDENET.wheel}: {exc}", pytrace=False)


def test_registry_labels_are_the_wheels(nudenet: Path) -> None:
    # The registry's copy must be the wheel's own `__labels`, in output order.
    wheel = fetch_wheel(NUDENET.wheel, CACHE)
    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read("nudenet/nudenet.py").decode())
    found = [
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__labels" for t in node.targets)
    ]
    assert found == [list(NUDENET_LABELS)]
    assert NUDENET.labels == NUDENET_LABELS and len(NUDENET_LABELS) == 18


def test_unlabelled_through_the_cli(nudenet: Path, tmp_path: Path, key: FleetKey) -> None:
    data = write_unlabelled(tmp_path / "faces.npz", face_scenes, SIZES)
    out = tmp_path / "out"
    args = ["optimize", str(nudenet), *NUDENET.cli_args(), "--data", str(data)]
    rc = main(
        [
            *args, "--out", str(out), "--max-drop", "5", "--latency-samples", "4",
            "--keys-dir", str(key.directory),
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "unlabelled" and report["budget"]["within"]
    assert report["budget"]["drop_points"] <= 5.0
    assert report["model"]["input_shape"] == [1, 3, 320, 320]  # the dynamic dims, fixed
    assert report["model"]["classes"] == 18
    assert report["detection"]["decoder"] == "yolov8"
    assert report["detection"]["layout"] == "attributes_first"
    # A face on every validation frame: the agreement rests on real boxes, not on none.
    assert report["validation"]["detections_fp32"] >= SIZES["validation"][0]
    for split in ("validation", "test"):
        assert report[split]["agreement_map50"] >= 0.95
    assert set(report["latency_ms"]) >= {"fp32", "int8", "int8_bundle"}
    # The output-writing Concat (box pixels with probabilities) stays fp32.
    assert report["quantization"]["float_decode_tail"]
    assert (out / "report.png").stat().st_size > 0

    verified = verify_bundle(out / "bundle", [key.public])
    m = verified.manifest
    assert m.task == "detect" and m.detection is not None
    assert m.labels == list(NUDENET_LABELS)  # from our registry, via --labels
    assert m.preprocessing.color == "RGB" and m.preprocessing.resize == "letterbox"
    assert (m.preprocessing.height, m.preprocessing.width) == (320, 320)
    assert [s.exit for s in m.stages] == [None]

    # The agent's runtime on a fresh 240 x 320 test scene (letterboxed into 320 x 320).
    frames, pastes = face_scenes_with_pastes(1, 77, "test")
    model = DetectorModel(verified)
    model.warm_up(1)
    dets = model.detect_frame(frames[0], Preprocessor(m.preprocessing)).detections
    faces = [i for i, c in enumerate(dets.classes) if m.labels[int(c)] == "FACE_FEMALE"]
    assert faces, f"no FACE_FEMALE box: classes {dets.classes.tolist()}"
    x1, y1, x2, y2 = dets.boxes[faces[0]].tolist()
    px1, py1, px2, py2 = pastes[0].box
    h, w = frames[0].shape[:2]
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h  # frame pixels, not the 320 x 320 input
    # The face lies inside the pasted photo: nearly all of the box within the paste.
    ix = max(0.0, min(x2, px2) - max(x1, px1))
    iy = max(0.0, min(y2, py2) - max(y1, py1))
    assert ix * iy >= 0.8 * (x2 - x1) * (y2 - y1)
    assert float(np.asarray(dets.scores)[faces[0]]) >= NUDENET.score_threshold
