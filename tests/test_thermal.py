"""Temperature and throttling readers: thermal zones, cooling devices, psutil, detection."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest

from edgefleet.agent.power import (
    NoTemperatureReader,
    PsutilTemperatureReader,
    ThermalReading,
    ThermalZoneReader,
    VcgencmdThermalReader,
    detect_temperature,
)
from tests import power_fixtures as fx


def test_thermal_zone_chosen_by_type(tmp_path: Path) -> None:
    fx.thermal_zones(tmp_path, [("acpitz", "27800"), ("x86_pkg_temp", "51000")])
    reader = ThermalZoneReader(tmp_path)
    assert reader.sample().temperature_c == pytest.approx(51.0)
    assert "thermal_zone1 (x86_pkg_temp)" in reader.describe()


def test_thermal_zone_jetson_type_and_fallback_to_max(tmp_path: Path) -> None:
    fx.thermal_zones(tmp_path, [("GPU-therm", "45500"), ("CPU-therm", "47250")])
    assert ThermalZoneReader(tmp_path).sample().temperature_c == pytest.approx(47.25)
    other = tmp_path / "other"
    # No CPU type: the hottest plausible zone, ignoring PMIC-Die (fixed 100 C) and an offline
    # sensor (-256 C).
    fx.thermal_zones(
        other,
        [("AO-therm", "41000"), ("PMIC-Die", "100000"), ("Tdiode", "-256000"), ("Tboard", "44000")],
    )
    assert ThermalZoneReader(other).sample().temperature_c == pytest.approx(44.0)


def test_thermal_zone_malformed_and_absent(tmp_path: Path) -> None:
    fx.thermal_zones(tmp_path, [("cpu-thermal", "warm")])
    reading = ThermalZoneReader(tmp_path).sample()
    assert reading.temperature_c is None
    assert reading.error is not None
    assert "thermal_zone0/temp: not a number: 'warm'" in reading.error
    assert not ThermalZoneReader(tmp_path / "empty").probe().ok


class _Temp(NamedTuple):
    label: str
    current: float
    high: float | None
    critical: float | None


def test_psutil_fallback() -> None:
    sensors = {
        "nvme": [_Temp("Composite", 38.9, 84.8, 84.8)],
        "coretemp": [_Temp("Package id 0", 55.0, 100.0, 100.0), _Temp("Core 0", 53.0, 100, 100)],
    }
    assert PsutilTemperatureReader(lambda: sensors).sample().temperature_c == pytest.approx(55.0)
    others = {"nvme": [_Temp("Composite", 38.9, None, None)], "acpitz": [_Temp("", 60.0, 0, 0)]}
    assert PsutilTemperatureReader(lambda: others).sample().temperature_c == pytest.approx(60.0)
    assert not PsutilTemperatureReader(dict).probe().ok


def test_throttling_from_cooling_devices_on_x86_and_jetson(tmp_path: Path) -> None:
    """The kernel's cooling devices: cur_state > 0 on a CPU-slowing one means throttled."""
    fx.thermal_zones(tmp_path, [("x86_pkg_temp", "91000")])
    reader = ThermalZoneReader(tmp_path)
    assert reader.sample().throttled is None  # "Processor" has no cur_state here: unknown
    fx.write(tmp_path, "/sys/class/thermal/cooling_device0/cur_state", "0")
    fx.write(tmp_path, "/sys/class/thermal/cooling_device1/type", "thermal-cpufreq-0")
    fx.write(tmp_path, "/sys/class/thermal/cooling_device1/cur_state", "0")
    fx.write(tmp_path, "/sys/class/thermal/cooling_device2/type", "pwm-fan")
    fx.write(tmp_path, "/sys/class/thermal/cooling_device2/cur_state", "3")  # a fan: no
    reader = ThermalZoneReader(tmp_path)
    calm = reader.sample()
    assert calm.temperature_c == pytest.approx(91.0) and calm.throttled is False
    fx.write(tmp_path, "/sys/class/thermal/cooling_device1/cur_state", "2")
    hot = reader.sample()
    assert hot.throttled is True and hot.flags == ("thermal-cpufreq-0=2",)


def test_detect_temperature_on_pi_uses_zone_and_throttling(tmp_path: Path) -> None:
    fx.thermal_zones(tmp_path, [("cpu-thermal", "51200")])
    runner = fx.pi5_vcgencmd(fx.THROTTLED_SOFT_TEMP)
    reader = detect_temperature(tmp_path, runner)
    assert isinstance(reader, VcgencmdThermalReader)
    reading = reader.sample()
    assert reading.temperature_c == pytest.approx(51.2)
    assert reading.throttled is True
    assert ("measure_temp",) not in runner.calls  # the zone file is cheaper than a process


def test_detect_temperature_elsewhere(tmp_path: Path) -> None:
    fx.thermal_zones(tmp_path, [("x86_pkg_temp", "61000")])
    zone = detect_temperature(tmp_path, fx.no_vcgencmd())
    assert isinstance(zone, ThermalZoneReader)
    assert zone.sample() == ThermalReading(61.0)
    empty = tmp_path / "empty"
    pi_without_zones = detect_temperature(empty, fx.pi4_vcgencmd())
    assert pi_without_zones.sample().temperature_c == pytest.approx(48.3)
    sensors: dict[str, list[Any]] = {"k10temp": [_Temp("Tctl", 66.0, None, None)]}
    fallback = detect_temperature(empty, fx.no_vcgencmd(), sensors=lambda: sensors)
    assert isinstance(fallback, PsutilTemperatureReader)
    nothing = detect_temperature(empty, fx.no_vcgencmd(), sensors=dict)
    assert isinstance(nothing, NoTemperatureReader)
    assert nothing.sample().temperature_c is None
