"""Skip the detector on frames where nothing moved (the manifest's `Gate`, as in Frigate).

The frame is shrunk to `gate.width` pixels (aspect kept), turned grey and blurred, then
compared with a running average of the past frames; a pixel moved when it differs from the
average by more than `gate.pixel_threshold` grey levels. The detector runs when at least
`gate.motion` of the pixels moved, on the first frame (and after a change of frame size),
and after `gate.max_skip` skipped frames in a row whatever the motion, so a still object
that the motion test cannot see is still looked at regularly.
"""

from __future__ import annotations

from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle.manifest import Gate

# Weight of the newest frame in the running average: the background follows slow changes
# (light, a parked car) within a few frames while a moving object still stands out.
ALPHA = 0.2
_BLUR = (5, 5)


class MotionGate:
    """Decides per frame whether the detector must run; counts what it decided."""

    def __init__(self, gate: Gate, alpha: float = ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha {alpha} outside (0, 1]")
        self.gate = gate
        self.alpha = alpha
        self.frames = 0
        self.ran = 0
        self.skipped = 0
        self.skipped_in_a_row = 0
        self.moved_fraction: float | None = None  # of the last frame; None when not measured
        self._avg: npt.NDArray[np.float32] | None = None
        self._frame_shape: tuple[int, ...] | None = None

    def should_run(self, frame_bgr: npt.NDArray[Any], force: bool = False) -> bool:
        """True when the detector must look at this frame (BGR, BGRA or grey uint8).

        `force` runs it whatever the motion (the tracker is unsettled); the frame still joins
        the background, so the motion of the frames after it is measured the same way.
        """
        if self.gate.motion is None:
            return self._decide(True)
        small = self._prepare(frame_bgr)
        if self._avg is None or frame_bgr.shape != self._frame_shape:
            self._avg = small.astype(np.float32)
            self._frame_shape = frame_bgr.shape
            self.moved_fraction = None
            return self._decide(True)
        # Compared with the average of the frames before this one, which it then joins:
        # added first, it would hide `alpha` of its own difference.
        diff = cv2.absdiff(small.astype(np.float32), self._avg)
        self.moved_fraction = float(np.count_nonzero(diff > self.gate.pixel_threshold)) / diff.size
        cv2.accumulateWeighted(small, self._avg, self.alpha)
        run = (
            force
            or self.moved_fraction >= self.gate.motion
            or self.skipped_in_a_row >= self.gate.max_skip
        )
        return self._decide(run)

    def skip_fraction(self) -> float:
        """Fraction of the frames seen so far that skipped the detector."""
        return self.skipped / self.frames if self.frames else 0.0

    def _decide(self, run: bool) -> bool:
        self.frames += 1
        if run:
            self.ran += 1
            self.skipped_in_a_row = 0
        else:
            self.skipped += 1
            self.skipped_in_a_row += 1
        return run

    def _prepare(self, frame: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or 0 in frame.shape[:2]:
            raise ValueError(
                f"motion gate needs a uint8 HxW or HxWxC frame, got {frame.dtype} {frame.shape}"
            )
        h, w = frame.shape[:2]
        tw = min(self.gate.width, w)
        th = max(1, round(h * tw / w))
        small = cv2.resize(frame, (tw, th), interpolation=cv2.INTER_AREA)
        if small.ndim == 3:
            channels = small.shape[2]
            if channels == 3:
                small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
            elif channels == 4:
                small = cv2.cvtColor(small, cv2.COLOR_BGRA2GRAY)
            else:
                small = small[:, :, 0]
        return cast("npt.NDArray[np.uint8]", cv2.GaussianBlur(small, _BLUR, 0))
