"""Fixtures of the detector optimizer's tests: ddddocr's detector, MNIST scenes, a key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.zoo_models import extract_member
from edgefleet.server.datasets.mnist import load_mnist5k
from edgefleet.server.datasets.scenes import make_scenes
from edgefleet.server.keystore import FleetKey, init_key

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "out" / "bench" / "cache"
# ddddocr 1.6.1 (MIT): a YOLOX character detector, fixed (1, 3, 416, 416) BGR 0..255 input,
# output (1, 3549, 6) over strides 8/16/32, one class (ddddocr/core/detection_engine.py).
DDDDOCR = "ddddocr==1.6.1"
DDDDOCR_DET = "ddddocr/common_det.onnx"


@pytest.fixture(scope="session")
def ddddocr_det() -> Path:
    """The detector out of its wheel (pip download, never installed); a failure, not a skip."""
    try:
        return extract_member(DDDDOCR, DDDDOCR_DET, CACHE)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.fail(f"cannot fetch {DDDDOCR}: {exc}", pytrace=False)


def scenes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """count composed MNIST scenes (128x128 grey) and their (M, 6) box rows."""
    digits, labels = load_mnist5k()
    return make_scenes(digits[:1000], labels[:1000], count, seed)


@pytest.fixture(scope="session")
def key(tmp_path_factory: pytest.TempPathFactory) -> FleetKey:
    """A fleet signing key for the bundles these tests write."""
    k, _ = init_key(tmp_path_factory.mktemp("keys"))
    return k
