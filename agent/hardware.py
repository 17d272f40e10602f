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
    machine = platform.machine() or "unknown"
    board = board_model()
    return Hardware(
        machine=machine,
        system=platform.system() or "unknown",
        cpu_count=os.cpu_count() or 1,
        ram_mb=round(psutil.virtual_memory().total / 2**20, 1),
        accelerators=providers,
        device_model=board,
        device_class=classify_device(machine, board, _cpuinfo(_CPUINFO))[:64],
    )


def _cpuinfo(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first 'flags' (x86) or 'Features' (ARM) line of /proc/cpuinfo, as a set."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:48]


def classify_device(machine: str, board: str | None, cpuinfo: str = "") -> str:
    """The device class a bundle's latency expectation is keyed by (pure: unit-testable).

    rpi5, rpi4, jetson-orin-nano, jetson-<model>, x86-avx512, x86-avx2, x86, or the machine
    name (aarch64, armv7l...) when nothing more specific is known. Devices of one class run a
    given INT8 model at about the same speed, which is what the health check needs.
    """
    board_l = (board or "").lower()
    if board_l.startswith("raspberry pi"):
        rest = board_l.removeprefix("raspberry pi").split()
        if rest and rest[0].isdigit():
            return f"rpi{rest[0]}"
        return "rpi"
    if "jetson" in board_l:
        model = board_l.split("jetson", 1)[1]
        # 'NVIDIA Jetson Orin Nano Developer Kit' -> jetson-orin-nano
        model = model.replace("developer kit", "").replace("engineering reference", "")
        slug = _slug(model)
        return f"jetson-{slug}" if slug else "jetson"
    arch = machine.lower()
    if arch in ("x86_64", "amd64", "i686", "i386", "x86"):
        flags = cpu_flags(cpuinfo)
        if "avx512f" in flags:
            return "x86-avx512"
        if "avx2" in flags:
            return "x86-avx2"
        return "x86"
    return arch or "unknown"


def device_class(hw: Hardware | None = None, cpuinfo_path: Path = _CPUINFO) -> str:
    """This device's class (see classify_device), from its Hardware description."""
    hw = hw if hw is not None else describe()
    return classify_device(hw.machine, hw.device_model, _cpuinfo(cpuinfo_path))
