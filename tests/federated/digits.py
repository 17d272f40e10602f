"""Real data for the federated tests: scikit-learn's 8x8 digits, scaled to [0, 1]."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Split = tuple[
    npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]
]


def digits_split() -> Split:
    """1797 digits (64 features, 10 classes): 70/30 stratified, seed 0, pixels / 16."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_tr, x_te, y_tr.astype(np.int64), y_te.astype(np.int64)


def pooled(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """2x2 average pooling of 8x8 images: 16 features, like an early exit's pooled tensor."""
    out: npt.NDArray[np.float32] = x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    return out
