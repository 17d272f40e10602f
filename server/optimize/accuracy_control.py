"""Accuracy-aware INT8: return the most sensitive layers to fp32 until the budget holds.

Sensitivity of a node is the validation cross-entropy of the model quantized with only that
node kept in fp32 (lower = keeping it in fp32 helps more), as in NNCF's max_drop and Neural
Compressor's fallback strategy (EDGE-NOTES).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet.agent.runtime.confidence import softmax

from .errors import BudgetError
from .guard import check_collapse, compare_outputs, input_stats
from .quantize import Method, quantizable_nodes, quantize_qdq
from .risk import drop_bound
from .runner import logits_of

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class QuantOutcome:
    """The chosen INT8 model and how it was reached."""

    model: onnx.ModelProto
    accuracy: float
    reference_accuracy: float
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    trials: list[tuple[list[str], float]] = field(default_factory=list)
    bound: dict[str, float | int] = field(default_factory=dict)  # the last attempt's (risk.py)
    agreement: dict[str, Any] = field(default_factory=dict)  # all-INT8 vs fp32 (guard.py)


@dataclass(frozen=True)
class Certify:
    """Accept an INT8 attempt only if its drop's upper bound against fp32 is within budget."""

    reference_correct: npt.NDArray[np.bool_]  # fp32 right or wrong, per validation sample
    confidence: float
    budget: float


def cross_entropy(logits: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> float:
    """Mean negative log-likelihood of the true class.

    A model that ends in Softmax already outputs probabilities: a second softmax would squash
    them into near-uniform rows and every layer's loss would look alike (seen on PP-OCR's
    text-line classifier: 0.53 for all), so rows that are already distributions are used as
    they are.
    """
    z = np.asarray(logits, dtype=np.float64)
    is_prob = bool((z >= 0).all() and np.allclose(z.sum(axis=-1), 1.0, atol=1e-3))
    p = z if is_prob else softmax(z)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))


def quantize_within_budget(
    model: onnx.ModelProto,
    input_name: str,
    calibration: npt.NDArray[np.float32],
    val_x: npt.NDArray[np.float32],
    val_y: npt.NDArray[np.int64],
    *,
    reference_accuracy: float,
    max_drop: float,
    method: Method = "minmax",
    reduce_range: bool = False,
    keep_float: Sequence[str] = (),
    certify: Certify | None = None,
    reference_logits: npt.NDArray[np.float32] | None = None,
    progress: Progress = lambda _m: None,
) -> QuantOutcome:
    """Quantize; if validation accuracy falls more than max_drop, fall back layer by layer.

    keep_float names nodes that stay float in every attempt (the classifier head). With
    `certify`, an attempt must also keep the upper confidence bound of its paired drop against
    fp32 within certify.budget (risk.py): a model the exits could not start from is no answer.
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-calib-") as tmp:
        cache = Path(tmp) / "ranges.json"

        def attempt(exclude: list[str]) -> tuple[onnx.ModelProto, npt.NDArray[np.float32]]:
            q = quantize_qdq(
                model,
                input_name,
                calibration,
                method=method,
                exclude=[*keep_float, *exclude],
                reduce_range=reduce_range,
                cache=cache,
            )
            return q, logits_of(q, val_x)

        def holds(logits: npt.NDArray[np.float32], acc: float) -> bool:
            if reference_accuracy - acc > max_drop:
                return False
            if certify is None:
                return True
            bound = drop_bound(
                certify.reference_correct, logits.argmax(-1) == val_y, certify.confidence
            )
            outcome.bound = bound.to_report()
            return bound.within(certify.budget)

        progress(f"calibrating ({method}, {len(calibration)} images) and quantizing")
        q, logits = attempt([])
        acc = float(np.mean(logits.argmax(-1) == val_y))
        outcome = QuantOutcome(q, acc, reference_accuracy)
        outcome.trials.append(([], acc))
        if reference_logits is not None:
            # The collapse guard judges the first, all-INT8 attempt: a collapse comes from the
            # activation ranges (calibration data), which no fp32 fallback of weights repairs,
            # so falling back layer by layer would only end in a BudgetError naming no cause.
            agreement = compare_outputs([reference_logits], [logits], classifier=True)
            outcome.agreement = agreement.to_report()
            check_collapse(
                agreement, calib_stats=input_stats(calibration), val_stats=input_stats(val_x)
            )
        if holds(logits, acc):
            return outcome

        nodes = [n for n in quantizable_nodes(model) if n not in keep_float]
        progress(
            f"INT8 drop {100 * (reference_accuracy - acc):.2f} pt"
            + (f" (bound {100 * outcome.bound['drop_upper']:.2f} pt)" if outcome.bound else "")
            + f" over budget: measuring sensitivity of {len(nodes)} layers"
        )
        for i, node in enumerate(nodes):
            _, node_logits = attempt([node])
            outcome.sensitivity[node] = cross_entropy(node_logits, val_y)
            progress(
                f"  sensitivity {i + 1}/{len(nodes)} {node}: loss {outcome.sensitivity[node]:.4f}"
            )
        ranked = sorted(nodes, key=lambda n: outcome.sensitivity[n])
        excluded: list[str] = []
        for node in ranked:
            excluded.append(node)
            q, logits = attempt(excluded)
            acc = float(np.mean(logits.argmax(-1) == val_y))
            outcome.trials.append((list(excluded), acc))
            progress(f"  fp32 fallback for {len(excluded)} layer(s): accuracy {acc:.4f}")
            if holds(logits, acc):
                outcome.model, outcome.accuracy, outcome.excluded = q, acc, excluded
                return outcome
        best = max(a for _, a in outcome.trials)
        bound = (
            f", drop bound {100 * outcome.bound['drop_upper']:.2f} pt at "
            f"{certify.confidence:.0%} confidence on {len(val_y)} images"
            if certify is not None and outcome.bound
            else ""
        )
        raise BudgetError(
            f"INT8 cannot meet the accuracy budget: fp32 validation accuracy "
            f"{reference_accuracy:.4f}, best INT8 {best:.4f} even with all {len(nodes)} "
            f"layers back in fp32{bound}; budget {max_drop:.4f}"
        )
