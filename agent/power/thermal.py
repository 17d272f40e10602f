"""SoC temperature from /sys/class/thermal zones, with psutil as a fallback."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from edgefleet.agent.power.base import Probe, ReadText, SensorError, read_number, read_text, sysfs

THERMAL = "/sys/class/thermal"
# The CPU/SoC zone's `type` on a Raspberry Pi, x86, Jetson and Rockchip boards.
CPU_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "x86_pkg_temp", "CPU-therm", "soc_thermal")
# psutil names of the CPU's own sensor on x86 (Intel, AMD) and on ARM boards.
CPU_SENSOR_CHIPS = ("coretemp", "k10temp", "cpu_thermal", "cpu-thermal", "soc_thermal")
# Cooling devices that act by slowing the CPU (or GPU) down, by their `type`, lower case:
# cpufreq cooling on ARM boards ("thermal-cpufreq-0", "cpufreq-cpu0"), ACPI processor
# throttling on x86 ("Processor"), Intel's idle injection ("intel_powerclamp"), Tegra's
# throttle devices ("cpu-throttle", "gpu-throttle"). Fans are not throttling.
THROTTLE_COOLING_TYPES = ("cpufreq", "processor", "throttle", "powerclamp")
# Telemetry accepts -100..200 °C; Jetson reports -256 °C for an offline sensor.
_PLAUSIBLE_C = (-100.0, 200.0)

Sensors = Callable[[], Mapping[str, Sequence[Any]]]


@dataclass(frozen=True)
class ThermalReading:
    """Temperature and, where the firmware tells, throttling; or why there is none."""

    temperature_c: float | None
    throttled: bool | None = None
    flags: tuple[str, ...] = ()
    error: str | None = None


class TemperatureReader(ABC):
    """A source of the SoC temperature."""

    @abstractmethod
    def read(self) -> ThermalReading:
        """One reading; raises SensorError when it cannot."""

    def describe(self) -> str:
        """What this reader measures, for the log."""
        return type(self).__name__

    def sample(self) -> ThermalReading:
        """One reading; never raises, an error is carried in the reading."""
        try:
            return self.read()
        except SensorError as exc:
            return ThermalReading(None, error=str(exc))
        except Exception as exc:
            # An unforeseen file format must cost one reading, never the agent's main loop.
            return ThermalReading(None, error=f"{self.describe()}: {type(exc).__name__}: {exc}")

    def probe(self) -> Probe:
        """Read once to find out whether this source works here."""
        reading = self.sample()
        if reading.error is not None:
            return Probe(False, reading.error)
        return Probe(True, self.describe())


class NoTemperatureReader(TemperatureReader):
    """No sensor found; every reading says why."""

    def __init__(self, reason: str = "no temperature sensor") -> None:
        self.reason = reason

    def read(self) -> ThermalReading:
        """Always fails with the reason."""
        raise SensorError("temperature", self.reason)


def _plausible(celsius: float) -> bool:
    return _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]


def _zone_number(path: Path) -> int:
    match = re.fullmatch(r"thermal_zone(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _device_number(path: Path) -> int:
    match = re.fullmatch(r"cooling_device(\d+)", path.name)
    return int(match.group(1)) if match else -1


class ThermalZoneReader(TemperatureReader):
    """The CPU thermal zone chosen by its type; else the hottest plausible zone."""

    def __init__(
        self,
        root: Path | str = "/",
        *,
        cpu_types: Sequence[str] = CPU_ZONE_TYPES,
        read: ReadText = read_text,
    ) -> None:
        self._dir = sysfs(root, THERMAL)
        self._cpu_types = [t.lower() for t in cpu_types]
        self._read_text = read
        self._zones: list[tuple[str, Path]] | None = None
        self._cpu: tuple[str, Path] | None = None
        self._cooling: list[tuple[str, Path]] = []

    def describe(self) -> str:
        """Which zone is read."""
        if self._cpu is not None:
            return f"{self._cpu[1].parent.name} ({self._cpu[0]})"
        return f"hottest thermal zone under {self._dir}"

    def _discover(self) -> list[tuple[str, Path]]:
        zones = []
        for zone in sorted(self._dir.glob("thermal_zone*"), key=_zone_number):
            try:
                kind = self._read_text(zone / "type")
            except OSError:
                kind = zone.name
            # Tegra's PMIC-Die zone reports a fixed 100 °C and would always win the max.
            if "pmic" in kind.lower():
                continue
            zones.append((kind, zone / "temp"))
        if not zones:
            raise SensorError(self._dir, "no thermal zones")
        for device in sorted(self._dir.glob("cooling_device*"), key=_device_number):
            try:
                kind = self._read_text(device / "type")
            except OSError:
                continue
            if any(t in kind.lower() for t in THROTTLE_COOLING_TYPES):
                self._cooling.append((kind, device / "cur_state"))
        by_type = {kind.lower(): (kind, path) for kind, path in zones}
        for wanted in self._cpu_types:
            if wanted in by_type:
                self._cpu = by_type[wanted]
                break
        return zones

    def throttling(self) -> tuple[bool | None, tuple[str, ...]]:
        """Whether a throttling cooling device is engaged, and which (None: none to ask).

        The kernel's thermal framework slows the CPU through these devices when a zone
        passes a trip point: cur_state > 0 means it is doing so now. This is how x86
        gateways and Jetsons report throttling; a Pi's firmware says it via vcgencmd.
        """
        if self._zones is None:
            self._zones = self._discover()
        engaged: list[str] = []
        known = 0
        for kind, path in self._cooling:
            try:
                state = read_number(path, self._read_text)
            except SensorError:
                continue
            known += 1
            if state > 0:
                engaged.append(f"{kind}={state:g}")
        return (bool(engaged) if known else None), tuple(engaged)

    def read(self) -> ThermalReading:
        """Degrees Celsius from millidegrees, and throttling from the cooling devices."""
        if self._zones is None:
            self._zones = self._discover()
        throttled, flags = self.throttling()
        if self._cpu is not None:
            celsius = read_number(self._cpu[1], self._read_text) / 1000.0
            if not _plausible(celsius):
                raise SensorError(self._cpu[1], f"implausible temperature {celsius:g} C")
            return ThermalReading(celsius, throttled, flags)
        readings = []
        errors = []
        for _, path in self._zones:
            try:
                celsius = read_number(path, self._read_text) / 1000.0
            except SensorError as exc:
                errors.append(str(exc))
                continue
            if _plausible(celsius):
                readings.append(celsius)
        if not readings:
            raise SensorError(self._dir, "; ".join(errors) or "no plausible zone temperature")
        return ThermalReading(max(readings), throttled, flags)


def _psutil_sensors() -> Mapping[str, Sequence[Any]]:
    # Only Linux and FreeBSD builds of psutil have sensors_temperatures.
    sensors: Callable[[], Mapping[str, Sequence[Any]]] | None = getattr(
        psutil, "sensors_temperatures", None
    )
    return sensors() if sensors is not None else {}


class PsutilTemperatureReader(TemperatureReader):
    """psutil.sensors_temperatures(): the CPU chip if known, else the hottest sensor."""

    def __init__(self, sensors: Sensors = _psutil_sensors) -> None:
        self._sensors = sensors

    def describe(self) -> str:
        """Names the source."""
        return "psutil.sensors_temperatures()"

    def read(self) -> ThermalReading:
        """Degrees Celsius of the CPU sensor."""
        chips = self._sensors()
        for chip in CPU_SENSOR_CHIPS:
            values = [float(e.current) for e in chips.get(chip, ()) if _plausible(float(e.current))]
            if values:
                # coretemp lists the package first, then each core; the package is the SoC.
                return ThermalReading(values[0])
        every = [float(e.current) for entries in chips.values() for e in entries]
        plausible = [c for c in every if _plausible(c)]
        if not plausible:
            raise SensorError("psutil.sensors_temperatures()", "no temperature sensors")
        return ThermalReading(max(plausible))
