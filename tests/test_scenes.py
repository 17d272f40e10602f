"""Detection scenes from MNIST-5k: deterministic, disjoint by digit, boxes tight on ink."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.server.datasets import scenes
from edgefleet.server.datasets.mnist import load_mnist5k
from edgefleet.server.datasets.splits import load_split
from edgefleet.server.reference import SPLIT_PATH


@pytest.fixture(scope="module")
def pool() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist5k()
    idx = load_split(SPLIT_PATH).arrays()["validation"]
    return images[idx], labels[idx]


def test_scenes_are_deterministic_by_seed(pool: tuple[np.ndarray, np.ndarray]) -> None:
    a = scenes.make_scenes(*pool, count=20, seed=7)
    b = scenes.make_scenes(*pool, count=20, seed=7)
    c = scenes.make_scenes(*pool, count=20, seed=8)
    assert scenes.digest(*a) == scenes.digest(*b)
    assert scenes.digest(*a) != scenes.digest(*c)


def test_boxes_inside_and_tight_on_ink(pool: tuple[np.ndarray, np.ndarray]) -> None:
    digits, labels = pool
    # One digit on a flat black ground, no noise: recover its ink box from the pixels.
    images, boxes = scenes.make_scenes(digits, labels, count=60, seed=3)
    scenes.validate_boxes(images, boxes)
    assert images.shape == (60, scenes.SCENE_SIZE, scenes.SCENE_SIZE)
    assert boxes.shape[1] == 6 and boxes.dtype == np.float32
    counts = np.bincount(boxes[:, 0].astype(int), minlength=60)
    assert counts.max() <= scenes.MAX_DIGITS and counts.min() == 0
    w = boxes[:, 4] - boxes[:, 2]
    h = boxes[:, 5] - boxes[:, 3]
    assert h.min() >= 0.4 * scenes.SCALE_RANGE[0] and h.max() <= scenes.SCALE_RANGE[1]
    assert w.min() >= 1


def test_ink_box_is_tight(pool: tuple[np.ndarray, np.ndarray]) -> None:
    digits, _ = pool
    for digit in digits[:50]:
        x1, y1, x2, y2 = scenes.ink_box(digit)  # type: ignore[misc]
        ink = digit >= scenes.INK_THRESHOLD
        # Every ink pixel inside; each edge row and column of the box holds ink.
        assert ink[y1:y2, x1:x2].sum() == ink.sum()
        assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any()
        assert ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any()
    assert scenes.ink_box(np.zeros((28, 28), np.uint8)) is None


def test_record_matches_regeneration_and_splits_are_disjoint() -> None:
    record = scenes.load_record()
    assert set(record.splits) == {"train", "calibration", "validation", "test"}
    assert {k: v.num_images for k, v in record.splits.items()} == scenes.DET_SPLIT_SIZES
    # Pools are the MNIST-5k split parts, disjoint by construction of that split.
    parts = load_split(SPLIT_PATH).arrays()
    for info in record.splits.values():
        assert info.pool_size == parts[info.pool].size
    all_idx = np.concatenate([parts[v.pool] for v in record.splits.values()])
    assert np.unique(all_idx).size == all_idx.size
    images, boxes = scenes.load_reference_detection("validation")
    assert images.shape[0] == record.splits["validation"].num_images
    assert boxes.shape[0] == record.splits["validation"].num_boxes


def test_regeneration_detects_a_changed_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    record = scenes.load_record()
    bad = record.model_copy(
        update={
            "splits": {
                **record.splits,
                "calibration": record.splits["calibration"].model_copy(update={"seed": 1}),
            }
        }
    )
    path = tmp_path / "rec.json"
    bad.save(path)
    with pytest.raises(scenes.SceneMismatchError):
        scenes.load_reference_detection("calibration", path)


def test_write_npz_follows_the_contract(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "det.npz"
    scenes.write_npz(path, splits=("calibration",))
    with np.load(path) as npz:
        assert list(npz["labels"]) == [str(i) for i in range(10)]
        images, boxes = npz["calibration_images"], npz["calibration_boxes"]
    assert images.dtype == np.uint8 and images.ndim == 3
    assert boxes.dtype == np.float32 and boxes.shape[1] == 6
    scenes.validate_boxes(images, boxes)
