"""Unlabelled image sets on which the third-party detectors (bench.det_models) fire.

Neither detector's classes are ours, so the sets carry no boxes: the optimizer measures
INT8 against fp32's own detections (unlabelled mode), and that agreement means something
only when fp32 finds many boxes. Each set is composed to make its model fire:

- char_scenes: ddddocr's YOLOX captcha-character detector fires on ~60% of large (40-90 px)
  LIGHT MNIST digits on a DARK noisy background and on ~10% of dark-on-light ones
  (measured), so scenes are 416 x 416 dark textured backgrounds with 4-6 large light
  digits. Each split draws digits only from its own MNIST-5k index range.
- face_scenes: nudenet's YOLOv8n finds FACE_FEMALE on matplotlib's sample photo of Grace
  Hopper (scores 0.51-0.69 at 320-640 px input); scenes paste that photo at a random
  scale, position, mirror and brightness onto crops of scikit-learn's sample photos
  (china.jpg, flower.jpg). Splits differ by seed stream, so no two splits share a transform.

Everything is deterministic in (n, seed, split) and BGR uint8 (the contract's default).
`write_unlabelled` writes the detection .npz of the contract: calibration, validation and
test images, no boxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.server.datasets.mnist import load_mnist5k

Split = Literal["calibration", "validation", "test"]
Images = npt.NDArray[np.uint8]
SPLITS: tuple[Split, ...] = ("calibration", "validation", "test")
# Disjoint MNIST-5k index ranges per split: no digit image appears in two splits.
CHAR_POOLS: dict[Split, tuple[int, int]] = {
    "calibration": (0, 1500),
    "validation": (1500, 3000),
    "test": (3000, 4500),
}
CHAR_SIZE = 416  # ddddocr's fixed input: no resize between scene and model
# Split salt mixed into the seed, so face_scenes(n, s, "test") never repeats a transform of
# face_scenes(n, s, "validation") (nor of another split at any seed below 1000).
SPLIT_SALT: dict[Split, int] = {"calibration": 1000, "validation": 2000, "test": 3000}


def _rng(seed: int, split: Split) -> np.random.Generator:
    return np.random.default_rng([SPLIT_SALT[split], seed])


def _dark_texture(rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    """A dark (~10-80) background: smooth blobs, a gradient and fine noise, slightly tinted."""
    coarse = rng.uniform(0, 1, (size // 32 + 1, size // 32 + 1)).astype(np.float32)
    blobs = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    grad = ramp[None, :] if rng.uniform() < 0.5 else ramp[:, None]
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    grey = 15 + 35 * blobs + 20 * grad + 12 * noise
    tint = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    out: npt.NDArray[np.float32] = np.clip(grey[..., None] * tint, 0, 255).astype(np.float32)
    return out


def _place(
    rng: np.random.Generator, taken: list[tuple[int, int, int, int]], side: int, size: int
) -> tuple[int, int] | None:
    """A top-left corner for a side x side square not touching an earlier one, or None."""
    for _ in range(50):
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        if all(x + side + 4 <= a or a + c + 4 <= x or y + side + 4 <= b or b + c + 4 <= y
               for a, b, c, _ in taken):  # fmt: skip
            return x, y
    return None


def char_scenes(n: int, seed: int, split: Split) -> Images:
    """n 416 x 416 BGR scenes of 4-6 large (40-90 px) light MNIST digits on dark texture."""
    digits, _ = load_mnist5k()
    lo, hi = CHAR_POOLS[split]
    rng = _rng(seed, split)
    out = np.empty((n, CHAR_SIZE, CHAR_SIZE, 3), np.uint8)
    for i in range(n):
        scene = _dark_texture(rng, CHAR_SIZE)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(4, 7))):
            side = int(rng.integers(40, 91))
            at = _place(rng, taken, side, CHAR_SIZE)
            if at is None:
                continue
            x, y = at
            taken.append((x, y, side, side))
            digit = digits[int(rng.integers(lo, hi))]
            alpha = cv2.resize(digit, (side, side), interpolation=cv2.INTER_LINEAR)
            a = (alpha.astype(np.float32) / 255.0)[..., None]
            ink = rng.uniform(190, 255) * rng.uniform(0.9, 1.0, 3).astype(np.float32)
            patch = scene[y : y + side, x : x + side]
            scene[y : y + side, x : x + side] = patch * (1 - a) + ink * a
        out[i] = np.clip(scene, 0, 255).astype(np.uint8)
    return out


@cache
def _face() -> Images:
    """matplotlib's shipped Grace Hopper photo (BGR), the face nudenet finds."""
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read matplotlib's sample photo {path}")
    return np.asarray(img, np.uint8)


@cache
def _backdrops() -> tuple[Images, ...]:
    """scikit-learn's shipped sample photos (china.jpg, flower.jpg), BGR, 427 x 640."""
    from sklearn.datasets import load_sample_images

    return tuple(
        np.ascontiguousarray(im[..., ::-1])
        for im in load_sample_images().images  # RGB -> BGR
    )


@dataclass(frozen=True)
class FacePaste:
    """Where face_scenes put the photo in one scene: box (x1, y1, x2, y2) in scene px."""

    box: tuple[int, int, int, int]
    mirrored: bool
    brightness: float


FACE_SCENE_HW = (240, 320)  # 4:3 frames: the 320 x 320 model input letterboxes them


def face_scenes_with_pastes(n: int, seed: int, split: Split) -> tuple[Images, list[FacePaste]]:
    """face_scenes, and where each scene's pasted photo lies (for tests that check boxes)."""
    rng = _rng(seed, split)
    face, backs = _face(), _backdrops()
    h, w = FACE_SCENE_HW
    out = np.empty((n, h, w, 3), np.uint8)
    pastes: list[FacePaste] = []
    for i in range(n):
        back = backs[int(rng.integers(len(backs)))]
        # A crop of 1-1.6x the frame, resized down to it: each scene's backdrop differs.
        zoom = rng.uniform(1.0, 1.6)
        ch, cw = int(h * zoom), int(w * zoom)
        y0 = int(rng.integers(0, back.shape[0] - ch + 1))
        x0 = int(rng.integers(0, back.shape[1] - cw + 1))
        scene = cv2.resize(back[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
        # The photo (portrait, 600 x 512) at 55-90% of the frame height: face large enough.
        ph = int(h * rng.uniform(0.55, 0.9))
        pw = round(ph * face.shape[1] / face.shape[0])
        photo = cv2.resize(face, (pw, ph), interpolation=cv2.INTER_AREA)
        mirrored = bool(rng.uniform() < 0.5)
        if mirrored:
            photo = photo[:, ::-1]
        brightness = float(rng.uniform(0.7, 1.2))
        photo = np.clip(photo.astype(np.float32) * brightness, 0, 255).astype(np.uint8)
        y = int(rng.integers(0, h - ph + 1))
        x = int(rng.integers(0, w - pw + 1))
        scene[y : y + ph, x : x + pw] = photo
        out[i] = scene
        pastes.append(FacePaste((x, y, x + pw, y + ph), mirrored, brightness))
    return out, pastes


def face_scenes(n: int, seed: int, split: Split) -> Images:
    """n 240 x 320 BGR scenes: the Grace Hopper photo pasted onto sklearn photo crops."""
    return face_scenes_with_pastes(n, seed, split)[0]


Maker = Callable[[int, int, Split], Images]


def write_unlabelled(path: Path, make: Maker, sizes: dict[Split, tuple[int, int]]) -> Path:
    """The detection .npz of the contract, images only: sizes maps split -> (n, seed)."""
    arrays = {f"{split}_images": make(n, seed, split) for split, (n, seed) in sizes.items()}
    missing = [s for s in SPLITS if s not in sizes]
    if missing:
        raise ValueError(f"write_unlabelled needs every split; missing {missing}")
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path
