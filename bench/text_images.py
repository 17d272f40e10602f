"""Rendered text images: a light label-like background, a few lines of dark words, word boxes.

The third-party detector benchmark calibrates and checks PP-OCR's text detector on these, so
it needs no data set download; the word-box masks say where text really is.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]


# One string keeps the vocabulary readable (a list literal formats to one word per line).
WORDS = (  # noqa: SIM905
    "invoice total amount date receipt order customer number street city station platform "
    "exit entrance open closed warning caution parking price discount sale fresh bakery "
    "coffee pharmacy hotel office floor room delivery address phone email account balance "
    "battery voltage sensor device serial model version batch lot expiry weight net gross"
).split()
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX_SMALL,
)


def random_text(rng: np.random.Generator) -> str:
    """A label-like phrase: words, numbers, prices, dates, codes."""
    kind = int(rng.integers(5))
    word = str(rng.choice(WORDS))
    if kind == 0:
        return f"{word.capitalize()} {rng.choice(WORDS)}"
    if kind == 1:
        return f"{word.upper()} {int(rng.integers(1, 99999))}"
    if kind == 2:
        return f"{word}: {rng.integers(1, 999)}.{rng.integers(0, 99):02d} EUR"
    if kind == 3:
        return f"{rng.integers(2019, 2026)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    return f"No. {rng.integers(100, 99999)} {word}"


def render_text_image(rng: np.random.Generator, size: int) -> tuple[U8, U8]:
    """A light, slightly noisy BGR image with a few lines of dark text; and its word-box mask."""
    bg = np.empty((size, size, 3), np.float32)
    bg[:] = rng.integers(185, 256, size=3)
    # A gentle illumination gradient, as on a photographed label.
    ramp = np.linspace(-rng.uniform(0, 20), rng.uniform(0, 20), size, dtype=np.float32)
    bg += ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    img = np.clip(bg, 0, 255).astype(np.uint8)  # OpenCV 5's putText draws on 8-bit images only
    mask = np.zeros((size, size), np.uint8)
    y = int(rng.integers(8, 30))
    while True:
        font = int(rng.choice(FONTS))
        scale = float(rng.uniform(0.6, 1.3))
        thick = int(rng.integers(1, 3))
        text = random_text(rng)
        (w, h), base_line = cv2.getTextSize(text, font, scale, thick)
        if w >= size - 8:
            continue  # too wide for the image: draw another phrase
        y += h + int(rng.integers(6, 26))
        if y + base_line >= size - 4:
            break
        x = int(rng.integers(4, size - w - 3))
        color = tuple(int(c) for c in rng.integers(0, 90, size=3))
        cv2.putText(img, text, (x, y), font, scale, color, thick, cv2.LINE_AA)
        mask[max(y - h, 0) : y + base_line, x : x + w] = 1
    if rng.random() < 0.5:
        img = np.asarray(cv2.GaussianBlur(img, (3, 3), 0), np.uint8)
    noisy = img + rng.normal(0.0, rng.uniform(2.0, 7.0), img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), mask
