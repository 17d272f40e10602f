"""The whole `edgefleet optimize --task detect` on the reference detector, through the CLI.

Labelled data (the recorded scene splits, cut down so the test takes seconds), the mAP
budget, motion-gate points calibrated on a validation clip with its truth, the signed
bundle with the detector's golden boxes, and the bundle run by the agent's own runtime on
the reference video.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.cli import main
from edgefleet.server.datasets import scenes
from edgefleet.server.datasets.clips import write_validation_clip
from edgefleet.server.keystore import init_key
from edgefleet.server.reference import detect as ref
from edgefleet.server.reference.video import read_video

# Images per split taken from the recorded splits (calibration, validation, test).
TAKE = {"calibration": 64, "validation": 150, "test": 100}


def _data(path: Path) -> Path:
    arrays: dict[str, np.ndarray] = {"labels": np.asarray(ref.LABELS)}
    for split, n in TAKE.items():
        images, boxes = scenes.load_reference_detection(split)
        arrays[f"{split}_images"] = images[:n]
        arrays[f"{split}_boxes"] = boxes[boxes[:, 0] < n]
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_reference_detector_through_the_cli(tmp_path: Path) -> None:
    data = _data(tmp_path / "scenes.npz")
    clip, truth = write_validation_clip(tmp_path / "clip")
    keys = tmp_path / "keys"
    out = tmp_path / "out"
    args = [
        "optimize", str(ref.DET_MODEL_PATH), "--task", "detect", "--decoder", "yolov8",
        "--data", str(data), "--out", str(out), "--keys-dir", str(keys),
        "--color", "GRAY", "--mean", str(ref.MEAN), "--std", str(ref.STD),
        "--labels", ",".join(ref.LABELS), "--max-drop", "1.0",
        "--gate-clip", str(clip), "--gate-truth", str(truth), "--latency-samples", "20",
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "labelled"
    budget = report["budget"]
    assert budget["within"] and budget["drop_points"] <= 1.0 + 1e-9
    # The fp32 model is a working detector on these scenes (card: 0.84 on all 500).
    assert report["validation"]["fp32"]["map50"] > 0.7
    assert {"fp32", "int8"} <= set(report["test"]) and report["latency_ms"]["int8"] > 0
    assert (out / "report.png").stat().st_size > 0

    key, _ = init_key(keys)
    verified = verify_bundle(out / "bundle", [key.public])
    m = verified.manifest
    assert m.task == "detect" and m.detection is not None and m.detection.decoder == "yolov8"
    assert m.labels == list(ref.LABELS) and m.preprocessing.resize == "letterbox"
    assert m.health is not None and m.health.min_iou is not None
    points = m.operating_points
    assert points[0].name == "always" and points[0].gate is None
    gated = points[m.default_operating_point]
    assert gated.gate is not None and gated.skip_fraction is not None
    # The validation clip is mostly quiet: the gate skips a good share within the budget.
    assert gated.skip_fraction > 0.2
    assert points[0].val_recall is not None and gated.val_recall is not None
    assert (points[0].val_recall - gated.val_recall) * 100 <= 1.0 + 1e-9

    # The agent's runtime finds digits on the reference video in frame pixels.
    model = DetectorModel(verified)
    pre = Preprocessor(m.preprocessing)
    frames = read_video(ref.DET_VIDEO_PATH)
    doc = json.loads(ref.DET_VIDEO_TRUTH_PATH.read_text())
    busy = [i for i, f in enumerate(doc["frames"]) if len(f) >= 2][:20]
    found = [model.detect_frame(frames[i], pre).detections for i in busy]
    assert sum(len(d) for d in found) >= len(busy)
    for d in found:
        assert (d.boxes[:, 2] <= frames.shape[2]).all() and (d.boxes[:, 3] <= frames.shape[1]).all()
