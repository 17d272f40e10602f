"""Choosing the power reader (auto or forced), the CPU-load estimate, and sample() never raising."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import ClassVar

import pytest

from edgefleet.agent.power import (
    EstimateReader,
    HwmonReader,
    JetsonReader,
    NoPowerReader,
    NoTemperatureReader,
    PmicReader,
    PowerProfile,
    PowerReader,
    PowerSample,
    RaplReader,
    detect,
    profile_for_model,
)
from edgefleet.agent.power.estimate import estimate_power_w
from edgefleet.agent.protocol.messages import PowerSource
from tests import power_fixtures as fx


@pytest.mark.parametrize(
    ("model", "profile"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", "raspberry-pi-5"),
        ("Raspberry Pi 4 Model B Rev 1.4", "raspberry-pi-4"),
        ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
        (None, "generic-x86"),
        ("Some Other Board", "generic-x86"),
    ],
)
def test_profile_from_model(model: str | None, profile: str) -> None:
    assert profile_for_model(model).name == profile


def test_estimate_reader_uses_the_board_model(tmp_path: Path) -> None:
    fx.board_model(tmp_path, "Raspberry Pi 5 Model B Rev 1.0")
    reader = EstimateReader(root=tmp_path, cpu_fraction=lambda: 0.5)
    assert reader.name == "estimate"
    assert reader.profile.name == "raspberry-pi-5"
    p = reader.profile
    assert reader.sample().power_w == pytest.approx(p.idle_w + 0.5 * (p.max_w - p.idle_w))
    assert "Raspberry Pi 5 Model B Rev 1.0" in reader.describe()


def test_estimate_formula_clamps_and_config_profiles(tmp_path: Path) -> None:
    profile = PowerProfile("lab", idle_w=1.0, max_w=5.0)
    assert estimate_power_w(profile, 0.25) == pytest.approx(2.0)
    assert estimate_power_w(profile, 1.7) == pytest.approx(5.0)
    assert estimate_power_w(profile, -0.2) == pytest.approx(1.0)
    configured = EstimateReader("raspberry-pi-4", root=tmp_path, cpu_fraction=lambda: 0.0)
    assert configured.sample().power_w == pytest.approx(2.7)
    custom = EstimateReader(profile, root=tmp_path, cpu_fraction=lambda: 1.0)
    assert custom.sample().power_w == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown power profile 'pi9'"):
        EstimateReader("pi9", root=tmp_path)
    with pytest.raises(ValueError, match="idle_w <= max_w"):
        PowerProfile("bad", idle_w=5.0, max_w=1.0)
    nan = EstimateReader(profile, root=tmp_path, cpu_fraction=lambda: math.nan).sample()
    assert nan.error == "cpu load: not a finite fraction: nan"


def test_estimate_with_psutil_load(tmp_path: Path) -> None:
    watts = EstimateReader("generic-x86", root=tmp_path).sample().power_w
    assert watts is not None
    assert 10.0 <= watts <= 35.0


class _Broken(PowerReader):
    name: ClassVar[PowerSource] = "hwmon"

    def read(self) -> tuple[float | None, float | None]:
        raise RuntimeError("driver returned nonsense")


def test_sample_never_raises() -> None:
    sample = _Broken(clock=lambda: 7.0).sample()
    assert sample == PowerSample(7.0, error="hwmon: RuntimeError: driver returned nonsense")
    off = NoPowerReader().sample()
    assert off.error == "power: no power source configured"
    assert NoTemperatureReader("none here").sample().error == "temperature: none here"


def _everything(root: Path) -> None:
    fx.rapl(root, [1000])
    fx.hwmon_chip(root, 0, "ina226", {"power1_input": "3000000"})
    fx.thermal_zones(root, [("cpu-thermal", "48300")])


def test_detect_prefers_jetson(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _everything(tmp_path)
    fx.jetson_jp5(tmp_path, fx.ORIN_NANO_RAILS)
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.power.detect"):
        reader = detect(tmp_path, fx.pi5_vcgencmd())
    assert isinstance(reader, JetsonReader)
    assert caplog.messages == ["power source ina3221: INA3221 VDD_IN (1-0040)"]


def test_detect_pi5_before_rapl_and_hwmon(tmp_path: Path) -> None:
    _everything(tmp_path)
    assert isinstance(detect(tmp_path, fx.pi5_vcgencmd()), PmicReader)


def test_detect_rapl_then_hwmon(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _everything(tmp_path)
    assert isinstance(detect(tmp_path, fx.pi4_vcgencmd()), RaplReader)
    counter = tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj"
    counter.unlink()
    counter.mkdir()
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.power.detect"):
        assert isinstance(detect(tmp_path, fx.no_vcgencmd()), HwmonReader)
    reasons = "\n".join(caplog.messages)
    assert "power source ina3221 not used: " in reasons
    assert "power source pmic not used: vcgencmd: not installed" in reasons
    assert "power source rapl not used: " in reasons
    assert "intel-rapl:0/energy_uj" in reasons
    assert "power source hwmon: hwmon chip 'ina226'" in reasons


def test_detect_falls_back_to_estimate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fx.board_model(tmp_path, "Raspberry Pi 4 Model B Rev 1.4")
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.power.detect"):
        reader = detect(tmp_path, fx.pi4_vcgencmd(), cpu_fraction=lambda: 0.0)
    assert isinstance(reader, EstimateReader)
    assert reader.profile.name == "raspberry-pi-4"
    assert caplog.messages[-1].startswith("power source estimate: estimate from CPU load")
    assert len(caplog.messages) == 5  # one line per candidate, each with its reason


def test_detect_honours_a_forced_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _everything(tmp_path)
    fx.jetson_jp5(tmp_path, fx.ORIN_NANO_RAILS)
    # The Jetson meter would win on auto; the config asks for the hwmon chip, or the estimate.
    assert isinstance(detect(tmp_path, fx.pi5_vcgencmd(), source="hwmon"), HwmonReader)
    assert isinstance(detect(tmp_path, fx.pi5_vcgencmd(), source="rapl"), RaplReader)
    est = detect(tmp_path, fx.pi5_vcgencmd(), source="estimate", cpu_fraction=lambda: 0.0)
    assert isinstance(est, EstimateReader)
    # Forced but not readable here: a warning with the reason, and the estimate stands in.
    with caplog.at_level(logging.INFO, logger="edgefleet.agent.power.detect"):
        reader = detect(tmp_path, fx.no_vcgencmd(), source="pmic", cpu_fraction=lambda: 0.0)
    assert isinstance(reader, EstimateReader)
    assert any(
        r.levelno == logging.WARNING
        and "power source pmic (power.source) does not read here: vcgencmd" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(ValueError, match="power source 'solar' unknown"):
        detect(tmp_path, fx.no_vcgencmd(), source="solar")
