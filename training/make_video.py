"""Write the reference video of test-split digits: python -m training.make_video.

See server/reference/DATACARD.md; `edgefleet.server.reference.video.read_video` reads it back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
from numpy.typing import NDArray

from edgefleet.server.datasets.preprocess import bgr_to_gray
from edgefleet.server.datasets.splits import load_split
from edgefleet.server.reference import (
    MODEL_CARD_PATH,
    MODEL_PATH,
    SPLIT_PATH,
    VIDEO_LABELS_PATH,
    VIDEO_PATH,
    evaluate_onnx,
    load_reference_split,
)
from edgefleet.server.reference.video import read_video

VIDEO_SPLIT: Final = "test"
NUM_FRAMES: Final = 400
FRAME_SIZE: Final = 96
FPS: Final = 30.0
FOURCC: Final = "MJPG"
# JPEG quality 0..100; 90 keeps decoded accuracy within a fraction of a point of the raw
# images while the file stays well under 1.5 MB.
QUALITY: Final = 90


def images_to_frames(images: NDArray[np.uint8], size: int = FRAME_SIZE) -> NDArray[np.uint8]:
    """Upscale uint8 grey images (N, H, W) to BGR frames (N, size, size, 3)."""
    frames = np.empty((images.shape[0], size, size, 3), dtype=np.uint8)
    for i in range(images.shape[0]):
        big = cv2.resize(images[i], (size, size), interpolation=cv2.INTER_LINEAR)
        frames[i] = cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)
    return frames


def write_video(
    path: Path, frames: NDArray[np.uint8], fps: float = FPS, quality: int = QUALITY
) -> None:
    """Write BGR frames (N, H, W, 3) to an MJPG AVI file, one frame per image."""
    height, width = frames.shape[1:3]
    fourcc = cv2.VideoWriter.fourcc(*FOURCC)
    writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height), True)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot open a {FOURCC} writer for {path}")
    try:
        writer.set(cv2.VIDEOWRITER_PROP_QUALITY, float(quality))
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def video_metrics(
    model_path: Path = MODEL_PATH,
    video_path: Path = VIDEO_PATH,
    labels_path: Path = VIDEO_LABELS_PATH,
) -> dict[str, Any]:
    """Measure the model on the decoded video frames and on the same raw images."""
    sidecar = json.loads(labels_path.read_text(encoding="utf-8"))
    labels = np.asarray(sidecar["labels"], dtype=np.int64)
    indices = np.asarray(sidecar["indices"], dtype=np.int64)
    decoded = bgr_to_gray(read_video(video_path))
    if decoded.shape[0] != labels.shape[0]:
        raise RuntimeError(f"{decoded.shape[0]} decoded frames, {labels.shape[0]} labels")
    split = load_reference_split()
    raw_images, raw_labels = split[sidecar["split"]]
    n = labels.shape[0]
    if not np.array_equal(raw_labels[:n], labels):
        raise RuntimeError("video labels differ from the recorded split")
    return {
        "file": video_path.name,
        "sha256": sha256_file(video_path),
        "size_bytes": video_path.stat().st_size,
        "frames": int(n),
        "frame_size": [int(decoded.shape[2]), int(decoded.shape[1])],
        "split": sidecar["split"],
        "first_index": int(indices[0]),
        "accuracy_decoded_frames": round(evaluate_onnx(model_path, decoded, labels), 5),
        "accuracy_raw_images": round(evaluate_onnx(model_path, raw_images[:n], labels), 5),
    }


def update_model_card(card_path: Path = MODEL_CARD_PATH, model_path: Path = MODEL_PATH) -> None:
    """Write the video metrics into the model card's "video" section."""
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["video"] = video_metrics(model_path)
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Write digits.avi and its label sidecar, check them, and record the video accuracy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quality", type=int, default=QUALITY, help="MJPG quality 0..100")
    args = parser.parse_args(argv)
    split = load_reference_split()
    images, labels = split[VIDEO_SPLIT]
    indices = load_split(SPLIT_PATH).arrays()[VIDEO_SPLIT][:NUM_FRAMES]
    frames = images_to_frames(images[:NUM_FRAMES])
    write_video(VIDEO_PATH, frames, quality=args.quality)
    decoded = read_video(VIDEO_PATH)
    if decoded.shape != frames.shape:
        raise RuntimeError(f"decoded {decoded.shape}, wrote {frames.shape}")
    sidecar = {
        "video": VIDEO_PATH.name,
        "sha256": sha256_file(VIDEO_PATH),
        "codec": FOURCC,
        "fps": FPS,
        "quality": args.quality,
        "frame_size": [FRAME_SIZE, FRAME_SIZE],
        "color": "BGR (grey replicated)",
        "num_frames": NUM_FRAMES,
        "dataset": "mnist5k",
        "split_file": SPLIT_PATH.name,
        "split": VIDEO_SPLIT,
        "note": f"frame i shows {VIDEO_SPLIT} item i: source row indices[i], label labels[i]",
        "indices": [int(i) for i in indices],
        "labels": [int(v) for v in labels[:NUM_FRAMES]],
    }
    # One key per line (lists kept on one line) so the sidecar reads and diffs well.
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sidecar.items())
    VIDEO_LABELS_PATH.write_text("{\n" + body + "\n}\n", encoding="utf-8")
    print(f"wrote {VIDEO_PATH} ({VIDEO_PATH.stat().st_size} bytes, {decoded.shape[0]} frames)")
    if MODEL_PATH.is_file() and MODEL_CARD_PATH.is_file():
        update_model_card()
        card = json.loads(MODEL_CARD_PATH.read_text(encoding="utf-8"))
        print(f"video metrics: {card['video']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
