"""Reference data sets, their recorded splits and the shared preprocessing."""

from edgefleet.server.datasets.mnist import (
    DatasetUnavailableError,
    file_sha256,
    load_mnist5k,
    mnist5k_path,
    mnist5k_sha256,
)
from edgefleet.server.datasets.preprocess import bgr_to_gray, preprocessing_spec, to_model_input
from edgefleet.server.datasets.sklearn_digits import load_sklearn_digits
from edgefleet.server.datasets.splits import (
    MNIST5K_SPLIT_SEED,
    MNIST5K_SPLIT_SIZES,
    SPLIT_NAMES,
    Split,
    SplitMismatchError,
    load_split,
    make_split,
    stratified_split,
    verify_split,
)

__all__ = [
    "MNIST5K_SPLIT_SEED",
    "MNIST5K_SPLIT_SIZES",
    "SPLIT_NAMES",
    "DatasetUnavailableError",
    "Split",
    "SplitMismatchError",
    "bgr_to_gray",
    "file_sha256",
    "load_mnist5k",
    "load_sklearn_digits",
    "load_split",
    "make_split",
    "mnist5k_path",
    "mnist5k_sha256",
    "preprocessing_spec",
    "stratified_split",
    "to_model_input",
    "verify_split",
]
