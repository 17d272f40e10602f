"""The whole `edgefleet optimize --task detect` on ddddocr's YOLOX character detector.

The scenes are bench.det_data.char_scenes: large light MNIST digits on a dark textured
416 x 416 background, which this captcha model fires on (about 5 boxes a scene; on the small
dark-on-light detection scenes it found 2 boxes per split, too few for agreement to mean
anything). Unlabelled: the scenes carry no boxes for a captcha-character model, so INT8 is
measured against fp32's own detections. Labelled: the same scenes with fp32's boxes written
as the ground truth, which exercises the mAP path of the data contract end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.det_data import Split, char_scenes, write_unlabelled
from bench.det_models import DETECTORS
from edgefleet.agent.bundle import Preprocessing, verify_bundle
from edgefleet.agent.bundle.manifest import Detection
from edgefleet.agent.detect.decode import decode
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.cli import main
from edgefleet.server.keystore import FleetKey
from edgefleet.server.optimize.detect.options import DetectOptions
from edgefleet.server.optimize.detect.run import optimize_detector

DDDDOCR = DETECTORS["ddddocr_det"]
# Few frames: ~100 ms per fp32 frame at 416 x 416 on this machine, several passes each.
SIZES: dict[Split, tuple[int, int]] = {
    "calibration": (6, 11),
    "validation": (6, 12),
    "test": (4, 13),
}
PRE: Preprocessing = DDDDOCR.preprocessing()
SPEC: Detection = DDDDOCR.detection()
# fp32 boxes the validation agreement must rest on (measured: 24 on these 6 scenes at
# the deployed threshold 0.1; deterministic: the scenes and onnxruntime CPU are).
MIN_VAL_BOXES = 20


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
    data = write_unlabelled(tmp_path / "scenes.npz", char_scenes, SIZES)
    out = tmp_path / "out"
    rc = main(
        [
            "optimize", str(ddddocr_det), *DDDDOCR.cli_args(),
            "--data", str(data), "--out", str(out), "--max-drop", "5",
            "--latency-samples", "4", "--keys-dir", str(key.directory),
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "unlabelled" and report["budget"]["within"]
    assert report["budget"]["drop_points"] <= 5.0
    assert report["validation"]["detections_fp32"] >= MIN_VAL_BOXES
    for split in ("validation", "test"):
        assert {"fp32", "int8", "agreement_map50"} <= set(report[split])
        assert {"map50", "map50_95"} <= set(report[split]["int8"])
    assert report["detection"]["decoder"] == "yolox"
    assert set(report["latency_ms"]) == {"fp32", "int8", "int8_bundle"}
    assert report["decisions"]
    assert (out / "report.png").stat().st_size > 0
    _check_bundle(out / "bundle", key, char_scenes(1, 99, "test")[0])


def test_labelled_map_budget(ddddocr_det: Path, tmp_path: Path, key: FleetKey) -> None:
    # Ground truth: fp32's own deployed boxes, so the data's boxes are ones this model finds.
    sess = ort.InferenceSession(str(ddddocr_det), providers=["CPUExecutionProvider"])
    pre = Preprocessor(PRE)
    arrays: dict[str, np.ndarray] = {"labels": np.array(["char"])}
    for split, (n, seed) in SIZES.items():
        images = char_scenes(n, seed, split)
        arrays[f"{split}_images"] = images
        rows = []
        for i, img in enumerate(images):
            dets = decode(sess.run(None, {"images": pre(img)}), SPEC, ["char"], (416, 416))
            for b in dets.boxes:  # 416 x 416 scenes: the input's own pixels
                rows.append([i, 0, *np.clip(b, 0, 416)])
        arrays[f"{split}_boxes"] = np.asarray(rows, np.float32).reshape(-1, 6)
    assert len(arrays["validation_boxes"]) >= MIN_VAL_BOXES
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
