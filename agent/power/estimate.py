"""Power estimated from CPU load with a per-board profile, for devices without a power sensor."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psutil

from edgefleet.agent.power.base import Clock, PowerReader, SensorError, sysfs
from edgefleet.agent.protocol.messages import PowerSource

# Raspberry Pi and Jetson expose the board name through the device tree; PCs have none.
MODEL_FILES = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")


@dataclass(frozen=True)
class PowerProfile:
    """A board's draw at idle and with every core busy, in watts at its power input."""

    name: str
    idle_w: float
    max_w: float

    def __post_init__(self) -> None:
        if not 0 <= self.idle_w <= self.max_w:
            raise ValueError(
                f"power profile {self.name!r}: need 0 <= idle_w <= max_w, "
                f"got idle_w={self.idle_w}, max_w={self.max_w}"
            )


# Round figures for a bare board (no USB devices, no display) at its input; they make
# trends comparable, not absolute numbers. A fleet that cares sets its own in the config.
PROFILES: dict[str, PowerProfile] = {
    p.name: p
    for p in (
        PowerProfile("raspberry-pi-4", idle_w=2.7, max_w=6.4),
        PowerProfile("raspberry-pi-5", idle_w=2.7, max_w=8.0),
        PowerProfile("jetson-orin-nano", idle_w=5.0, max_w=10.0),
        PowerProfile("generic-x86", idle_w=10.0, max_w=35.0),
    )
}
# Substrings of the device-tree model string, checked in order.
_MODEL_PROFILES = (
    ("raspberry pi 5", "raspberry-pi-5"),
    ("raspberry pi 4", "raspberry-pi-4"),
    ("orin nano", "jetson-orin-nano"),
)
DEFAULT_PROFILE = "generic-x86"


def read_board_model(root: Path | str = "/") -> str | None:
    """The device-tree board name ('Raspberry Pi 5 Model B Rev 1.0'), or None on a PC."""
    for name in MODEL_FILES:
        try:
            raw = sysfs(root, name).read_bytes()
        except OSError:
            continue
        text = raw.rstrip(b"\x00").decode(errors="replace").strip()
        if text:
            return text
    return None


def profile_for_model(model: str | None) -> PowerProfile:
    """The profile matching a board model string; the generic x86 one when none matches."""
    lowered = (model or "").lower()
    for needle, name in _MODEL_PROFILES:
        if needle in lowered:
            return PROFILES[name]
    return PROFILES[DEFAULT_PROFILE]


def estimate_power_w(profile: PowerProfile, cpu_fraction: float) -> float:
    """idle + (max - idle) * load, with the load clamped to 0..1."""
    if not math.isfinite(cpu_fraction):
        raise SensorError("cpu load", f"not a finite fraction: {cpu_fraction!r}")
    load = min(max(cpu_fraction, 0.0), 1.0)
    return profile.idle_w + (profile.max_w - profile.idle_w) * load


def system_cpu_fraction() -> float:
    """Whole-system CPU use since the previous call, 0..1 (psutil averages over all cores)."""
    return float(psutil.cpu_percent(interval=None)) / 100.0


class EstimateReader(PowerReader):
    """A model of power from CPU load: labelled `estimate`, never a measurement."""

    name: ClassVar[PowerSource] = "estimate"

    def __init__(
        self,
        profile: PowerProfile | str | None = None,
        *,
        root: Path | str = "/",
        cpu_fraction: Callable[[], float] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.model = read_board_model(root)
        if profile is None:
            self.profile = profile_for_model(self.model)
        elif isinstance(profile, str):
            if profile not in PROFILES:
                known = ", ".join(sorted(PROFILES))
                raise ValueError(f"unknown power profile {profile!r}; known: {known}")
            self.profile = PROFILES[profile]
        else:
            self.profile = profile
        if cpu_fraction is None:
            # psutil's first interval-less call returns a meaningless 0.0: spend it here.
            system_cpu_fraction()
            cpu_fraction = system_cpu_fraction
        self._cpu_fraction = cpu_fraction

    def describe(self) -> str:
        """The profile and why it was chosen."""
        p = self.profile
        board = f"board {self.model!r}" if self.model else "no device-tree model"
        return f"estimate from CPU load, profile {p.name} ({p.idle_w:g}-{p.max_w:g} W; {board})"

    def read(self) -> tuple[float | None, float | None]:
        """Estimated watts now."""
        return estimate_power_w(self.profile, self._cpu_fraction()), None
