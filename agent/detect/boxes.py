"""A frame's detections as three parallel arrays, and the box arithmetic shared by all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Boxes = npt.NDArray[np.float32]
"""(N, 4) float32 boxes, rows x1, y1, x2, y2 (x right, y down, pixel edges)."""


@dataclass(frozen=True)
class Detections:
    """N boxes (xyxy float32), their scores (float32) and class indices (int64), best first."""

    boxes: Boxes
    scores: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.classes.shape != (n,) or self.scores.ndim != 1:
            raise ValueError(
                f"detections need boxes (N, 4), scores (N,), classes (N,); got "
                f"{self.boxes.shape}, {self.scores.shape}, {self.classes.shape}"
            )

    @classmethod
    def empty(cls) -> Detections:
        """No detections."""
        return cls(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)
        )

    @classmethod
    def of(cls, boxes: Any, scores: Any, classes: Any) -> Detections:
        """Detections from array-likes, converted to the canonical dtypes."""
        return cls(
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(scores, np.float32).reshape(-1),
            np.asarray(classes, np.int64).reshape(-1),
        )

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, idx: npt.ArrayLike) -> Detections:
        """The detections at `idx` (indices or a boolean mask), in that order."""
        i = np.asarray(idx)
        if i.dtype != np.bool_:
            i = i.astype(np.intp, copy=False).reshape(-1)
        return Detections(self.boxes[i], self.scores[i], self.classes[i])


def box_area(boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Areas of (N, 4) xyxy boxes; inverted boxes have area 0."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = np.clip(b[:, 2] - b[:, 0], 0, None), np.clip(b[:, 3] - b[:, 1], 0, None)
    area: npt.NDArray[np.float64] = w * h
    return area


def iou_matrix(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(len(a), len(b)) intersection over union of xyxy boxes; 0 where the union is empty."""
    a64 = np.asarray(a, np.float64).reshape(-1, 4)
    b64 = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a64[:, None, :2], b64[None, :, :2])
    rb = np.minimum(a64[:, None, 2:], b64[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a64)[:, None] + box_area(b64)[None, :] - inter
    out: npt.NDArray[np.float64] = np.zeros(inter.shape, np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def xywh_to_xyxy(cxcywh: npt.NDArray[Any]) -> Boxes:
    """(N, 4) centre x, centre y, width, height -> (N, 4) float32 x1, y1, x2, y2."""
    c = np.asarray(cxcywh, np.float32)
    half = c[:, 2:4] * np.float32(0.5)
    return np.concatenate([c[:, :2] - half, c[:, :2] + half], axis=1)
