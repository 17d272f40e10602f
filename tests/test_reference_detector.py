"""The committed reference detector, its card, its COCO figures and its video truth."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort

from edgefleet.agent.detect.boxes import Detections
from edgefleet.server.datasets import scenes
from edgefleet.server.reference import detect
from edgefleet.server.reference.video import read_video


def _card() -> dict:  # type: ignore[type-arg]
    return json.loads(detect.DET_CARD_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_onnx_output_is_the_yolov8_layout() -> None:
    model = onnx.load(str(detect.DET_MODEL_PATH))
    assert [i.name for i in model.graph.input] == [detect.INPUT_NAME]
    assert [o.name for o in model.graph.output] == [detect.OUTPUT_NAME]
    # BatchNorm folded before export.
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    session = ort.InferenceSession(str(detect.DET_MODEL_PATH), providers=["CPUExecutionProvider"])
    size = detect.INPUT_SIZE
    n = sum((size // s) ** 2 for s in detect.STRIDES)
    x = np.zeros((1, 1, size, size), np.float32)
    (out,) = session.run(None, {detect.INPUT_NAME: x})
    assert out.shape == (1, 4 + detect.NUM_CLASSES, n) == (1, 14, _card()["output"]["num_anchors"])
    scores = out[0, 4:]
    assert scores.min() >= 0.0 and scores.max() <= 1.0


def test_test_map_matches_the_card() -> None:
    card = _card()
    got = detect.evaluate_detector(detect.DET_MODEL_PATH, "test")
    want = card["metrics"]["test"]
    assert abs(got["map50"] - want["map50"]) <= 0.005
    assert abs(got["map50_95"] - want["map50_95"]) <= 0.005
    assert card["preprocessing"] == detect.preprocessing().model_dump(mode="json")


def _dets(rows: list[list[float]]) -> Detections:
    a = np.asarray(rows, np.float32).reshape(-1, 6)
    return Detections(a[:, :4].copy(), a[:, 4].copy(), a[:, 5].astype(np.int64))


def test_coco_map_perfect_shifted_and_empty() -> None:
    truth = np.asarray([[0, 3, 10, 10, 30, 40], [1, 7, 50, 60, 70, 90]], np.float32)
    perfect = [_dets([[10, 10, 30, 40, 0.9, 3]]), _dets([[50, 60, 70, 90, 0.8, 7]])]
    assert detect.coco_map(perfect, truth)["map50_95"] == 1.0
    # Shifted by 3 px: still a hit at IoU 0.5, not at the strict thresholds.
    shifted = [_dets([[13, 13, 33, 43, 0.9, 3]]), _dets([[53, 63, 73, 93, 0.8, 7]])]
    m = detect.coco_map(shifted, truth)
    assert m["map50"] == 1.0 and m["map50_95"] < 0.7
    wrong_class = [_dets([[10, 10, 30, 40, 0.9, 4]]), _dets([[50, 60, 70, 90, 0.8, 7]])]
    assert detect.coco_map(wrong_class, truth)["map50"] < 0.6
    assert detect.coco_map([_dets([]), _dets([])], truth)["map50"] == 0.0


def test_video_frames_and_truth_agree() -> None:
    truth = json.loads(detect.DET_VIDEO_TRUTH_PATH.read_text(encoding="utf-8"))
    data = detect.DET_VIDEO_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == truth["sha256"]
    assert len(data) < 2_000_000
    frames = read_video(detect.DET_VIDEO_PATH)
    width, height = truth["frame_size"]
    assert frames.shape == (truth["num_frames"], height, width, 3) == (600, 120, 160, 3)
    assert len(truth["frames"]) == truth["num_frames"]
    _, labels = scenes.training_pool("test")
    seen: dict[int, list[int]] = {}
    for f, boxes in enumerate(truth["frames"]):
        for b in boxes:
            x1, y1, x2, y2 = b["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            seen.setdefault(b["track_id"], []).append(f)
    objects = {o["track_id"]: o for o in truth["objects"]}
    assert set(objects) == set(seen)
    for tid, fs in seen.items():
        o = objects[tid]
        assert (o["first_frame"], o["last_frame"]) == (fs[0], fs[-1])
        assert sorted(set(range(fs[0], fs[-1] + 1)) - set(fs)) == o["hidden_frames"]
        # Digits come from the test pool only, with their own labels.
        assert o["class"] == int(labels[o["test_pool_index"]])
    assert any(o["hidden_frames"] for o in objects.values())
    # Quiet segments with nothing in view exist (a motion gate can skip them).
    quiet = [s for s in truth["segments"] if s["kind"] == "quiet"]
    assert any(not any(truth["frames"][s["first_frame"] : s["last_frame"] + 1]) for s in quiet)


def test_video_map_matches_the_card() -> None:
    # Through the agent's letterbox preprocessing, decode and inverse geometry.
    got = detect.evaluate_video(detect.DET_MODEL_PATH)
    want = _card()["metrics"]["video"]
    assert got["boxes"] == want["boxes"]
    assert abs(got["map50"] - want["map50"]) <= 0.005
