"""Detection scenes composed from MNIST-5k digits: the reference detector's data.

A scene is a grey uint8 image (SCENE_SIZE x SCENE_SIZE) with 0..MAX_DIGITS digits pasted at
random positions and scales onto a varied background (flat, gradient, noise texture, long
clutter strokes that are not digits), each digit brighter or darker than what lies under it.
A digit's box is the tight box of its ink (the resized digit at or above INK_THRESHOLD) in
pixel-edge coordinates: x2 - x1 is the number of ink columns. Each split draws its digits
only from its own part of the recorded MNIST-5k split (server/reference/mnist5k_split.json),
so no digit image appears in two splits. Everything is a pure function of the seed.

Arrays follow the detection .npz contract: `<split>_images` (N, H, W) uint8 and
`<split>_boxes` (M, 6) float32 rows [image_index, class, x1, y1, x2, y2].
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.server.datasets.mnist import load_mnist5k, mnist5k_sha256
from edgefleet.server.datasets.splits import SPLIT_NAMES, load_split, verify_split

SCENE_FORMAT: Final = "edgefleet.detsplit/v1"
GENERATOR: Final = "mnist-scenes-v1"
SCENE_SIZE: Final = 128
MAX_DIGITS: Final = 5
# Side of the square the 28x28 digit is resized to; its ink box is about 0.55..0.75 of it.
SCALE_RANGE: Final = (14, 40)
# A resized digit pixel at or above this (0..255) is ink: it defines the box.
INK_THRESHOLD: Final = 96
# Two digits whose ink boxes overlap more than this are not placed together, so every box
# stays mostly visible (a detector cannot be asked to find a fully hidden digit).
MAX_PAIR_IOU: Final = 0.15
LABELS: Final = tuple(str(i) for i in range(10))
NUM_CLASSES: Final = 10

DET_SPLIT_SEED: Final = 20261203
DET_SPLIT_SIZES: Final[dict[str, int]] = {
    "train": 4000,
    "calibration": 256,
    "validation": 500,
    "test": 1000,
}

Boxes = NDArray[np.float32]


class SceneSplitInfo(BaseModel):
    """One split of the scene data: how it was generated and a digest of what came out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_images: int = Field(ge=0)
    seed: int
    pool: str = Field(description="the MNIST-5k split whose digits this split may use")
    pool_size: int = Field(gt=0)
    num_boxes: int = Field(ge=0)
    class_counts: list[int]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of images then boxes bytes")


class SceneSplitRecord(BaseModel):
    """The recorded scene splits; regenerating from it must reproduce every digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["edgefleet.detsplit/v1"] = SCENE_FORMAT
    generator: Literal["mnist-scenes-v1"] = GENERATOR
    dataset: str = "mnist5k-scenes"
    mnist5k_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mnist5k_split_file: str
    image_size: tuple[int, int]
    max_digits: int
    scale_range: tuple[int, int]
    ink_threshold: int
    box_format: str = "[image_index, class, x1, y1, x2, y2], pixel edges, float32"
    labels: list[str]
    splits: dict[str, SceneSplitInfo]

    @model_validator(mode="after")
    def _check(self) -> SceneSplitRecord:
        """Reject records whose splits share a pool (that would share digit images)."""
        pools = [info.pool for info in self.splits.values()]
        if len(pools) != len(set(pools)):
            raise ValueError("two scene splits draw from the same MNIST-5k pool")
        return self

    def save(self, path: Path) -> None:
        """Write the record as indented JSON."""
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", "utf-8")


class SceneMismatchError(ValueError):
    """Regenerated scenes differ from their record (changed generator, data or library)."""


def _background(rng: np.random.Generator, height: int, width: int) -> NDArray[np.float32]:
    """Return a float32 background: flat, gradient, noise texture or gradient plus texture."""
    kind = int(rng.integers(4))
    level = float(rng.uniform(0, 255))
    if kind in (1, 3):
        other = float(rng.uniform(0, 255))
        theta = float(rng.uniform(0, 2 * np.pi))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        yy /= np.float32(height - 1)
        xx /= np.float32(width - 1)
        t = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = np.float32(level) + np.float32(other - level) * t
    else:
        bg = np.full((height, width), level, dtype=np.float32)
    if kind in (2, 3):
        noise = rng.normal(0.0, 1.0, (height, width)).astype(np.float32)
        sigma = float(rng.uniform(1.0, 4.0))
        noise = np.asarray(cv2.GaussianBlur(noise, (0, 0), sigma), dtype=np.float32)
        noise /= max(float(noise.std()), 1e-6)
        bg = bg + noise * np.float32(rng.uniform(8, 35))
    # Clutter: long straight strokes (longer than any digit, so no stroke reads as a "1")
    # and a few specks; both are things a detector must learn to ignore.
    for _ in range(int(rng.integers(0, 4))):
        length = rng.uniform(0.5, 1.2) * max(height, width)
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0, np.array([width, height], dtype=np.float64))
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p1 = (int(cx - dx), int(cy - dy))
        p2 = (int(cx + dx), int(cy + dy))
        cv2.line(bg, p1, p2, float(rng.uniform(0, 255)), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 6))):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.circle(bg, centre, int(rng.integers(1, 3)), float(rng.uniform(0, 255)), -1)
    return np.asarray(bg, dtype=np.float32)


def _iou(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    """IoU of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def ink_box(tile: NDArray[np.uint8]) -> tuple[int, int, int, int] | None:
    """Tight pixel-edge box (x1, y1, x2, y2) of a digit tile's ink, or None without ink."""
    ink = tile >= INK_THRESHOLD
    if not ink.any():
        return None
    cols = np.flatnonzero(ink.any(axis=0))
    rows = np.flatnonzero(ink.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def compose_scene(
    rng: np.random.Generator,
    digits: NDArray[np.uint8],
    labels: NDArray[np.int64],
    size: int = SCENE_SIZE,
    height: int | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Compose one scene (size wide, height or size high); return it and its (k, 5) rows."""
    height = size if height is None else height
    img = _background(rng, height, size)
    wanted = int(rng.integers(0, MAX_DIGITS + 1))
    rows: list[list[float]] = []
    placed: list[NDArray[np.float64]] = []
    attempts = 0
    while len(rows) < wanted and attempts < 40:
        attempts += 1
        pick = int(rng.integers(digits.shape[0]))
        side = int(rng.integers(SCALE_RANGE[0], SCALE_RANGE[1] + 1))
        # A little aspect jitter, as handwriting is not all one shape.
        width = int(np.clip(round(side * rng.uniform(0.8, 1.15)), SCALE_RANGE[0], size))
        side = min(side, height)
        tile = cv2.resize(digits[pick], (width, side), interpolation=cv2.INTER_LINEAR)
        extent = ink_box(tile)
        if extent is None:
            continue
        x0 = int(rng.integers(0, size - width + 1))
        y0 = int(rng.integers(0, height - side + 1))
        box = np.asarray(extent, dtype=np.float64) + np.array([x0, y0, x0, y0], np.float64)
        if any(_iou(box, other) > MAX_PAIR_IOU for other in placed):
            continue
        alpha = tile.astype(np.float32) / np.float32(255.0)
        under = img[y0 : y0 + side, x0 : x0 + width]
        local = float(under.mean())
        contrast = float(rng.uniform(70, 200))
        # Bright ink on dark ground, dark on light, either way in between; never too faint.
        bright = local < 100 or (local <= 155 and rng.random() < 0.5)
        colour = min(local + contrast, 255.0) if bright else max(local - contrast, 0.0)
        if abs(colour - local) < 60:
            colour = max(local - contrast, 0.0) if bright else min(local + contrast, 255.0)
        img[y0 : y0 + side, x0 : x0 + width] = under * (1 - alpha) + np.float32(colour) * alpha
        placed.append(box)
        rows.append([float(labels[pick]), *box.tolist()])
    if rng.random() < 0.3:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 1.0))), np.float32)
    img = img + rng.normal(0.0, float(rng.uniform(0, 6)), img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def make_scenes(
    digits: NDArray[np.uint8],
    labels: NDArray[np.int64],
    count: int,
    seed: int,
    size: int = SCENE_SIZE,
) -> tuple[NDArray[np.uint8], Boxes]:
    """Compose count scenes from a digit pool: images (N, size, size), boxes (M, 6)."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size), dtype=np.uint8)
    parts: list[NDArray[np.float32]] = []
    for i in range(count):
        images[i], rows = compose_scene(rng, digits, labels, size)
        index = np.full((rows.shape[0], 1), i, dtype=np.float32)
        parts.append(np.concatenate([index, rows], axis=1))
    boxes = np.concatenate(parts, axis=0) if parts else np.zeros((0, 6), np.float32)
    return images, boxes.astype(np.float32)


def validate_boxes(images: NDArray[np.uint8], boxes: Boxes) -> None:
    """Raise ValueError unless every box row names an image and lies inside it, non-empty."""
    if boxes.ndim != 2 or boxes.shape[1] != 6:
        raise ValueError(f"boxes must be (M, 6), got {boxes.shape}")
    height, width = images.shape[1:3]
    idx, cls = boxes[:, 0], boxes[:, 1]
    x1, y1, x2, y2 = boxes[:, 2], boxes[:, 3], boxes[:, 4], boxes[:, 5]
    if boxes.shape[0] and (idx.min() < 0 or idx.max() >= images.shape[0]):
        raise ValueError("a box names an image index outside the split")
    if np.any((cls < 0) | (cls >= NUM_CLASSES) | (cls != np.round(cls))):
        raise ValueError("a box has a class outside 0..9")
    if np.any((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)):
        raise ValueError("a box lies partly outside its image")
    if np.any((x2 <= x1) | (y2 <= y1)):
        raise ValueError("a box is empty")


def digest(images: NDArray[np.uint8], boxes: Boxes) -> str:
    """sha256 of the images' bytes then the boxes' bytes (C order, native little-endian)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(boxes, dtype="<f4").tobytes())
    return h.hexdigest()


def _pools(mnist_split_path: Path) -> dict[str, tuple[NDArray[np.uint8], NDArray[np.int64]]]:
    """MNIST-5k cut by its recorded split, after checking that split against the data."""
    images, labels = load_mnist5k()
    split = load_split(mnist_split_path)
    verify_split(split, labels, source_sha256=mnist5k_sha256())
    return {name: (images[idx], labels[idx]) for name, idx in split.arrays().items()}


def training_pool(name: str = "train") -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """The digits (and labels) of one part of the recorded MNIST-5k split."""
    return _pools(_default_paths()[1])[name]


def _default_paths() -> tuple[Path, Path]:
    """The committed scene record and the MNIST-5k split it builds on."""
    # Imported here: server.reference imports server.datasets, not the other way round.
    from edgefleet.server.reference import SPLIT_PATH
    from edgefleet.server.reference.detect.paths import DET_SPLIT_PATH

    return DET_SPLIT_PATH, SPLIT_PATH


def generate_splits(
    sizes: dict[str, int] | None = None,
    seed: int = DET_SPLIT_SEED,
    mnist_split_path: Path | None = None,
    names: Sequence[str] | None = None,
) -> tuple[SceneSplitRecord, dict[str, tuple[NDArray[np.uint8], Boxes]]]:
    """Generate the scene splits (only those in names, all by default) and their record."""
    sizes = dict(DET_SPLIT_SIZES if sizes is None else sizes)
    if mnist_split_path is None:
        mnist_split_path = _default_paths()[1]
    pools = _pools(mnist_split_path)
    data: dict[str, tuple[NDArray[np.uint8], Boxes]] = {}
    infos: dict[str, SceneSplitInfo] = {}
    for k, name in enumerate(SPLIT_NAMES):
        if name not in sizes:
            continue
        # Each split its own seed, so regenerating one split never needs the others.
        split_seed = seed + 1000 * (k + 1)
        digits, labels = pools[name]
        if names is not None and name not in names:
            continue
        images, boxes = make_scenes(digits, labels, sizes[name], split_seed)
        validate_boxes(images, boxes)
        data[name] = (images, boxes)
        infos[name] = SceneSplitInfo(
            num_images=sizes[name],
            seed=split_seed,
            pool=name,
            pool_size=int(digits.shape[0]),
            num_boxes=int(boxes.shape[0]),
            class_counts=[
                int(c) for c in np.bincount(boxes[:, 1].astype(np.int64), minlength=NUM_CLASSES)
            ],
            sha256=digest(images, boxes),
        )
    record = SceneSplitRecord(
        mnist5k_sha256=mnist5k_sha256(),
        mnist5k_split_file=mnist_split_path.name,
        image_size=(SCENE_SIZE, SCENE_SIZE),
        max_digits=MAX_DIGITS,
        scale_range=SCALE_RANGE,
        ink_threshold=INK_THRESHOLD,
        labels=list(LABELS),
        splits=infos,
    )
    return record, data


def load_record(path: Path | None = None) -> SceneSplitRecord:
    """Read the recorded scene splits."""
    path = _default_paths()[0] if path is None else path
    return SceneSplitRecord.model_validate_json(path.read_text(encoding="utf-8"))


def load_reference_detection(
    split: str, record_path: Path | None = None
) -> tuple[NDArray[np.uint8], Boxes]:
    """Regenerate one recorded split; raise SceneMismatchError unless it matches its digest."""
    record = load_record(record_path)
    if split not in record.splits:
        raise KeyError(f"no scene split {split!r}; recorded: {sorted(record.splits)}")
    info = record.splits[split]
    if record.mnist5k_sha256 != mnist5k_sha256():
        raise SceneMismatchError("the installed MNIST-5k file differs from the recorded one")
    pools = _pools(_default_paths()[1].parent / record.mnist5k_split_file)
    digits, labels = pools[info.pool]
    images, boxes = make_scenes(digits, labels, info.num_images, info.seed)
    if digest(images, boxes) != info.sha256:
        raise SceneMismatchError(f"scene split {split!r} differs from its record when regenerated")
    return images, boxes


def write_npz(
    path: Path, splits: Sequence[str] = SPLIT_NAMES, record_path: Path | None = None
) -> None:
    """Write the named recorded splits to a detection .npz (the contract's layout)."""
    arrays: dict[str, NDArray[np.generic]] = {"labels": np.asarray(LABELS)}
    for name in splits:
        images, boxes = load_reference_detection(name, record_path)
        arrays[f"{name}_images"] = images
        arrays[f"{name}_boxes"] = boxes
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Regenerate the committed scene record: python -m edgefleet.server.datasets.scenes."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--npz", type=Path, help="also write all splits to this .npz")
    args = parser.parse_args(argv)
    record, _ = generate_splits()
    out = _default_paths()[0]
    record.save(out)
    print(f"wrote {out}: " + ", ".join(f"{k} {v.num_images}" for k, v in record.splits.items()))
    if args.npz:
        write_npz(args.npz)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
