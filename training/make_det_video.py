"""Write the reference detection video and its truth: python -m training.make_det_video.

det_video.avi: 600 frames of 160x120 BGR (MJPG, 30 fps) over one static background, with
QUIET segments (nothing, or one digit standing still) and BUSY ones (test-split digits
entering, crossing at various speeds, overlapping briefly, one passing behind a post and
absent for a few frames, leaving). det_video_truth.json gives, per frame, the tight ink box
(frame pixels, pixel edges) and class of every digit at least half of whose ink is visible,
and the list of objects (track id, class, first_frame, last_frame, frames hidden).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from edgefleet.server.datasets import clips, scenes
from edgefleet.server.datasets.clips import Mover
from edgefleet.server.reference.detect import DET_VIDEO_PATH, DET_VIDEO_TRUTH_PATH
from edgefleet.server.reference.video import read_video
from training.make_video import sha256_file, write_video

SEED: Final = 20261204
NUM_FRAMES: Final = 600
WIDTH: Final = 160
HEIGHT: Final = 120
FPS: Final = 30.0
QUALITY: Final = 80
# An object is in a frame's truth when at least this share of its ink is visible.
MIN_VISIBLE: Final = clips.MIN_VISIBLE
# A static post (x1, y1, x2, y2 in frame pixels) that one digit passes behind, absent from
# the truth while less than MIN_VISIBLE of its ink shows.
POST: Final = (112, 0, 134, 36)
SEGMENTS: Final = (
    ("quiet", 0, 90, "empty background"),
    ("busy", 90, 210, "three digits cross at different speeds"),
    ("quiet", 210, 330, "one digit stands still"),
    ("busy", 330, 480, "four digits: two overlap briefly, one passes behind the post"),
    ("quiet", 480, 600, "empty background"),
)


def _movers(labels: NDArray[np.int64], rng: np.random.Generator) -> list[Mover]:
    """The scripted objects; digits are drawn from the test pool only."""
    picks = rng.permutation(labels.shape[0])[:8]
    plan = [
        # segment 2: three crossings at 0.8, 1.6 and 3 px per frame
        (90, 210, 28, (-28.0, 20.0), (1.6, 0.0)),
        (95, 210, 34, (160.0, 70.0), (-0.9, 0.1)),
        (120, 200, 24, (60.0, -24.0), (0.2, 1.8)),
        # segment 3: one digit standing still
        (210, 330, 30, (65.0, 45.0), (0.0, 0.0)),
        # segment 4: two digits whose paths overlap briefly, one behind the post, one fast
        (330, 450, 30, (-30.0, 40.0), (1.5, 0.0)),
        (330, 450, 30, (160.0, 52.0), (-1.5, 0.0)),
        (345, 480, 26, (60.0, 80.0), (1.0, 0.0)),
        (400, 470, 22, (170.0, 85.0), (-3.0, -0.2)),
    ]
    movers = []
    for k, (t0, t1, side, start, vel) in enumerate(plan):
        movers.append(
            Mover(k + 1, int(picks[k]), side, t0, t1, start, vel, float(rng.uniform(0, 1)))
        )
    return movers


def render(
    digits: NDArray[np.uint8], labels: NDArray[np.int64], seed: int = SEED
) -> tuple[NDArray[np.uint8], list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Render the BGR frames, the per-frame truth and the object list."""
    rng = np.random.default_rng(seed)
    base = clips.ground(rng, WIDTH, HEIGHT)
    movers = _movers(labels, rng)
    frames, truth, objects = clips.render(digits, labels, movers, base, NUM_FRAMES, POST)
    for o in objects:
        o["test_pool_index"] = o.pop("pool_index")  # the shipped truth's key: a test-pool index
    return frames, truth, objects


def main(argv: list[str] | None = None) -> int:
    """Write det_video.avi and det_video_truth.json, then check the decoded frame count."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quality", type=int, default=QUALITY)
    args = parser.parse_args(argv)
    digits, labels = scenes.training_pool("test")
    frames, truth, objects = render(digits, labels)
    write_video(DET_VIDEO_PATH, frames, fps=FPS, quality=args.quality)
    decoded = read_video(DET_VIDEO_PATH)
    if decoded.shape != frames.shape:
        raise RuntimeError(f"decoded {decoded.shape}, wrote {frames.shape}")
    header = {
        "video": DET_VIDEO_PATH.name,
        "sha256": sha256_file(DET_VIDEO_PATH),
        "codec": "MJPG",
        "fps": FPS,
        "quality": args.quality,
        "frame_size": [WIDTH, HEIGHT],
        "num_frames": NUM_FRAMES,
        "pool": "test (server/reference/mnist5k_split.json)",
        "labels": list(scenes.LABELS),
        "box_format": "[x1, y1, x2, y2] frame pixels, pixel edges, tight on visible ink",
        "min_visible_ink": MIN_VISIBLE,
        "post_xyxy": list(POST),
        "segments": [
            {"kind": k, "first_frame": a, "last_frame": b - 1, "note": n} for k, a, b, n in SEGMENTS
        ],
        "objects": objects,
    }
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    # One frame per line so the truth reads and diffs well.
    frame_lines = ",\n".join(f"    {json.dumps(t)}" for t in truth)
    text = "{\n" + ",\n".join(lines) + ',\n  "frames": [\n' + frame_lines + "\n  ]\n}\n"
    DET_VIDEO_TRUTH_PATH.write_text(text, encoding="utf-8")
    size = DET_VIDEO_PATH.stat().st_size
    print(f"wrote {DET_VIDEO_PATH} ({size} bytes, {NUM_FRAMES} frames), {len(objects)} objects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
