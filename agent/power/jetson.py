"""Jetson INA3221 power monitors: JetPack 5+ hwmon layout and JetPack 4 iio layout."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
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

I2C_DEVICES = "/sys/bus/i2c/devices"
# The module's input rail: the whole board's draw. Nano (JetPack 4) names it POM_5V_IN.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
# Orin boards label unconnected channels "NC"; in7 is the driver's sum of shunt voltages.
_SKIPPED_LABELS = frozenset({"NC", "sum of shunt voltages"})


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: either a power file (mW) or a voltage (mV) and current (mA) pair."""

    label: str
    device: str
    power_mw: Path | None = None
    volt_mv: Path | None = None
    curr_ma: Path | None = None


def _channel(name: str, pattern: str) -> int | None:
    match = re.fullmatch(pattern, name)
    return int(match.group(1)) if match else None


def find_rails(root: Path | str = "/", read: ReadText = read_text) -> list[Rail]:
    """Every labelled INA3221 rail under /sys/bus/i2c/devices, in path order."""
    rails: list[Rail] = []
    for device in sorted(sysfs(root, I2C_DEVICES).glob("*")):
        try:
            chip = read(device / "name")
        except OSError:
            continue
        # JetPack 5 binds the mainline "ina3221" driver, JetPack 4 NVIDIA's "ina3221x".
        if "ina3221" not in chip:
            continue
        for hwmon in sorted(device.glob("hwmon/hwmon*")):
            for label_file in sorted(hwmon.glob("in*_label")):
                n = _channel(label_file.name, r"in(\d+)_label")
                if n is None:
                    continue
                curr = hwmon / f"curr{n}_input"
                label = _label(label_file, read)
                if label in _SKIPPED_LABELS or not curr.exists():
                    continue
                rails.append(Rail(label, device.name, volt_mv=hwmon / f"in{n}_input", curr_ma=curr))
        for iio in sorted(device.glob("iio:device*")):
            for label_file in sorted(iio.glob("rail_name_*")):
                n = _channel(label_file.name, r"rail_name_(\d+)")
                if n is None:
                    continue
                power = iio / f"in_power{n}_input"
                label = _label(label_file, read)
                if label in _SKIPPED_LABELS or not power.exists():
                    continue
                rails.append(Rail(label, device.name, power_mw=power))
    return rails


def _label(path: Path, read: ReadText) -> str:
    try:
        return read(path)
    except OSError:
        return "NC"


def rail_power_w(rail: Rail, read: ReadText = read_text) -> float:
    """Watts on one rail: the power file, or volts times amps."""
    if rail.power_mw is not None:
        return read_number(rail.power_mw, read) / 1000.0
    if rail.volt_mv is None or rail.curr_ma is None:
        raise SensorError(rail.label, "rail has neither power nor voltage and current files")
    return read_number(rail.volt_mv, read) * read_number(rail.curr_ma, read) / 1e6


class JetsonReader(PowerReader):
    """Board power from the INA3221 VDD_IN rail; the sum of all rails where there is none."""

    name: ClassVar[PowerSource] = "ina3221"

    def __init__(
        self, root: Path | str = "/", *, read: ReadText = read_text, clock: Clock = time.monotonic
    ) -> None:
        super().__init__(clock)
        self._root = root
        self._read_text = read
        self._rails: list[Rail] = []

    @property
    def rails(self) -> list[Rail]:
        """The rails whose power is reported (one when the board has VDD_IN)."""
        return list(self._rails)

    def describe(self) -> str:
        """Which rails are read."""
        names = " + ".join(f"{r.label} ({r.device})" for r in self._rails) or "no rails yet"
        return f"INA3221 {names}"

    def _discover(self) -> list[Rail]:
        rails = find_rails(self._root, self._read_text)
        if not rails:
            raise SensorError(sysfs(self._root, I2C_DEVICES), "no INA3221 rails")
        total = [r for r in rails if r.label in TOTAL_RAILS]
        # AGX Orin has no input rail on its INA3221s; the sum of its rails is the best there is.
        return total[:1] or rails

    def read(self) -> tuple[float | None, float | None]:
        """Watts now on the chosen rails."""
        if not self._rails:
            self._rails = self._discover()
        # The INA3221 reads a small negative current on an idle rail; it is noise, not a source.
        return sum(max(0.0, rail_power_w(r, self._read_text)) for r in self._rails), None
