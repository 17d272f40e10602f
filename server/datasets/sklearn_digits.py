"""scikit-learn's 1,797 8x8 digits, the second reference set."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from edgefleet.server.datasets.mnist import INSTALL_HINT, DatasetUnavailableError

# load_digits() stores pixel intensities as 0..16 (4x4 blocks counted from 32x32 bitmaps).
_SKLEARN_DIGITS_MAX = 16


def load_sklearn_digits() -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Load sklearn's digits as uint8 images (1797, 8, 8) scaled to 0..255 and int64 labels."""
    try:
        # Imported here: scikit-learn is a server extra and slow to import.
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailableError(
            f"sklearn digits need the 'scikit-learn' package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from exc
    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)
    images = np.rint(raw * (255.0 / _SKLEARN_DIGITS_MAX)).clip(0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels
