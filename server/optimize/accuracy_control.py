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

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet.agent.runtime.confidence import softmax

from .errors import BudgetError
from .quantize import Method, quantizable_nodes, quantize_qdq
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


def cross_entropy(logits: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> float:
    """Mean negative log-likelihood of the true class."""
    p = softmax(logits)
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
    progress: Progress = lambda _m: None,
) -> QuantOutcome:
    """Quantize; if validation accuracy falls more than max_drop, fall back layer by layer.

    keep_float names nodes that stay float in every attempt (the classifier head).
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

        progress(f"calibrating ({method}, {len(calibration)} images) and quantizing")
        q, logits = attempt([])
        acc = float(np.mean(logits.argmax(-1) == val_y))
        outcome = QuantOutcome(q, acc, reference_accuracy)
        outcome.trials.append(([], acc))
        if reference_accuracy - acc <= max_drop:
            return outcome

        nodes = [n for n in quantizable_nodes(model) if n not in keep_float]
        progress(
            f"INT8 drop {100 * (reference_accuracy - acc):.2f} pt > budget "
            f"{100 * max_drop:.2f} pt: measuring sensitivity of {len(nodes)} layers"
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
            if reference_accuracy - acc <= max_drop:
                outcome.model, outcome.accuracy, outcome.excluded = q, acc, excluded
                return outcome
        best = max(a for _, a in outcome.trials)
        raise BudgetError(
            f"INT8 cannot meet the accuracy budget: fp32 validation accuracy "
            f"{reference_accuracy:.4f}, best INT8 {best:.4f} even with all {len(nodes)} "
            f"layers back in fp32; budget {max_drop:.4f}"
        )
