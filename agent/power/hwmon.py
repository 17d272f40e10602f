"""Generic hwmon power (microwatts) and energy (microjoules) sensors."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import ClassVar

from edgefleet.agent.power.base import (
    Clock,
    PowerReader,
    ReadText,
    SensorError,
    read_number,
    read_text,
    sysfs,
)
from edgefleet.agent.protocol.messages import PowerSource

HWMON = "/sys/class/hwmon"
# Preference order: an energy counter integrates exactly, power1_input is instantaneous,
# power1_average is what some meters (ACPI power_meter) expose instead.
_ATTRIBUTES = ("energy1_input", "power1_input", "power1_average")
# These chips measure one component, not the device: reporting a GPU's watts as the
# device's power would mislead. The Jetson INA3221 has its own reader.
_NOT_DEVICE_POWER = frozenset({"amdgpu", "radeon", "nouveau", "ina3221"})


def _hwmon_number(path: Path) -> int:
    match = re.fullmatch(r"hwmon(\d+)", path.name)
    return int(match.group(1)) if match else -1


class HwmonReader(PowerReader):
    """The first hwmon chip with a power or energy attribute, or the chip named in the config."""

    name: ClassVar[PowerSource] = "hwmon"

    def __init__(
        self,
        root: Path | str = "/",
        *,
        chip: str | None = None,
        read: ReadText = read_text,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self._dir = sysfs(root, HWMON)
        self._chip = chip
        self._read_text = read
        self._found: tuple[str, Path] | None = None

    def describe(self) -> str:
        """Which chip and attribute are read."""
        if self._found is None:
            return f"hwmon under {self._dir}"
        chip, path = self._found
        return f"hwmon chip {chip!r}: {path}"

    def _discover(self) -> tuple[str, Path]:
        try:
            chips = sorted(self._dir.glob("hwmon*"), key=_hwmon_number)
        except OSError as exc:
            raise SensorError(self._dir, exc.strerror or "cannot list") from None
        for chip in chips:
            try:
                name = self._read_text(chip / "name")
            except OSError:
                continue
            if self._chip is not None and name != self._chip:
                continue
            if self._chip is None and name in _NOT_DEVICE_POWER:
                continue
            for attribute in _ATTRIBUTES:
                if (chip / attribute).is_file():
                    return name, chip / attribute
        wanted = f"chip {self._chip!r}" if self._chip else "chip"
        raise SensorError(self._dir, f"no hwmon {wanted} with {', '.join(_ATTRIBUTES)}")

    def read(self) -> tuple[float | None, float | None]:
        """Watts from power*, or cumulative joules from energy1_input."""
        if self._found is None:
            self._found = self._discover()
        _, path = self._found
        value = read_number(path, self._read_text)
        if value < 0:
            raise SensorError(path, f"negative reading {value:g}")
        if path.name.startswith("energy"):
            return None, value / 1e6
        return value / 1e6, None
