"""The reference detector: MNIST digits in composed scenes, its model, split and video."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray

from edgefleet.agent.bundle.manifest import Detection, Preprocessing

if TYPE_CHECKING:
    from edgefleet.agent.detect.boxes import Detections

from edgefleet.server.reference.detect.paths import (
    DET_CARD_PATH,
    DET_MODEL_PATH,
    DET_SPLIT_PATH,
    DET_VIDEO_PATH,
    DET_VIDEO_TRUTH_PATH,
    DETECT_DIR,
)

__all__ = [
    "DETECT_DIR",
    "DET_CARD_PATH",
    "DET_MODEL_PATH",
    "DET_SPLIT_PATH",
    "DET_VIDEO_PATH",
    "DET_VIDEO_TRUTH_PATH",
]

INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "detections"
INPUT_SIZE: Final = 128
STRIDES: Final = (8, 16)
NUM_CLASSES: Final = 10
LABELS: Final = tuple(str(i) for i in range(NUM_CLASSES))
# Scenes span the whole grey range (dark and light grounds alike), so the input is centred
# on mid-grey rather than on MNIST's dark-ground statistics.
SCALE: Final = 1.0 / 255.0
MEAN: Final = 0.5
STD: Final = 0.25
# Evaluation keeps nearly every candidate (COCO mAP integrates over the score ranking), but
# at most 20 per image: a scene holds at most 5 digits, and pycocotools' time grows with
# the number of detections.
EVAL_SCORE_THRESHOLD: Final = 0.01
EVAL_NMS_IOU: Final = 0.5
EVAL_MAX_DETECTIONS: Final = 20


def preprocessing() -> Preprocessing:
    """The detector's preprocessing as a bundle manifest states it."""
    return Preprocessing(
        height=INPUT_SIZE,
        width=INPUT_SIZE,
        resize="letterbox",
        interpolation="linear",
        color="GRAY",
        layout="NCHW",
        scale=SCALE,
        mean=[MEAN],
        std=[STD],
    )


def detection_spec(score_threshold: float = 0.25) -> Detection:
    """The manifest's detection section for the reference detector."""
    return Detection(
        decoder="yolov8",
        outputs=[OUTPUT_NAME],
        layout="attributes_first",
        score_threshold=score_threshold,
        nms_iou=EVAL_NMS_IOU,
        max_detections=EVAL_MAX_DETECTIONS,
    )


DEPLOYED_SCORE_THRESHOLD: Final = 0.3


def deployed_spec() -> Detection:
    """The detection section the reference detector ships with to cameras.

    NMS across classes (two digits never stand in one place, and the tracker votes a track's
    class, so a second box of another class on the same digit only starts a false track) and
    a 0.3 score threshold (the post at x 112-134 of the video scores 0.25-0.34 as a "1").
    Measured on the reference video (tests/detect_agent/test_reference_video.py): no false
    track, against about 20 at per-class NMS and 0.25. The card's mAP keeps COCO's protocol
    (per-class NMS, threshold 0.01: `detection_spec`).
    """
    return detection_spec(DEPLOYED_SCORE_THRESHOLD).model_copy(update={"class_agnostic": True})


def to_input(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """uint8 grey (N, 128, 128) -> float32 (N, 1, 128, 128), scaled and normalised."""
    x = images.astype(np.float32)[:, None]
    x *= np.float32(SCALE)
    x -= np.float32(MEAN)
    x /= np.float32(STD)
    return x


def predict(model_path: Path, images: NDArray[np.uint8], batch: int = 64) -> list[Detections]:
    """Run the ONNX detector on uint8 grey input-sized images; decoded boxes per image."""
    import onnxruntime as ort

    from edgefleet.agent.detect.decode import decode

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    spec = detection_spec(EVAL_SCORE_THRESHOLD)
    out: list[Detections] = []
    for start in range(0, images.shape[0], batch):
        (raw,) = session.run([OUTPUT_NAME], {INPUT_NAME: to_input(images[start : start + batch])})
        for row in np.asarray(raw):
            out.append(decode([row[None]], spec, LABELS, (INPUT_SIZE, INPUT_SIZE)))
    return out


def coco_map(pred: Sequence[Detections], truth: NDArray[np.float32]) -> dict[str, float]:
    """COCO mAP (pycocotools COCOeval, bbox) of per-image detections against (M, 6) truth rows.

    Boxes are xyxy pixels; images are indexed by position in pred. Returns map50_95, map50,
    map75 and the recall at 100 detections (AR@100).
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "width": INPUT_SIZE, "height": INPUT_SIZE} for i in range(len(pred))]
    anns = []
    for k, (i, c, x1, y1, x2, y2) in enumerate(truth.tolist()):
        w, h = x2 - x1, y2 - y1
        anns.append(
            {
                "id": k + 1,
                "image_id": int(i),
                "category_id": int(c),
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    dets = []
    for i, d in enumerate(pred):
        for box, score, cls in zip(
            d.boxes.tolist(), d.scores.tolist(), d.classes.tolist(), strict=True
        ):
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(cls),
                    "score": float(score),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": LABELS[c]} for c in range(NUM_CLASSES)],
    }
    # pycocotools prints progress on stdout; keep it out of callers' output.
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not dets:
            return {"map50_95": 0.0, "map50": 0.0, "map75": 0.0, "ar100": 0.0}
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {
        "map50_95": round(float(s[0]), 4),
        "map50": round(float(s[1]), 4),
        "map75": round(float(s[2]), 4),
        "ar100": round(float(s[8]), 4),
    }


def evaluate_detector(model_path: Path, split: str) -> dict[str, float]:
    """COCO mAP of an ONNX detector on one recorded scene split (onnxruntime CPU)."""
    from edgefleet.server.datasets.scenes import load_reference_detection

    images, boxes = load_reference_detection(split)
    result = coco_map(predict(model_path, images), boxes)
    return {"images": int(images.shape[0]), "boxes": int(boxes.shape[0]), **result}


def evaluate_video(
    model_path: Path, video_path: Path | None = None, truth_path: Path | None = None
) -> dict[str, float]:
    """COCO mAP on the decoded video frames, through the agent's own letterbox and decode."""
    import json

    import onnxruntime as ort

    from edgefleet.agent.detect.boxes import Detections as Dets
    from edgefleet.agent.detect.decode import decode
    from edgefleet.agent.detect.geometry import Letterbox
    from edgefleet.agent.runtime.preprocess import Preprocessor
    from edgefleet.server.reference.video import read_video

    video_path = DET_VIDEO_PATH if video_path is None else video_path
    truth_path = DET_VIDEO_TRUTH_PATH if truth_path is None else truth_path
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    frames = read_video(video_path)
    spec, pre = preprocessing(), Preprocessor(preprocessing())
    geometry = Letterbox.from_spec(frames.shape[1:3], spec)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    det_spec = detection_spec(EVAL_SCORE_THRESHOLD)
    pred: list[Detections] = []
    rows: list[list[float]] = []
    for f, frame in enumerate(frames):
        (raw,) = session.run([OUTPUT_NAME], {INPUT_NAME: pre(frame)})
        d = decode([raw], det_spec, LABELS, (INPUT_SIZE, INPUT_SIZE))
        pred.append(Dets(geometry.to_frame(d.boxes), d.scores, d.classes))
        rows.extend([f, b["class"], *b["box"]] for b in truth["frames"][f])
    result = coco_map(pred, np.asarray(rows, np.float32).reshape(-1, 6))
    return {"frames": int(frames.shape[0]), "boxes": len(rows), **result}


def model_macs(model_path: Path) -> int:
    """Multiply-accumulates of one inference, as the optimizer counts them."""
    import onnx

    from edgefleet.server.optimize.macs import total_macs

    return int(total_macs(onnx.load(str(model_path))))
