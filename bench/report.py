"""What every benchmark's JSON report shares: progress lines, machine, load, rounding, output.

Each benchmark prints its progress on stderr and its report last on stdout, so
`python -m bench.X | tail` or a pipe into `jq` sees only the JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from edgefleet.server.optimize.options import cpu_has_vnni, use_reduce_range

Targets = dict[str, tuple[str, float]]  # figure -> ("min" | "max", bound)


def say(msg: str) -> None:
    """Progress line on stderr (stdout carries only the JSON)."""
    print(msg, file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "vnni": cpu_has_vnni(),
        "reduce_range": use_reduce_range("auto"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }


def load_avg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def report_head(benchmark: str) -> dict[str, Any]:
    """The first keys of a report: what ran, when, and the load when it started."""
    return {
        "benchmark": benchmark,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_avg": {"start": load_avg()},
    }


def target_check(targets: Targets, figures: Mapping[str, Any], suffix: str = "") -> dict[str, bool]:
    """Each target against the figure with the given suffix, where that figure exists."""
    meets: dict[str, bool] = {}
    for name, (kind, bound) in targets.items():
        value = figures.get(name + suffix)
        if value is None:
            continue
        meets[name] = value >= bound if kind == "min" else value <= bound
    return meets


def rounded_floats(value: Any, digits: int = 5) -> Any:
    """Floats to a few significant digits, so the report reads without noise digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded_floats(v, digits) for v in value]
    return value


def emit_report(result: dict[str, Any], out: Path, emit: Callable[[str], None]) -> None:
    """Print the JSON report and write the same text to out."""
    text = json.dumps(result, indent=2, sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    emit(text)
    say(f"written to {out}")
