"""Detection clips: digits moving over a still ground, with per-frame truth boxes.

`render` draws any plan of moving digits; training.make_det_video uses it with a fixed plan
and the test pool for the shipped reference video (det_video.avi). `validation_clip` draws
a random plan of quiet and busy segments from the VALIDATION pool, for choices that need a
sequence (the motion gate's operating points: `edgefleet optimize --gate-clip`), so that
the test video never influences a choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
from numpy.typing import NDArray

from edgefleet.server.datasets import scenes

WIDTH: Final = 160
HEIGHT: Final = 120
FPS: Final = 30.0
# An object is in a frame's truth when at least this share of its ink is visible.
MIN_VISIBLE: Final = 0.5
VALIDATION_SEED: Final = 20261205
VALIDATION_FRAMES: Final = 600

Truth = list[list[dict[str, Any]]]


@dataclass(frozen=True)
class Mover:
    """One digit on a straight path: at frame f its tile's top-left is start + v * (f - t0)."""

    track_id: int
    pool_index: int
    side: int
    t0: int
    t1: int  # drawn for t0 <= f < t1
    start: tuple[float, float]
    velocity: tuple[float, float]
    colour: float  # < 0.5: light ink, else dark


def ground(
    rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT
) -> NDArray[np.float32]:
    """A calm still ground: gradient, faint texture, one line (cheap for MJPG, still for a gate)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    g = 70 + 60 * xx / width + 20 * yy / height
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 3)
    g = g + 6 * texture / max(float(texture.std()), 1e-6)
    cv2.line(
        g, (0, 100 * height // HEIGHT), (width - 1, 92 * height // HEIGHT), 40.0, 2, cv2.LINE_AA
    )
    return np.asarray(g, np.float32)


def render(
    digits: NDArray[np.uint8],
    labels: NDArray[np.int64],
    movers: list[Mover],
    base: NDArray[np.float32],
    num_frames: int,
    post: tuple[int, int, int, int] | None = None,
) -> tuple[NDArray[np.uint8], Truth, list[dict[str, Any]]]:
    """BGR frames, per-frame truth ({track_id, class, box}) and the object list."""
    height, width = base.shape
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    truth: Truth = [[] for _ in range(num_frames)]
    seen: dict[int, list[int]] = {m.track_id: [] for m in movers}
    for f in range(num_frames):
        img = base.copy()
        for m in movers:
            if not m.t0 <= f < m.t1:
                continue
            tile = cv2.resize(
                digits[m.pool_index], (m.side, m.side), interpolation=cv2.INTER_LINEAR
            )
            x0 = round(m.start[0] + m.velocity[0] * (f - m.t0))
            y0 = round(m.start[1] + m.velocity[1] * (f - m.t0))
            ax, ay = max(x0, 0), max(y0, 0)
            bx, by = min(x0 + m.side, width), min(y0 + m.side, height)
            if ax >= bx or ay >= by:
                continue
            part = tile[ay - y0 : by - y0, ax - x0 : bx - x0]
            alpha = part.astype(np.float32) / 255.0
            under = img[ay:by, ax:bx]
            ink_level = 235.0 if m.colour < 0.5 else 15.0
            img[ay:by, ax:bx] = under * (1 - alpha) + ink_level * alpha
            ink = np.zeros((height, width), dtype=bool)
            ink[ay:by, ax:bx] = part >= scenes.INK_THRESHOLD
            if post is not None:
                ink[post[1] : post[3], post[0] : post[2]] = False
            total = int((tile >= scenes.INK_THRESHOLD).sum())
            if total == 0 or ink.sum() < MIN_VISIBLE * total:
                continue
            cols = np.flatnonzero(ink.any(0))
            rows = np.flatnonzero(ink.any(1))
            truth[f].append(
                {
                    "track_id": m.track_id,
                    "class": int(labels[m.pool_index]),
                    "box": [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1],
                }
            )
            seen[m.track_id].append(f)
        if post is not None:
            img[post[1] : post[3], post[0] : post[2]] = 50.0
        grey = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        frames[f] = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    objects = []
    for m in movers:
        fs = seen[m.track_id]
        if not fs:
            continue
        hidden = sorted(set(range(fs[0], fs[-1] + 1)) - set(fs))
        objects.append(
            {
                "track_id": m.track_id,
                "class": int(labels[m.pool_index]),
                "first_frame": fs[0],
                "last_frame": fs[-1],
                "hidden_frames": hidden,
                "pool_index": m.pool_index,
            }
        )
    return frames, truth, objects


def random_plan(
    pool_size: int,
    rng: np.random.Generator,
    num_frames: int,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> tuple[list[Mover], list[tuple[str, int, int]]]:
    """Alternating quiet and busy segments of random lengths; busy ones have 1-4 crossings.

    A quiet segment is empty or holds one digit standing still; a busy one sends digits of
    20-36 px across from a random side at 0.5-3 px per frame.
    """
    movers: list[Mover] = []
    segments: list[tuple[str, int, int]] = []
    t, busy = 0, False
    while t < num_frames:
        length = int(rng.integers(60, 150))
        end = min(num_frames, t + length)
        segments.append(("busy" if busy else "quiet", t, end))
        if busy:
            for _ in range(int(rng.integers(1, 5))):
                side = int(rng.integers(20, 37))
                speed = float(rng.uniform(0.5, 3.0))
                t0 = int(rng.integers(t, max(t + 1, end - 20)))
                y = float(rng.uniform(0, height - side))
                x = float(rng.uniform(0, width - side))
                horizontal = rng.uniform() < 0.7
                sign = 1.0 if rng.uniform() < 0.5 else -1.0
                start: tuple[float, float]
                if horizontal:
                    start = (float(-side if sign > 0 else width), y)
                    vel = (sign * speed, float(rng.uniform(-0.3, 0.3)))
                    span = (width + side) / speed
                else:
                    start = (x, float(-side if sign > 0 else height))
                    vel = (float(rng.uniform(-0.3, 0.3)), sign * speed)
                    span = (height + side) / speed
                t1 = min(num_frames, t0 + int(span) + 1)
                movers.append(
                    Mover(len(movers) + 1, int(rng.integers(pool_size)), side, t0, t1, start, vel,
                          float(rng.uniform()))
                )  # fmt: skip
        elif rng.uniform() < 0.5:
            side = int(rng.integers(20, 37))
            still = (float(rng.uniform(0, width - side)), float(rng.uniform(0, height - side)))
            movers.append(
                Mover(len(movers) + 1, int(rng.integers(pool_size)), side, t, end, still,
                      (0.0, 0.0), float(rng.uniform()))
            )  # fmt: skip
        t, busy = end, not busy
    return movers, segments


def validation_clip(
    seed: int = VALIDATION_SEED, num_frames: int = VALIDATION_FRAMES
) -> tuple[NDArray[np.uint8], Truth, list[dict[str, Any]], list[tuple[str, int, int]]]:
    """A random clip of validation-pool digits: frames, truth, objects, segments."""
    digits, labels = scenes.training_pool("validation")
    rng = np.random.default_rng(seed)
    base = ground(rng)
    movers, segments = random_plan(len(labels), rng, num_frames)
    frames, truth, objects = render(digits, labels, movers, base, num_frames)
    return frames, truth, objects, segments


def write_clip(path: Path, frames: NDArray[np.uint8], fps: float = FPS, quality: int = 80) -> None:
    """Frames (N, H, W, 3) BGR to an MJPG AVI."""
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height), True)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot open an MJPG writer for {path}")
    try:
        writer.set(cv2.VIDEOWRITER_PROP_QUALITY, float(quality))
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()


def write_validation_clip(directory: Path, seed: int = VALIDATION_SEED) -> tuple[Path, Path]:
    """The validation clip as `clip.avi` and its truth as `clip_truth.json` under directory."""
    directory.mkdir(parents=True, exist_ok=True)
    frames, truth, objects, segments = validation_clip(seed)
    video, truth_path = directory / "clip.avi", directory / "clip_truth.json"
    write_clip(video, frames)
    doc = {
        "pool": "validation (server/reference/mnist5k_split.json)",
        "seed": seed,
        "fps": FPS,
        "frame_size": [WIDTH, HEIGHT],
        "num_frames": len(frames),
        "labels": list(scenes.LABELS),
        "segments": [{"kind": k, "first_frame": a, "last_frame": b - 1} for k, a, b in segments],
        "objects": objects,
        "frames": truth,
    }
    truth_path.write_text(json.dumps(doc))
    return video, truth_path
