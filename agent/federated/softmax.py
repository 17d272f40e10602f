"""Exit heads as softmax regression: loss, gradient, local mini-batch SGD and evaluation."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
Labels = npt.NDArray[np.integer[Any]]


@dataclass(frozen=True, eq=False)
class HeadWeights:
    """One exit head, logits = x @ weight.T + bias; weight (C, D), bias (C,).

    Float arrays keep their dtype (float32 on the device; a float64 head computes in float64,
    which is what a gradient check wants); anything else becomes float32. No method mutates
    the arrays.
    """

    weight: FloatArray
    bias: FloatArray

    def __post_init__(self) -> None:
        w = np.asarray(self.weight)
        if not np.issubdtype(w.dtype, np.floating):
            w = w.astype(np.float32)
        b = np.asarray(self.bias).astype(w.dtype, copy=False)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head weight {w.shape} and bias {b.shape} do not match (C, D), (C,)")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> HeadWeights:
        """A bundle's head file (an .npz with 'weight' and 'bias'), as float32."""
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            missing = {"weight", "bias"} - set(arrays.files)
            if missing:
                raise ValueError(f"head file lacks {sorted(missing)} (has {arrays.files})")
            return cls(arrays["weight"].astype(np.float32), arrays["bias"].astype(np.float32))

    def to_npz_bytes(self) -> bytes:
        """The bundle's head file format: float32 'weight' and 'bias'."""
        buf = io.BytesIO()
        np.savez(buf, weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32))
        return buf.getvalue()

    def copy(self) -> HeadWeights:
        """An independent copy of both arrays."""
        return HeadWeights(self.weight.copy(), self.bias.copy())

    def delta(self, base: HeadWeights) -> dict[str, FloatArray]:
        """What a device sends: {'weight': self - base, 'bias': self - base}."""
        if base.weight.shape != self.weight.shape:
            raise ValueError(f"base head {base.weight.shape} is not {self.weight.shape}")
        return {"weight": self.weight - base.weight, "bias": self.bias - base.bias}

    def apply(self, delta: Mapping[str, npt.ArrayLike]) -> HeadWeights:
        """This head plus a delta with exactly the keys 'weight' and 'bias', in this dtype."""
        if set(delta) != {"weight", "bias"}:
            raise ValueError(f"a head delta has keys 'weight' and 'bias', got {sorted(delta)}")
        dw, db = np.asarray(delta["weight"]), np.asarray(delta["bias"])
        if dw.shape != self.weight.shape or db.shape != self.bias.shape:
            raise ValueError(f"delta {dw.shape}/{db.shape} does not fit head {self.weight.shape}")
        dtype = self.weight.dtype
        return HeadWeights((self.weight + dw).astype(dtype), (self.bias + db).astype(dtype))


@dataclass(frozen=True)
class TrainResult:
    """What train_head did: the new head, SGD steps, whole epochs, whether the budget hit."""

    head: HeadWeights
    steps: int
    epochs_done: int
    stopped_by_budget: bool
    # Mean cross-entropy of the returned head on all the training data (no regularisers).
    train_loss: float


def _inputs(head: HeadWeights, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[FloatArray, Labels]:
    xs = np.asarray(x, dtype=head.weight.dtype)
    ys = np.asarray(y)
    classes, dim = head.weight.shape
    if xs.ndim != 2 or xs.shape[1] != dim:
        raise ValueError(f"features of shape {xs.shape} do not fit a head on {dim} features")
    if ys.shape != (xs.shape[0],) or not np.issubdtype(ys.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({xs.shape[0]},), got {ys.shape}")
    if xs.shape[0] == 0:
        raise ValueError("no examples")
    if ys.min() < 0 or ys.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got [{ys.min()}, {ys.max()}]")
    return xs, ys


def _softmax_and_ce(head: HeadWeights, x: FloatArray, y: Labels) -> tuple[FloatArray, FloatArray]:
    # Log-sum-exp after subtracting the row maximum: no overflow for any logit scale.
    z = x @ head.weight.T + head.bias
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(x.shape[0])
    probs: FloatArray = np.exp(z - log_norm[:, None])
    ce: FloatArray = log_norm - z[rows, y]
    return probs, ce


def loss_and_grad(
    head: HeadWeights,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    weight_decay: float,
    prox_mu: float = 0.0,
    anchor: HeadWeights | None = None,
    sample_weight: npt.ArrayLike | None = None,
) -> tuple[float, HeadWeights]:
    """Objective and its gradient (as a HeadWeights), computed in the head's dtype.

    (Weighted) mean softmax cross-entropy + weight_decay/2 * ||W||^2 (not the bias)
    + prox_mu/2 * ||theta - anchor||^2 over weight and bias (FedProx's proximal term).
    """
    xs, ys = _inputs(head, x, y)
    if prox_mu and anchor is None:
        raise ValueError("prox_mu > 0 needs an anchor head")
    n = xs.shape[0]
    if sample_weight is None:
        sw = np.full(n, 1.0 / n, dtype=xs.dtype)
    else:
        raw = np.asarray(sample_weight, dtype=np.float64)
        if raw.shape != (n,) or (raw < 0).any() or not raw.sum() > 0:
            raise ValueError(f"sample_weight must be ({n},), non-negative, with a positive sum")
        sw = (raw / raw.sum()).astype(xs.dtype)
    probs, ce = _softmax_and_ce(head, xs, ys)
    w, b = head.weight, head.bias
    loss = float(np.dot(sw.astype(np.float64), ce)) + 0.5 * weight_decay * float(np.vdot(w, w))
    dz = probs
    dz[np.arange(n), ys] -= 1.0
    dz *= sw[:, None]
    grad_w = dz.T @ xs + weight_decay * w
    grad_b = dz.sum(axis=0)
    if prox_mu and anchor is not None:
        dw, db = w - anchor.weight, b - anchor.bias
        loss += 0.5 * prox_mu * (float(np.vdot(dw, dw)) + float(np.vdot(db, db)))
        grad_w += prox_mu * dw
        grad_b += prox_mu * db
    return loss, HeadWeights(grad_w.astype(w.dtype), grad_b.astype(w.dtype))


def train_head(
    base: HeadWeights,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    prox_mu: float,
    rng: np.random.Generator,
    deadline: float | None = None,
    clock: Callable[[], float] = time.process_time,
) -> TrainResult:
    """Mini-batch SGD from base over freshly shuffled data each epoch; base is the prox anchor.

    deadline is a value of clock() (CPU seconds by default): training stops between batches
    once clock() reaches it. time.process_time counts every thread of the process; a training
    thread beside the inference loop wants clock=time.thread_time.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0: {epochs}, {batch_size}, {lr}")
    xs, ys = _inputs(base, x, y)
    xs = np.ascontiguousarray(xs)
    # head shares w and b, which are ours alone: SGD updates them in place.
    w, b = base.weight.copy(), base.bias.copy()
    head = HeadWeights(w, b)
    steps = epochs_done = 0
    stopped = False
    for _ in range(epochs):
        order = rng.permutation(xs.shape[0])
        for start in range(0, len(order), batch_size):
            if deadline is not None and clock() >= deadline:
                stopped = True
                break
            batch = order[start : start + batch_size]
            _, grad = loss_and_grad(
                head, xs[batch], ys[batch], weight_decay=weight_decay, prox_mu=prox_mu,
                anchor=base,
            )
            w -= lr * grad.weight
            b -= lr * grad.bias
            steps += 1
        if stopped:
            break
        epochs_done += 1
    loss, _ = evaluate(head, xs, ys)
    return TrainResult(head, steps, epochs_done, stopped, loss)


def evaluate(head: HeadWeights, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a head on labelled features."""
    xs, ys = _inputs(head, x, y)
    probs, ce = _softmax_and_ce(head, xs, ys)
    return float(ce.mean(dtype=np.float64)), float((probs.argmax(axis=1) == ys).mean())
