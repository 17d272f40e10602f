"""Where the reference detector's files are (no imports: server.datasets reads them too)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

DETECT_DIR: Final = Path(__file__).resolve().parent
DET_MODEL_PATH: Final = DETECT_DIR / "mnist_det.onnx"
DET_CARD_PATH: Final = DETECT_DIR / "mnist_det.json"
DET_SPLIT_PATH: Final = DETECT_DIR / "mnist_det_split.json"
DET_VIDEO_PATH: Final = DETECT_DIR / "det_video.avi"
DET_VIDEO_TRUTH_PATH: Final = DETECT_DIR / "det_video_truth.json"
