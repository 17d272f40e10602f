"""Polygon zones in frame pixels: which detections stand inside them.

An object is in a zone when the bottom-centre of its box is (on the ground, where it
stands, as Frigate does): a person whose head overlaps a driveway polygon drawn on the
ground is not on the driveway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .boxes import Detections


class Zone(BaseModel):
    """A named polygon of at least three [x, y] points in frame pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, description="reported with the events")
    points: list[tuple[float, float]] = Field(
        min_length=3, max_length=256, description="[x, y] vertices in frame pixels, in order"
    )

    @field_validator("points")
    @classmethod
    def _polygon(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        pts = np.asarray(value, np.float64)
        if not np.isfinite(pts).all():
            raise ValueError("zone points must be finite numbers")
        # A polygon without area (all points on a line) contains nothing: a config mistake.
        x, y = pts[:, 0], pts[:, 1]
        if abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) < 1e-9:
            raise ValueError(f"zone points {value} enclose no area")
        return value

    def contour(self) -> npt.NDArray[np.float32]:
        """The polygon as OpenCV takes it: (K, 1, 2) float32."""
        # Built per call (a few points), not kept: a numpy attribute breaks model equality.
        return np.asarray(self.points, np.float32).reshape(-1, 1, 2)

    def in_zone(self, box: Sequence[float] | npt.NDArray[Any]) -> bool:
        """True when the xyxy box's bottom-centre lies inside the polygon or on its edge."""
        return _inside(self.contour(), box)

    def mask(self, dets: Detections) -> npt.NDArray[np.bool_]:
        """(N,) which detections stand in the zone."""
        contour = self.contour()
        return np.fromiter((_inside(contour, b) for b in dets.boxes), bool, count=len(dets))

    def filter(self, dets: Detections) -> Detections:
        """The detections that stand in the zone, in their order."""
        return dets.take(self.mask(dets))


def _inside(contour: npt.NDArray[np.float32], box: Sequence[float] | npt.NDArray[Any]) -> bool:
    x1, _, x2, y2 = (float(v) for v in box)
    return cv2.pointPolygonTest(contour, ((x1 + x2) / 2, y2), False) >= 0


def in_any_zone(dets: Detections, zones: Sequence[Zone]) -> Detections:
    """The detections standing in at least one zone; all of them when there are no zones."""
    if not zones:
        return dets
    keep = np.zeros(len(dets), bool)
    for zone in zones:
        keep |= zone.mask(dets)
    return dets.take(keep)
