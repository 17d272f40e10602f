"""What this device is: architecture, cores, memory, board model, accelerators."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort
import psutil

from edgefleet.agent.protocol import Hardware

# Raspberry Pi and Jetson expose the board name through the device tree.
_MODEL_FILES = (Path("/proc/device-tree/model"), Path("/sys/firmware/devicetree/base/model"))
_ACCELERATED = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "OpenVINOExecutionProvider")


def board_model(files: tuple[Path, ...] = _MODEL_FILES) -> str | None:
    """The board name ('Raspberry Pi 5 Model B Rev 1.0'), or None on a PC."""
    for path in files:
        try:
            text = path.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
        except OSError:
            continue
        if text:
            return text[:128]
    return None


def describe() -> Hardware:
    """Hardware description for the birth message."""
    providers = [p for p in ort.get_available_providers() if p in _ACCELERATED]
    return Hardware(
        machine=platform.machine() or "unknown",
        system=platform.system() or "unknown",
        cpu_count=os.cpu_count() or 1,
        ram_mb=round(psutil.virtual_memory().total / 2**20, 1),
        accelerators=providers,
        device_model=board_model(),
    )
