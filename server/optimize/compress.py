"""Run the optional compression passes in order, keeping each only if the budget still holds.

Passes share the first half of the accuracy budget with quantization (measured against the
fp32 model's validation accuracy); a pass that breaks it is reported with its numbers and
dropped, never shipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from .options import OptimizeOptions
from .runner import accuracy, logits_of

Progress = Callable[[str], None]
F32 = npt.NDArray[np.float32]


def _measure(
    model: onnx.ModelProto, x: dict[str, F32], y: dict[str, npt.NDArray[np.int64]]
) -> float:
    return accuracy(logits_of(model, x["validation"]), y["validation"])


def run_passes(
    model: onnx.ModelProto,
    x: dict[str, F32],
    y: dict[str, npt.NDArray[np.int64]],
    opts: OptimizeOptions,
    ref_acc: float,
    progress: Progress,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Apply prune, low-rank and weight sharing as asked; returns the model and one record each."""
    floor = ref_acc - opts.max_drop / 2
    records: list[dict[str, Any]] = []

    def consider(name: str, candidate: onnx.ModelProto, details: dict[str, Any]) -> None:
        nonlocal model
        acc = _measure(candidate, x, y)
        ok = acc >= floor - 1e-12
        record = {"pass": name, "accepted": ok, "val_accuracy": acc, "floor": floor, **details}
        records.append(record)
        verdict = "kept" if ok else f"REJECTED (below {floor:.4f})"
        progress(f"      {name}: validation accuracy {acc:.4f} -> {verdict}")
        if ok:
            model = candidate

    if opts.prune > 0:
        from .prune import prune_channels

        pr = prune_channels(model, opts.prune)
        consider(
            f"prune {opts.prune:.0%}",
            pr.model,
            {
                "macs_before": pr.macs_before,
                "macs_after": pr.macs_after,
                "removed": pr.removed,
                "skipped": pr.skipped,
            },
        )
    if opts.low_rank is not None:
        from .lowrank import low_rank

        lr = low_rank(model, energy=opts.low_rank)
        consider(
            f"low-rank (energy {opts.low_rank})",
            lr.model,
            {
                "macs_before": lr.macs_before,
                "macs_after": lr.macs_after,
                "factored": {k: list(v) for k, v in lr.factored.items()},
            },
        )
    if opts.share is not None:
        from .sharing import share_weights

        sh = share_weights(model, clusters=opts.share)
        consider(
            f"weight sharing ({opts.share} clusters)",
            sh.model,
            {
                "raw_bytes": sh.raw_bytes,
                "gzip_bytes_before": sh.compressed_bytes_before,
                "gzip_bytes_after": sh.compressed_bytes_after,
            },
        )
    if not records:
        progress("      none requested")
    return model, records
