"""Accuracy-aware INT8 for detectors: fp32 fallback of the most sensitive nodes, on mAP.

The classifier's loop (accuracy_control.py) ranks nodes by cross-entropy of class logits,
which a detector has none of; here every attempt is scored with the task's own metric on
the validation split (mAP@0.5, or agreement with fp32 when the data is unlabelled), through
`score`. Calibration ranges are computed once and reused (quantize_qdq's cache).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from ..errors import BudgetError
from ..quantize import Method, quantizable_nodes, quantize_qdq

Progress = Callable[[str], None]
Score = Callable[[onnx.ModelProto], float]  # validation metric in [0, 1], higher is better


@dataclass
class DetQuantOutcome:
    """The chosen INT8 model, its validation metric, and how it was reached."""

    model: onnx.ModelProto
    score: float
    reference: float
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    trials: list[tuple[int, float]] = field(default_factory=list)  # (nodes in fp32, score)

    def to_report(self) -> dict[str, Any]:
        """JSON-ready decisions."""
        return {
            "val_metric": self.score,
            "reference_val_metric": self.reference,
            "drop_points": 100 * (self.reference - self.score),
            "excluded": self.excluded,
            "sensitivity": self.sensitivity,
            "trials": [{"fp32_nodes": n, "val_metric": s} for n, s in self.trials],
        }


def quantize_for_metric(
    model: onnx.ModelProto,
    input_name: str,
    calibration: npt.NDArray[np.float32],
    score: Score,
    *,
    reference: float,
    max_drop_points: float,
    method: Method = "minmax",
    reduce_range: bool = False,
    first_check: Callable[[onnx.ModelProto], None] | None = None,
    keep_float: Sequence[str] = (),
    progress: Progress = lambda _m: None,
) -> DetQuantOutcome:
    """INT8 whose validation metric is within max_drop_points (x 100) of the reference.

    The all-INT8 model first (first_check may refuse it: the collapse guard); if it misses,
    each quantizable node's sensitivity is the metric with only that node in fp32, and nodes
    go back to fp32 from the most helpful on until the budget holds. BudgetError otherwise.
    keep_float: nodes never quantized in any attempt (the nodes writing the raw outputs).
    """
    budget = max_drop_points / 100.0
    with tempfile.TemporaryDirectory(prefix="edgefleet-detq-") as tmp:
        cache = Path(tmp) / "ranges.json"

        def attempt(exclude: list[str]) -> tuple[onnx.ModelProto, float]:
            q = quantize_qdq(
                model,
                input_name,
                calibration,
                method=method,
                exclude=[*keep_float, *exclude],
                reduce_range=reduce_range,
                cache=cache,
            )
            return q, score(q)

        progress(f"calibrating ({method}, {len(calibration)} images) and quantizing")
        q, s = attempt([])
        if first_check is not None:
            first_check(q)
        outcome = DetQuantOutcome(q, s, reference)
        outcome.trials.append((0, s))
        if reference - s <= budget:
            return outcome
        nodes = quantizable_nodes(model)
        progress(
            f"INT8 drop {100 * (reference - s):.2f} pt over the budget of "
            f"{max_drop_points:g} pt: measuring sensitivity of {len(nodes)} nodes"
        )
        for i, node in enumerate(nodes):
            _, outcome.sensitivity[node] = attempt([node])
            progress(f"  sensitivity {i + 1}/{len(nodes)} {node}: {outcome.sensitivity[node]:.4f}")
        # Highest metric with the node in fp32 first: keeping it float helps most.
        ranked = sorted(nodes, key=lambda n: -outcome.sensitivity[n])
        excluded: list[str] = []
        for node in ranked:
            excluded.append(node)
            q, s = attempt(excluded)
            outcome.trials.append((len(excluded), s))
            progress(f"  fp32 fallback for {len(excluded)} node(s): {s:.4f}")
            if reference - s <= budget:
                outcome.model, outcome.score, outcome.excluded = q, s, list(excluded)
                return outcome
        best = max(t[1] for t in outcome.trials)
        raise BudgetError(
            f"INT8 cannot meet the detection budget: fp32 validation mAP@0.5 {reference:.4f}, "
            f"best INT8 {best:.4f} even with all {len(nodes)} quantizable nodes back in fp32; "
            f"budget {max_drop_points:g} mAP points"
        )
