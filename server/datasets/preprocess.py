"""Preprocessing shared by training, evaluation and the bundle manifest."""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

# These constants are the contract a bundle manifest states; the agent must reproduce them.
INPUT_SIZE: Final = 64
SCALE: Final = 1.0 / 255.0
# The standard MNIST mean / std of pixel/255 over the 60k training images.
MEAN: Final = 0.1307
STD: Final = 0.3081
LAYOUT: Final = "NCHW"
COLOR: Final = "GRAY"
INTERPOLATION: Final = "INTER_LINEAR"
DTYPE: Final = "float32"


def to_model_input(gray_images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Turn uint8 grey images (N, H, W) into the model's float32 input (N, 1, 64, 64)."""
    if gray_images.ndim != 3:
        raise ValueError(f"expected grey images shaped (N, H, W), got {gray_images.shape}")
    if gray_images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {gray_images.dtype}")
    count = gray_images.shape[0]
    resized = np.empty((count, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    for i in range(count):
        # Resize in uint8 like a camera pipeline would, so train and serve round alike.
        resized[i] = cv2.resize(
            gray_images[i], (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR
        )
    out = resized.astype(np.float32).reshape(count, 1, INPUT_SIZE, INPUT_SIZE)
    # float32 throughout, in this order, so every consumer gets bit-identical inputs.
    out *= np.float32(SCALE)
    out -= np.float32(MEAN)
    out /= np.float32(STD)
    return out


def bgr_to_gray(frames_bgr: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Convert uint8 BGR frames (N, H, W, 3) to grey (N, H, W) with OpenCV's weights."""
    if frames_bgr.ndim != 4 or frames_bgr.shape[-1] != 3:
        raise ValueError(f"expected BGR frames shaped (N, H, W, 3), got {frames_bgr.shape}")
    gray = np.empty(frames_bgr.shape[:3], dtype=np.uint8)
    for i in range(frames_bgr.shape[0]):
        gray[i] = cv2.cvtColor(frames_bgr[i], cv2.COLOR_BGR2GRAY)
    return gray


def preprocessing_spec() -> dict[str, str | int | float]:
    """Return the preprocessing constants as a plain dict for manifests and model cards."""
    return {
        "input_size": INPUT_SIZE,
        "layout": LAYOUT,
        "color": COLOR,
        "interpolation": INTERPOLATION,
        "scale": SCALE,
        "mean": MEAN,
        "std": STD,
        "dtype": DTYPE,
    }
