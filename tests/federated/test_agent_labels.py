"""The supplied-labels folder in-process: real digit images become supplied examples once,
and every bad file is refused by name without stopping the scan."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgefleet.agent.federated.collect import FeatureCollector
from edgefleet.agent.federated.labels import LabelFolder
from edgefleet.server.reference import load_reference_split

from .test_agent_support import exits_bundle, load_model


def write_digits(root: Path, count: int, *, age_s: float = 10.0) -> list[int]:
    """count test digits as root/LABEL/NAME.png (28x28 grey, as in MNIST); their labels."""
    images, labels = load_reference_split()["test"]
    past = time.time() - age_s
    for i in range(count):
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"d{i}.png"
        assert cv2.imwrite(str(path), images[i])
        os.utime(path, (past, past))
    return [int(v) for v in labels[:count]]


def test_supplied_images_are_probed_once_and_bad_files_are_named(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    model, _ = load_model(bundle, key)
    m = model.manifest
    root = tmp_path / "labels"
    labels = write_digits(root, 12)
    past = time.time() - 10
    bad = {
        root / "3" / "broken.png": b"\x89PNG not really",
        root / "7" / "notes.txt": b"hello",
        root / "cat" / "c.png": cv2.imencode(".png", np.zeros((28, 28), np.uint8))[1].tobytes(),
        root / "loose.png": cv2.imencode(".png", np.zeros((28, 28), np.uint8))[1].tobytes(),
    }
    for path, data in bad.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (past, past))
    fresh = root / "1" / "fresh.png"  # still being written, as far as anyone can tell
    fresh.write_bytes(bad[root / "loose.png"])
    refused: list[tuple[Path, str]] = []
    folder = LabelFolder(
        root, labels=m.labels, preprocessing=m.preprocessing, dtype=m.input.dtype,
        bundle_sha256=model.verified.manifest_sha256, scan_s=60,
        on_reject=lambda p, why: refused.append((p, why)),
    )  # fmt: skip
    collector = FeatureCollector(10, 100, 100, model.verified.manifest_sha256)
    folder.scan_once()
    taken = []
    while (item := folder.take()) is not None:
        assert item.tensor.shape == tuple(m.input.shape)
        collector.add_supplied(model.probe(item.tensor), item.class_index)
        folder.finish(item)
        taken.append(int(item.label))
    assert sorted(taken) == sorted(labels)
    folder.scan_once()  # settles what was consumed: moved to .done, never read again
    assert folder.take() is None
    done = sorted((root / ".done").rglob("*.png"))
    assert len(done) == 12 and all(p.parent.name == str(lab) for p, lab in
                                   zip(sorted(done, key=lambda p: int(p.stem[1:])), labels,
                                       strict=True))  # fmt: skip
    why = {p.name: w for p, w in refused}
    assert set(why) == {"broken.png", "notes.txt", "c.png", "loose.png"}
    assert "not a readable image" in why["broken.png"]
    assert "not a .png/.jpg/.jpeg file" in why["notes.txt"]
    assert "unknown label 'cat'" in why["c.png"] and "not inside a LABEL/" in why["loose.png"]
    assert {p.name for p in (root / ".rejected").rglob("*") if p.is_file()} == set(why)
    assert fresh.exists() and folder.rejected == 4 and folder.consumed == 12
    # The supplied examples are there for every exit, with their true labels.
    _, ex = collector.examples(0, "supplied", 0.99)
    assert sorted(ex.y.tolist()) == sorted(labels) and ex.supplied.all()
    _, none = collector.examples(0, "pseudo", 0.0)
    assert len(none) == 0
    # A model switch before the loop probed an image: it is read again, for the new model.
    os.utime(fresh, (past, past))
    folder.scan_once()
    item = folder.take()
    assert item is not None and item.path == fresh
    folder.finish(item, retry=True)
    folder.scan_once()
    again = folder.take()
    assert again is not None and again.path == fresh
