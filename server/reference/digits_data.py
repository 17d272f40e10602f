"""sklearn's 8x8 digits as tinted 32x32 colour frames: the residual reference model's data.

The second reference model (`digits_resnet.onnx`) reads RGB, so its data must be colour.
Each of the 1,797 grey 8x8 digits (0..255, bright ink on black) becomes one OpenCV frame:

1. `cv2.resize` to 32x32 with `INTER_LINEAR`, in uint8;
2. multiplied per channel by that image's fixed tint and rounded to uint8: the digit is drawn
   in one colour on black. Tints are drawn once, for every image in source order, from
   `numpy.random.default_rng(TINT_SEED)`, uniform in [TINT_LOW, 1] per channel (B, G, R), so
   each image has its own colour and no channel is ever blank.

Frames are BGR, as a camera delivers them; the model's preprocessing (`digits_preprocessing`,
applied by the agent's `Preprocessor`) converts them to RGB and normalises. The split is the
project's stratified, seeded split of the labels. No torch here: tests rebuild the exact
images and split from scikit-learn's data with this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

from edgefleet.agent.bundle.manifest import Preprocessing
from edgefleet.server.datasets.sklearn_digits import load_sklearn_digits
from edgefleet.server.datasets.splits import stratified_split

REFERENCE_DIR: Final = Path(__file__).resolve().parent
DIGITS_RESNET_PATH: Final = REFERENCE_DIR / "digits_resnet.onnx"
DIGITS_RESNET_CARD_PATH: Final = REFERENCE_DIR / "digits_resnet.json"

FRAME_SIZE: Final = 32
TINT_SEED: Final = 8
TINT_LOW: Final = 0.25
DIGITS_SPLIT_SIZES: Final[dict[str, int]] = {
    "train": 1077,
    "calibration": 180,
    "validation": 270,
    "test": 270,
}
DIGITS_SPLIT_SEED: Final = 7


def digits_preprocessing() -> Preprocessing:
    """The model's preprocessing as a bundle manifest states it (RGB, 32x32, to [-1, 1])."""
    return Preprocessing(
        height=FRAME_SIZE,
        width=FRAME_SIZE,
        resize="stretch",
        interpolation="linear",
        color="RGB",
        layout="NCHW",
        scale=1 / 255,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
    )


def digit_tints(count: int) -> NDArray[np.float64]:
    """The fixed per-image (B, G, R) tint of the first `count` images, in source order."""
    rng = np.random.default_rng(TINT_SEED)
    tints: NDArray[np.float64] = rng.uniform(TINT_LOW, 1.0, size=(count, 3))
    return tints


def digits_rgb_frames() -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """All 1,797 digits as (N, 32, 32, 3) uint8 BGR frames, with their int64 labels."""
    grey, labels = load_sklearn_digits()
    tints = digit_tints(grey.shape[0])
    frames = np.empty((grey.shape[0], FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    for i, image in enumerate(grey):
        big = cv2.resize(image, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_LINEAR)
        colour = np.rint(big.astype(np.float64)[:, :, None] * tints[i][None, None, :])
        frames[i] = colour.clip(0, 255).astype(np.uint8)
    return frames, labels


def digits_rgb_splits() -> dict[str, tuple[NDArray[np.uint8], NDArray[np.int64]]]:
    """The frames and labels of each split (train, calibration, validation, test)."""
    frames, labels = digits_rgb_frames()
    parts = stratified_split(labels, DIGITS_SPLIT_SIZES, DIGITS_SPLIT_SEED)
    return {name: (frames[idx], labels[idx]) for name, idx in parts.items()}
