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
    """The wanted providers this build of onnxruntime has, always ending with CPU.

    One log line when any wanted provider is missing (a CPU-only wheel on a Jetson, say),
    naming what was asked for, what this build has and what will be used.
    """
    available = ort.get_available_providers()
    asked = list(wanted or ["CPUExecutionProvider"])
    chosen = [name for name in asked if name in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    missing = [name for name in asked if name not in available]
    if missing:
        log.warning(
            "execution providers %s not in this onnxruntime build (it has %s); using %s",
            ", ".join(missing),
            ", ".join(available),
            ", ".join(chosen),
        )
    return chosen


def report_fallback(sess: ort.InferenceSession, chosen: Sequence[str], what: str) -> None:
    """One log line when onnxruntime itself dropped a provider (no GPU, driver mismatch)."""
    active = sess.get_providers()
    dropped = [name for name in chosen if name not in active]
    if dropped:
        log.warning(
            "%s: onnxruntime could not use %s; running on %s",
            what,
            ", ".join(dropped),
            ", ".join(active),
        )
