"""Input-tensor pixels <-> camera-frame pixels, the exact inverse of preprocessing's resize.

`edgefleet.agent.runtime.preprocess._fit` resizes a frame to (nh, nw) with rounded sizes
and places it at integer offsets (letterbox: pads; center_crop: cuts). OpenCV's resize maps
pixel edges linearly (edge 0 -> 0, edge w -> nw), so a box edge at frame x sits at
x * nw / w + left in the tensor: the per-axis scales nw / w and nh / h, not the nominal s,
make the inverse exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle.manifest import Preprocessing

from .boxes import Boxes, Detections


@dataclass(frozen=True)
class Letterbox:
    """The affine map of one resize policy: input = frame * scale + offset, per axis."""

    frame_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    @classmethod
    def from_spec(cls, frame_hw: tuple[int, int], preprocessing: Preprocessing) -> Letterbox:
        """The map `_fit` applies to a frame of `frame_hw` (letterbox, stretch, center_crop)."""
        h, w = int(frame_hw[0]), int(frame_hw[1])
        if h < 1 or w < 1:
            raise ValueError(f"frame size {frame_hw} is empty")
        th, tw = preprocessing.height, preprocessing.width
        # Same arithmetic, same order as _fit: its rounding decides where pixels land.
        if preprocessing.resize == "stretch" or (h, w) == (th, tw):
            return cls((h, w), (th, tw), tw / w, th / h, 0.0, 0.0)
        if preprocessing.resize == "letterbox":
            s = min(th / h, tw / w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            top, left = (th - nh) // 2, (tw - nw) // 2
            return cls((h, w), (th, tw), nw / w, nh / h, float(left), float(top))
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        top, left = (nh - th) // 2, (nw - tw) // 2
        return cls((h, w), (th, tw), nw / w, nh / h, float(-left), float(-top))

    def to_frame(self, boxes: npt.ArrayLike) -> Boxes:
        """(N, 4) xyxy boxes in input-tensor pixels -> frame pixels, clipped to the frame."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        h, w = self.frame_hw
        x = np.clip((b[:, 0::2] - self.offset_x) / self.scale_x, 0, w)
        y = np.clip((b[:, 1::2] - self.offset_y) / self.scale_y, 0, h)
        return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)

    def to_input(self, boxes: npt.ArrayLike) -> Boxes:
        """(N, 4) xyxy boxes in frame pixels -> input-tensor pixels (not clipped)."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        x = b[:, 0::2] * self.scale_x + self.offset_x
        y = b[:, 1::2] * self.scale_y + self.offset_y
        return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)

    def detections_to_frame(self, dets: Detections) -> Detections:
        """The detections with their boxes in frame pixels; those wholly in the padding
        (nothing of them left on the frame) are dropped."""
        boxes = self.to_frame(dets.boxes)
        seen = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return Detections(boxes[seen], dets.scores[seen], dets.classes[seen])
