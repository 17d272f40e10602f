"""Exit heads: multinomial logistic regression on a stage's features, fitted in numpy/scipy."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

# Features whose spread is below this are treated as constant: scaling them up would only
# amplify float noise into huge raw-space weights.
_STD_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class LinearHead:
    """A linear classifier on raw features: logits = features @ weight.T + bias."""

    weight: F32  # (C, F)
    bias: F32  # (C,)
    # Optimiser iterations that produced the head (0 when loaded from a file).
    n_iter: int = 0

    @property
    def classes(self) -> int:
        """Number of classes C."""
        return int(self.weight.shape[0])

    @property
    def features(self) -> int:
        """Number of input features F."""
        return int(self.weight.shape[1])

    def logits(self, features: npt.ArrayLike) -> F32:
        """Class scores (N, C) for features (N, F), computed in float32 as on the device."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(f"features of shape {x.shape} do not fit a head on {self.features}")
        out: F32 = x @ self.weight.T + self.bias
        return out

    def predict(self, features: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Arg-max class per row."""
        return np.asarray(self.logits(features).argmax(axis=1), dtype=np.int64)

    def to_npz_bytes(self) -> bytes:
        """The bundle's head file: an .npz with float32 arrays 'weight' (C,F) and 'bias' (C,)."""
        buf = io.BytesIO()
        np.savez(buf, weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32))
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> LinearHead:
        """Read a head file written by to_npz_bytes."""
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            for name in ("weight", "bias"):
                if name not in arrays.files:
                    raise ValueError(f"head file lacks array {name!r} (has {arrays.files})")
            weight = np.asarray(arrays["weight"], dtype=np.float32)
            bias = np.asarray(arrays["bias"], dtype=np.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"head weight {weight.shape} and bias {bias.shape} do not match")
        return cls(weight, bias)


def loss_and_grad(
    weight: npt.ArrayLike,
    bias: npt.ArrayLike,
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    l2: float,
) -> tuple[float, F64, F64]:
    """Mean cross-entropy + l2 * ||W||^2 / 2 and its gradients with respect to W and b."""
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = x.shape[0]
    z = x @ w.T + b
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(n)
    loss = float((log_norm - z[rows, y]).mean() + 0.5 * l2 * float((w * w).sum()))
    # d(mean CE)/dz = (softmax - onehot) / N
    dz = np.exp(z - log_norm[:, None])
    dz[rows, y] -= 1.0
    dz /= n
    grad_w: F64 = dz.T @ x + l2 * w
    grad_b: F64 = dz.sum(axis=0)
    return loss, grad_w, grad_b


def standardization(features: npt.ArrayLike) -> tuple[F64, F64]:
    """Per-feature mean and (floored) std; constant features get std 1 so they stay at 0."""
    x = np.asarray(features, dtype=np.float64)
    mean: F64 = x.mean(axis=0)
    std: F64 = x.std(axis=0)
    std = np.where(std < _STD_FLOOR, 1.0, std)
    return mean, std


def fold_standardization(
    weight: npt.ArrayLike, bias: npt.ArrayLike, mean: npt.ArrayLike, std: npt.ArrayLike
) -> tuple[F64, F64]:
    """Raw-feature (W, b) equal to the model (W, b) applied to (features - mean) / std."""
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    sd = np.asarray(std, dtype=np.float64)
    w_raw: F64 = w / sd
    b_raw: F64 = b - w_raw @ mu
    return w_raw, b_raw


def _unfold_standardization(
    weight: npt.ArrayLike, bias: npt.ArrayLike, mean: F64, std: F64
) -> tuple[F64, F64]:
    # Inverse of fold_standardization: a warm start is given in raw space, fitted in z-space.
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    return w * std, b + w @ mean


def _check_inputs(
    features: npt.ArrayLike, labels: npt.ArrayLike, classes: int
) -> tuple[F64, npt.NDArray[np.int64]]:
    x = np.asarray(features, dtype=np.float64)
    y_raw = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, F), got shape {x.shape}")
    if y_raw.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {y_raw.shape}")
    if x.shape[0] != y_raw.shape[0]:
        raise ValueError(f"features have N={x.shape[0]} rows but labels have N={y_raw.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("no training samples (N=0)")
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    if not np.issubdtype(y_raw.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y_raw.dtype}")
    y = y_raw.astype(np.int64)
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels out of range [0, {classes}): min {y.min()}, max {y.max()}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x, y


def fit_softmax_regression(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
    init: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> LinearHead:
    """Fit a multinomial logistic regression head with full-batch L-BFGS on standardised features.

    The loss is mean cross-entropy + l2 * ||W_z||^2 / 2 where W_z is the weight on standardised
    features (the bias is not regularised); the standardisation is folded into the returned head,
    which works on raw features. init is a raw-space (weight, bias) warm start.
    """
    x, y = _check_inputs(features, labels, classes)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    n_feat = x.shape[1]
    mean, std = standardization(x)
    z = (x - mean) / std
    if init is None:
        # The loss is convex: the start changes the path, not the optimum (up to tol). It is
        # drawn from the seed so every run is reproducible.
        rng = np.random.default_rng(seed)
        w0 = rng.normal(0.0, 1e-3, size=(classes, n_feat))
        b0 = np.zeros(classes)
    else:
        w_init = np.asarray(init[0], dtype=np.float64)
        b_init = np.asarray(init[1], dtype=np.float64)
        if w_init.shape != (classes, n_feat) or b_init.shape != (classes,):
            raise ValueError(
                f"init weight {w_init.shape} / bias {b_init.shape} do not fit "
                f"({classes}, {n_feat}) / ({classes},)"
            )
        w0, b0 = _unfold_standardization(w_init, b_init, mean, std)
    split = classes * n_feat

    def objective(theta: F64) -> tuple[float, F64]:
        w = theta[:split].reshape(classes, n_feat)
        loss, gw, gb = loss_and_grad(w, theta[split:], z, y, l2)
        return loss, np.concatenate([gw.ravel(), gb])

    # One BLAS thread: these GEMMs are small and run ~100 times in a row; on a busy 2-core box
    # OpenBLAS's second thread waits for a CPU at every call (digits: 9 s with 2 threads, 0.17 s
    # with 1; F=256, N=3000, C=10: 0.84 s vs 0.23 s). The limit is process-wide while it lasts.
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(
            objective,
            np.concatenate([w0.ravel(), b0]),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": tol, "ftol": tol * 1e-3},
        )
    theta = np.asarray(result.x, dtype=np.float64)
    w_raw, b_raw = fold_standardization(
        theta[:split].reshape(classes, n_feat), theta[split:], mean, std
    )
    return LinearHead(w_raw.astype(np.float32), b_raw.astype(np.float32), int(result.nit))


def accuracy(head: LinearHead, features: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Fraction of rows whose arg-max logit equals the label."""
    y = np.asarray(labels, dtype=np.int64)
    return float((head.predict(features) == y).mean())


def select_l2(
    train_x: npt.ArrayLike,
    train_y: npt.ArrayLike,
    val_x: npt.ArrayLike,
    val_y: npt.ArrayLike,
    classes: int,
    grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
) -> float:
    """The l2 from grid with the best validation accuracy; ties go to the larger l2."""
    if not grid:
        raise ValueError("empty l2 grid")
    best_l2 = -1.0
    best_acc = -1.0
    # Each l2 fitted cold, so the chosen one refits to exactly the head that was scored.
    # Largest first with a strict '>' keeps the larger l2 on a tie.
    for l2 in sorted(grid, reverse=True):
        acc = accuracy(fit_softmax_regression(train_x, train_y, classes, l2=l2), val_x, val_y)
        if acc > best_acc:
            best_l2, best_acc = float(l2), acc
    return best_l2
