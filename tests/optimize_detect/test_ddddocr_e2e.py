"""The whole `edgefleet optimize --task detect` on ddddocr's YOLOX character detector.

Unlabelled: MNIST scenes carry no boxes for a captcha-character model, so INT8 is measured
against fp32's own detections. Labelled: the same scenes with fp32's boxes written as the
ground truth, which exercises the mAP path of the data contract end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefleet.agent.bundle import Preprocessing, verify_bundle
from edgefleet.agent.bundle.manifest import Detection
from edgefleet.agent.detect.decode import decode
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.cli import main
from edgefleet.server.keystore import FleetKey
from edgefleet.server.optimize.detect.options import DetectOptions
from edgefleet.server.optimize.detect.run import optimize_detector

from .conftest import scenes

SIZES = {"calibration": (8, 11), "validation": (12, 12), "test": (8, 13)}
PRE = Preprocessing(
    height=416, width=416, resize="letterbox", color="BGR", scale=1.0, mean=[0.0] * 3, std=[1.0] * 3
)
SPEC = Detection(
    decoder="yolox", outputs=["output"], score_threshold=0.1, nms_iou=0.45, class_agnostic=True
)


def _unlabelled(path: Path) -> Path:
    np.savez(path, **{f"{s}_images": scenes(n, seed)[0] for s, (n, seed) in SIZES.items()})  # type: ignore[arg-type]
    return path


def _check_bundle(bundle: Path, key: FleetKey, image: np.ndarray) -> None:
    verified = verify_bundle(bundle, [key.public])
    m = verified.manifest
    assert m.task == "detect" and m.detection is not None
    assert [s.exit for s in m.stages] == [None] and len(m.stages) == 1
    assert m.preprocessing.resize == "letterbox"
    assert any(op.gate is None for op in m.operating_points)
    assert {"map50", "map50_95", "agreement_map50"} <= set(m.metrics.extra)
    assert m.health is not None and m.health.min_iou == 0.8  # detector golden boxes
    staged = StagedModel(verified)
    staged.warm_up(1)
    x = Preprocessor(m.preprocessing)(image)
    raw = staged.raw_outputs(x)
    assert raw[0].shape == (1, 3549, 6)
    decode(raw, m.detection, m.labels, (416, 416))  # the agent's decoder reads it


def test_unlabelled_through_the_cli(ddddocr_det: Path, tmp_path: Path, key: FleetKey) -> None:
    data = _unlabelled(tmp_path / "scenes.npz")
    out = tmp_path / "out"
    rc = main(
        [
            "optimize", str(ddddocr_det), "--task", "detect", "--decoder", "yolox",
            "--data", str(data), "--out", str(out), "--color", "BGR", "--scale", "1",
            "--score-threshold", "0.1", "--class-agnostic", "--labels", "char",
            "--max-drop", "5", "--latency-samples", "4", "--keys-dir", str(key.directory),
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "unlabelled" and report["budget"]["within"]
    assert report["budget"]["drop_points"] <= 5.0
    for split in ("validation", "test"):
        assert {"fp32", "int8", "agreement_map50"} <= set(report[split])
        assert {"map50", "map50_95"} <= set(report[split]["int8"])
    assert report["detection"]["decoder"] == "yolox"
    assert set(report["latency_ms"]) == {"fp32", "int8", "int8_bundle"}
    assert report["decisions"]
    assert (out / "report.png").stat().st_size > 0
    _check_bundle(out / "bundle", key, scenes(1, 99)[0][0])


def test_labelled_map_budget(ddddocr_det: Path, tmp_path: Path, key: FleetKey) -> None:
    # Ground truth: fp32's own deployed boxes, so the data's boxes are ones this model finds.
    sess = ort.InferenceSession(str(ddddocr_det), providers=["CPUExecutionProvider"])
    pre = Preprocessor(PRE)
    arrays: dict[str, np.ndarray] = {"labels": np.array(["char"])}
    for split, (n, seed) in SIZES.items():
        images = scenes(n, seed)[0]
        arrays[f"{split}_images"] = images
        rows = []
        for i, img in enumerate(images):
            dets = decode(sess.run(None, {"images": pre(img)}), SPEC, ["char"], (416, 416))
            for b in dets.boxes / 416 * 128:  # square scenes: no padding, one scale
                rows.append([i, 0, *np.clip(b, 0, 128)])
        arrays[f"{split}_boxes"] = np.asarray(rows, np.float32).reshape(-1, 6)
    assert len(arrays["validation_boxes"]) > 0
    data = tmp_path / "labelled.npz"
    np.savez(data, **arrays)  # type: ignore[arg-type]
    opts = DetectOptions(max_drop=5.0, latency_samples=4, latency_rounds=2, color_given=True)
    report = optimize_detector(ddddocr_det, data, tmp_path / "out", PRE, SPEC, key, opts)
    assert report["mode"] == "labelled"
    budget = report["budget"]
    assert budget["reference_val_metric"] > 0.9  # its own boxes, up to rounding
    assert budget["within"] and budget["drop_points"] <= 5.0
    assert report["validation"]["int8"]["truths"] == len(arrays["validation_boxes"])
    _check_bundle(tmp_path / "out" / "bundle", key, arrays["test_images"][0])
