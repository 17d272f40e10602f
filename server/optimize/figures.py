"""The manifest's validation figures, recomputed the way a device computes them.

Thresholds are calibrated on features from the unsplit model and scored with vectorised
numpy; a device runs the split stages one frame at a time and decides each exit with the
agent's own per-frame arithmetic. Both must agree to the frame, or the manifest's figures
(and the budget they certify) describe a model nobody runs: this check runs the signed bundle
through the agent runtime on the validation split and compares, before anything ships.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.runtime.staged import StagedModel, exit_decision

from .errors import ModelError


def device_decisions(
    verified: VerifiedBundle, x: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Per sample: each early exit's class and confidence, and the final head's class.

    Every stage runs (StagedModel.probe) and each exit is decided by exit_decision on the
    head's float32 logits, exactly as StagedModel.predict does frame by frame.
    """
    staged = StagedModel(verified, threads=1)
    rules = [h.spec.rule for h in staged.heads[:-1] if h is not None]
    heads = [h for h in staged.heads[:-1] if h is not None]
    n, e = x.shape[0], len(heads)
    classes = np.zeros((e, n), dtype=np.int64)
    scores = np.zeros((e, n), dtype=np.float64)
    final = np.zeros(n, dtype=np.int64)
    for i in range(n):
        probe = staged.probe(x[i : i + 1])
        for k, (head, rule) in enumerate(zip(heads, rules, strict=True)):
            cls, _, score = exit_decision(head.logits(probe.features[k].reshape(1, -1)), rule)
            classes[k, i], scores[k, i] = cls, score
        final[i] = probe.prediction.class_index
    return classes, scores, final


def check_manifest_figures(
    verified: VerifiedBundle, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> None:
    """Raise ModelError unless every operating point's validation figures are the device's."""
    m = verified.manifest
    if not m.operating_points:
        return
    classes, scores, final = device_decisions(verified, x)
    n = x.shape[0]
    for point in m.operating_points:
        taken = np.full(n, len(point.thresholds), dtype=np.int64)
        for k in range(len(point.thresholds) - 1, -1, -1):
            t = point.thresholds[k]
            if t is not None:
                taken[scores[k] >= t] = k
        stacked = np.vstack([classes, final[None, :]])
        hits = int((stacked[taken, np.arange(n)] == y).sum())
        rates = [float(c) / n for c in np.bincount(taken, minlength=len(point.thresholds) + 1)]
        if hits / n != point.val_accuracy or (
            point.exit_rates is not None and rates != list(point.exit_rates)
        ):
            raise ModelError(
                f"operating point {point.name!r}: the manifest says validation accuracy "
                f"{point.val_accuracy:.6f}, exit rates {point.exit_rates}, but the device "
                f"computes {hits / n:.6f}, {rates}; refusing to ship figures nobody runs"
            )
