"""onnxruntime session options for small devices, and execution providers with fallback."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Fixed thread count, spinning off, full graph optimisation.

    Spinning is off because several stage sessions share the cores: spinning intra-op
    pools fight each other (measured +55-77% latency with 2 threads, see EDGE-NOTES).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def choose_providers(wanted: Sequence[str] | None) -> list[str]:
    """The wanted providers this build of onnxruntime has, always ending with CPU."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for name in wanted or ["CPUExecutionProvider"]:
        if name in available:
            chosen.append(name)
        else:
            log.info("execution provider %s not available here; skipping it", name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen
