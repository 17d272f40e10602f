"""FeatureBuffer: ring semantics, label filtering, bounded memory, concurrent use; split."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from edgefleet.agent.federated import FeatureBuffer, split

from .digits import digits_split, pooled


@pytest.fixture(scope="module")
def frames() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real digits as two exits: pooled 16 features (exit 0) and all 64 pixels (exit 1)."""
    x_tr, _, y_tr, _ = digits_split()
    return pooled(x_tr), x_tr, y_tr


def test_the_oldest_frames_are_dropped_when_full(frames: tuple[np.ndarray, ...]) -> None:
    early, full, y = frames
    buf = FeatureBuffer(5)
    for i in range(8):
        buf.add([early[i], full[i]], int(y[i]), 1.0, "supplied")
    x0, y0 = buf.examples(0, min_confidence=0.0)
    assert (len(buf), buf.dropped, buf.added) == (5, 3, 8)
    np.testing.assert_array_equal(y0, y[3:8])  # oldest first
    np.testing.assert_array_equal(x0, early[3:8])
    x1, _ = buf.examples(1, min_confidence=0.0)
    np.testing.assert_array_equal(x1, full[3:8])
    assert x0.dtype == np.float32 and y0.dtype == np.int64


def test_pseudo_labels_are_filtered_by_confidence_supplied_kept(
    frames: tuple[np.ndarray, ...],
) -> None:
    early, full, y = frames
    buf = FeatureBuffer(10)
    confidences = [0.95, 0.2, 0.9, 0.5, 0.89999, 0.1]
    sources = ["pseudo", "pseudo", "pseudo", "supplied", "pseudo", "supplied"]
    for i, (conf, source) in enumerate(zip(confidences, sources, strict=True)):
        buf.add([early[i], full[i]], int(y[i]), conf, source)  # type: ignore[arg-type]
    _, labels = buf.examples(0, min_confidence=0.9)
    np.testing.assert_array_equal(labels, y[[0, 2, 3, 5]])  # 0.9 itself is kept
    _, every = buf.examples(0, min_confidence=0.0)
    assert len(every) == 6


def test_exits_that_did_not_run_are_left_out(frames: tuple[np.ndarray, ...]) -> None:
    early, full, y = frames
    buf = FeatureBuffer(10)
    buf.add([early[0], None], int(y[0]), 1.0, "supplied")  # exited early: no exit-1 features
    buf.add([early[1], full[1]], int(y[1]), 1.0, "supplied")
    x0, _ = buf.examples(0, min_confidence=0.0)
    x1, y1 = buf.examples(1, min_confidence=0.0)
    assert x0.shape == (2, 16) and x1.shape == (1, 64)
    np.testing.assert_array_equal(y1, y[1:2])
    # A row reused by the ring forgets the exits of the frame it held before.
    ring = FeatureBuffer(1)
    ring.add([early[0], full[0]], 1, 1.0, "supplied")
    ring.add([early[1], None], 2, 1.0, "supplied")
    assert ring.examples(1, min_confidence=0.0)[0].shape == (0, 64)


def test_features_are_copied_on_add(frames: tuple[np.ndarray, ...]) -> None:
    early, _, y = frames
    reused = early[0].copy()
    buf = FeatureBuffer(4)
    buf.add([reused], int(y[0]), 1.0, "supplied")
    reused[:] = -1.0  # the inference loop writes the next frame into the same buffer
    x, _ = buf.examples(0, min_confidence=0.0)
    np.testing.assert_array_equal(x[0], early[0])
    x[0, 0] = 42.0  # and what examples returns is the caller's to change
    np.testing.assert_array_equal(buf.examples(0, min_confidence=0.0)[0][0], early[0])


def test_memory_is_bounded_and_counted_exactly(frames: tuple[np.ndarray, ...]) -> None:
    early, full, y = frames
    capacity = 50
    buf = FeatureBuffer(capacity)
    buf.add([early[0], full[0]], int(y[0]), 0.5, "pseudo")
    # Per frame: 16 + 64 float32 features, int64 label, float32 confidence, source flag,
    # and which of the 2 exits ran.
    expected = capacity * ((16 + 64) * 4 + 8 + 4 + 1 + 2)
    assert buf.nbytes == expected
    for i in range(1, 4 * capacity):
        buf.add([early[i], full[i]], int(y[i]), 0.5, "pseudo")
    assert buf.nbytes == expected and len(buf) == capacity and buf.dropped == 3 * capacity


def test_bad_frames_are_refused_whole(frames: tuple[np.ndarray, ...]) -> None:
    early, full, y = frames
    buf = FeatureBuffer(4)
    buf.add([early[0], full[0]], int(y[0]), 1.0, "supplied")
    bad = [
        ([early[1], full[1][:10]], 1, 1.0, "supplied", "features"),
        ([early[1]], 1, 1.0, "supplied", "exits"),
        ([early[1] * np.nan, full[1]], 1, 1.0, "supplied", "NaN"),
        ([early[1], full[1]], -1, 1.0, "supplied", "label"),
        ([early[1], full[1]], 1, 1.5, "pseudo", "confidence"),
        ([early[1], full[1]], 1, 1.0, "guess", "source"),
    ]
    for feats, label, conf, source, match in bad:
        with pytest.raises(ValueError, match=match):
            buf.add(feats, label, conf, source)  # type: ignore[arg-type]
    assert len(buf) == 1
    np.testing.assert_array_equal(buf.examples(1, min_confidence=0.0)[0], full[:1])
    with pytest.raises(IndexError):
        buf.examples(2, min_confidence=0.0)
    with pytest.raises(ValueError, match="capacity"):
        FeatureBuffer(0)


def test_an_empty_buffer_gives_no_examples() -> None:
    x, y = FeatureBuffer(3).examples(0, min_confidence=0.0)
    assert x.shape == (0, 0) and y.shape == (0,)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads as often as it can, to provoke interleavings."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_concurrent_add_and_examples_never_see_a_torn_frame(fast_switching: None) -> None:
    capacity, frames = 64, 20_000
    buf = FeatureBuffer(capacity)
    # Frame i carries the value i in every feature of both exits (exact in float32), label
    # i % 10 and confidence (i % 100) / 100: any mix of two frames in one row shows.
    early, late = np.zeros(16, np.float32), np.zeros(8, np.float32)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(frames):
                early[:] = i  # the caller's buffers are reused frame after frame
                late[:] = i
                buf.add([early, late], i % 10, (i % 100) / 100, "pseudo")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not done.is_set() or reads == 0:
        for head in (0, 1):
            x, y = buf.examples(head, min_confidence=0.5)
            assert len(x) == len(y) <= capacity
            if len(x) == 0:
                continue
            values = x[:, 0].astype(np.int64)
            assert (x == x[:, :1]).all(), "a row mixes two frames"
            np.testing.assert_array_equal(y, values % 10)
            assert (values % 100 >= 50).all(), "a pseudo label below min_confidence"
            assert (np.diff(values) > 0).all(), "rows out of order"
            assert values[-1] - values[0] < capacity
        reads += 1
    thread.join()
    assert not errors
    assert buf.added == frames and buf.dropped == frames - capacity and reads > 10


def test_split_is_reproducible_and_disjoint(frames: tuple[np.ndarray, ...]) -> None:
    early, _, y = frames
    x, labels = early[:100], y[:100]
    a = split(x, labels, 0.2, np.random.default_rng(3))
    b = split(x, labels, 0.2, np.random.default_rng(3))
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    x_tr, y_tr, x_val, y_val = a
    assert (len(y_tr), len(y_val)) == (80, 20)
    rows = np.concatenate([x_tr, x_val])
    assert len(np.unique(rows, axis=0)) == len(np.unique(x, axis=0))
    assert sorted(np.concatenate([y_tr, y_val]).tolist()) == sorted(labels.tolist())
    # One example: it trains, nothing validates.
    one = split(x[:1], labels[:1], 0.5, np.random.default_rng(0))
    assert (len(one[1]), len(one[3])) == (1, 0)
