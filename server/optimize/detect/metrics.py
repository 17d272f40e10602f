"""Detection accuracy: COCO mAP (pycocotools' COCOeval) on in-memory boxes.

COCOeval is the reference implementation every detector paper quotes, so our figures mean
what a reader expects: AP per class over 101 recall points, averaged over the classes that
have ground truth; mAP@0.5 at IoU 0.5 and mAP@0.5:0.95 averaged over IoU 0.50, 0.55, .., 0.95.

Boxes are xyxy in the same pixel frame for predictions and ground truth. A set without any
ground-truth box has no AP in COCO's sense (-1); here it scores 1.0 when there are no
predictions either (nothing to find, nothing found) and 0.0 otherwise, so that agreement
between two models that both see nothing is perfect, not undefined.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt


class Boxes(Protocol):
    """What the metrics read of a frame's detections (agent/detect/boxes.py Detections)."""

    @property
    def boxes(self) -> npt.NDArray[np.float32]: ...  # (N, 4) xyxy

    @property
    def scores(self) -> npt.NDArray[np.float32]: ...  # (N,)

    @property
    def classes(self) -> npt.NDArray[np.int64]: ...  # (N,)


@dataclass(frozen=True)
class MapResult:
    """COCO mAP of one set of predictions against one set of ground truth."""

    map50: float
    map50_95: float
    images: int
    truths: int
    predictions: int
    per_class50: dict[int, float]  # classes with ground truth only

    def to_report(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "map50": self.map50,
            "map50_95": self.map50_95,
            "images": self.images,
            "truths": self.truths,
            "predictions": self.predictions,
            "per_class_map50": {str(k): v for k, v in sorted(self.per_class50.items())},
        }


def _xywh(boxes: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def coco_map(predictions: Sequence[Boxes], truths: Sequence[Boxes]) -> MapResult:
    """mAP@0.5 and mAP@0.5:0.95 of predictions against ground truth, frame by frame.

    truths' scores are ignored. Every frame counts, also frames without ground truth (their
    predictions are false positives). COCO keeps at most maxDets predictions per frame; that
    limit is raised to the largest count given, so nothing a model output is cut here.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} frames of predictions, {len(truths)} of truth")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1, "width": 1, "height": 1} for i in range(len(truths))]
    anns: list[dict[str, Any]] = []
    for i, t in enumerate(truths):
        for box, cls in zip(_xywh(t.boxes), np.asarray(t.classes).tolist(), strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(cls),
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    dets: list[dict[str, Any]] = []
    most = 0
    for i, p in enumerate(predictions):
        most = max(most, len(p.scores))
        for box, score, cls in zip(
            _xywh(p.boxes),
            np.asarray(p.scores, dtype=np.float64).tolist(),
            np.asarray(p.classes).tolist(),
            strict=True,
        ):
            dets.append(
                {"image_id": i + 1, "category_id": int(cls), "bbox": box.tolist(), "score": score}
            )
    n_img, n_gt, n_dt = len(images), len(anns), len(dets)
    if not anns:
        value = 1.0 if not dets else 0.0
        return MapResult(value, value, n_img, 0, n_dt, {})
    gt_classes = sorted({a["category_id"] for a in anns})
    if not dets:
        return MapResult(0.0, 0.0, n_img, n_gt, 0, dict.fromkeys(gt_classes, 0.0))
    categories = sorted(gt_classes + [d["category_id"] for d in dets])
    # COCOeval prints its progress to stdout: kept out of the optimizer's own output.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": c} for c in dict.fromkeys(categories)],
        }
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.maxDets = [1, 10, max(100, most)]
        ev.evaluate()
        ev.accumulate()
    # precision: (IoU thresholds T, recall points R, classes K, area ranges A, maxDets M);
    # area range 0 is "all", maxDets index 2 the largest. -1 marks a class without truth.
    precision = ev.eval["precision"][:, :, :, 0, 2]
    cat_ids = list(ev.params.catIds)
    per_class50: dict[int, float] = {}
    per_class: list[float] = []
    for k, cat in enumerate(cat_ids):
        if cat not in gt_classes:
            continue
        p = precision[:, :, k]
        per_class50[int(cat)] = float(np.mean(p[0][p[0] > -1])) if (p[0] > -1).any() else 0.0
        per_class.append(float(np.mean(p[p > -1])) if (p > -1).any() else 0.0)
    map50 = float(np.mean(list(per_class50.values())))
    return MapResult(map50, float(np.mean(per_class)), n_img, n_gt, n_dt, per_class50)


def agreement_map50(quantized: Sequence[Boxes], reference: Sequence[Boxes]) -> float:
    """mAP@0.5 of one model's detections scored against another's taken as ground truth.

    How the optimizer measures an INT8 detector where no labels exist for the data (a
    third-party model on our scenes): 1.0 when INT8 finds exactly what fp32 finds.
    """
    return coco_map(quantized, reference).map50
