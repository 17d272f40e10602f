"""Raspberry Pi: the PMIC and throttling read through vcgencmd, captured and as a process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefleet.agent.power import (
    PmicReader,
    SensorError,
    VcgencmdThermalReader,
    parse_measure_temp,
    parse_pmic_adc,
    parse_throttled,
)
from tests import power_fixtures as fx


def test_pmic_parse_sums_volts_times_amps() -> None:
    rails = parse_pmic_adc(fx.PI5_PMIC_ADC)
    assert set(rails) == set(fx.PI5_PMIC_RAILS)
    for rail, (amps, volts) in fx.PI5_PMIC_RAILS.items():
        assert rails[rail] == pytest.approx(amps * volts)
    assert "EXT5V" not in rails  # an input voltage with no current


def test_pmic_reader_on_pi5_and_pi4() -> None:
    runner = fx.pi5_vcgencmd()
    reader = PmicReader(runner)
    expected = sum(a * v for a, v in fx.PI5_PMIC_RAILS.values())
    assert reader.sample().power_w == pytest.approx(expected)
    assert runner.calls == [("pmic_read_adc",)]
    assert "omits 5 V loads" in reader.describe()
    probe = PmicReader(fx.pi4_vcgencmd()).probe()
    assert not probe.ok
    assert "vcgencmd pmic_read_adc: error=1" in probe.reason
    missing = PmicReader(fx.no_vcgencmd()).probe()
    assert not missing.ok
    assert "vcgencmd: not installed" in missing.reason


def test_pmic_garbage_output_is_an_error_not_an_exception() -> None:
    sample = PmicReader(fx.FakeVcgencmd({"pmic_read_adc": "hello"})).sample()
    assert sample.error == "vcgencmd pmic_read_adc: no rail with both current and voltage"


def test_runner_os_errors_become_sensor_errors() -> None:
    sample = PmicReader(fx.FakeVcgencmd({"pmic_read_adc": OSError("boom")})).sample()
    assert sample.error == "vcgencmd pmic_read_adc: boom"


@pytest.mark.parametrize(
    ("text", "throttled", "now", "since_boot"),
    [
        (fx.THROTTLED_OK, False, (), ()),
        (
            fx.THROTTLED_UNDER_VOLTAGE,
            True,
            ("under_voltage", "throttled"),
            ("under_voltage", "throttled"),
        ),
        (fx.THROTTLED_SOFT_TEMP, True, ("soft_temperature_limit",), ("soft_temperature_limit",)),
        ("throttled=0x50000", False, (), ("under_voltage", "throttled")),
    ],
)
def test_get_throttled_bits(
    text: str, throttled: bool, now: tuple[str, ...], since_boot: tuple[str, ...]
) -> None:
    decoded = parse_throttled(text)
    assert decoded.throttled is throttled
    assert decoded.now == now
    assert decoded.since_boot == since_boot


def test_measure_temp_and_bad_outputs() -> None:
    assert parse_measure_temp(fx.MEASURE_TEMP) == pytest.approx(48.3)
    assert parse_measure_temp("temp=-5.0'C") == pytest.approx(-5.0)
    with pytest.raises(SensorError, match="measure_temp: unexpected output"):
        parse_measure_temp("temp=hot")
    with pytest.raises(SensorError, match="get_throttled: unexpected output"):
        parse_throttled("throttled=")


def test_vcgencmd_thermal_reader() -> None:
    reading = VcgencmdThermalReader(fx.pi5_vcgencmd(fx.THROTTLED_UNDER_VOLTAGE)).sample()
    assert reading.temperature_c == pytest.approx(48.3)
    assert reading.throttled is True
    assert reading.flags == (
        "under_voltage",
        "throttled",
        "under_voltage_since_boot",
        "throttled_since_boot",
    )


# The real vcgencmd runner, against scripts on PATH.


def _fake_binary(directory: Path, script: str) -> None:
    directory.mkdir(exist_ok=True)
    binary = directory / "vcgencmd"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)


def test_run_vcgencmd_through_a_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    (tmp_path / "pmic.txt").write_text(fx.PI5_PMIC_ADC)
    _fake_binary(bin_dir, f'[ "$1" = pmic_read_adc ] && exec cat {tmp_path / "pmic.txt"}\nexit 2')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    expected = sum(a * v for a, v in fx.PI5_PMIC_RAILS.values())
    assert PmicReader().sample().power_w == pytest.approx(expected)
    failed = VcgencmdThermalReader().sample()
    assert failed.error == "vcgencmd get_throttled: exit status 2"


def test_run_vcgencmd_missing_or_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system_path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert run_vcgencmd_error() == "vcgencmd: not installed (not a Raspberry Pi?)"
    bin_dir = tmp_path / "bin"
    _fake_binary(bin_dir, "exec sleep 5")  # a firmware call that hangs: the timeout must end it
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{system_path}")
    monkeypatch.setattr("edgefleet.agent.power.raspberrypi.VCGENCMD_TIMEOUT_S", 0.2)
    assert run_vcgencmd_error() == "vcgencmd pmic_read_adc: no answer within 0.2 s"


def run_vcgencmd_error() -> str | None:
    return PmicReader().sample().error
