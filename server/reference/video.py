"""Read the shipped reference video back (tests and the demo); `training.make_video` writes it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray


def read_video(path: Path) -> NDArray[np.uint8]:
    """Decode every frame of a video file into a BGR array (N, H, W, 3)."""
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise RuntimeError(f"OpenCV cannot open {path}")
    frames: list[NDArray[np.uint8]] = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(np.asarray(frame, dtype=np.uint8))
    finally:
        capture.release()
    if not frames:
        raise RuntimeError(f"no frame decoded from {path}")
    return np.stack(frames)
