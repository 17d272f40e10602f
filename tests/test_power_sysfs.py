"""Power readers on fake sysfs trees: RAPL, hwmon, and the Jetson INA3221 rails."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.power import (
    HwmonReader,
    JetsonReader,
    PowerMeter,
    RaplReader,
)
from tests import power_fixtures as fx


class Clock:
    """A settable monotonic clock."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rapl_sums_packages_only(tmp_path: Path) -> None:
    fx.rapl(tmp_path, [1_000_000, 5_000_000], psys=9_000_000)
    clock = Clock()
    reader = RaplReader(tmp_path, clock=clock)
    meter = PowerMeter(reader.name)
    meter.add(reader.sample())
    # Package 0 uses 12 J and package 1 8 J in 10 s: 2 W. psys and subzones are not added.
    fx.set_rapl(tmp_path, 0, 13_000_000)
    fx.set_rapl(tmp_path, 1, 13_000_000)
    fx.set_rapl(tmp_path, 2, 99_000_000)
    clock.now += 10.0
    meter.add(reader.sample())
    window = meter.close(frames=500, window_s=10.0)
    assert window.power_w == pytest.approx(2.0)
    assert window.energy_per_frame_mj == pytest.approx(40.0)
    assert "package-0, package-1" in reader.describe()
    assert "psys" not in reader.describe()


def test_rapl_wraps_at_max_energy_range(tmp_path: Path) -> None:
    fx.rapl(tmp_path, [900], wrap=1000)
    reader = RaplReader(tmp_path)
    assert reader.sample().energy_j == 0.0
    fx.set_rapl(tmp_path, 0, 100)
    sample = reader.sample()
    assert sample.error is None
    assert sample.energy_j == pytest.approx(200e-6)


def test_rapl_unreadable_counter_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    fx.rapl(tmp_path, [1000])
    # Tests run as root, where chmod 000 does not stop a read: make the file unreadable instead.
    counter = tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj"
    counter.unlink()
    counter.mkdir()
    probe = RaplReader(tmp_path).probe()
    assert not probe.ok
    assert "intel-rapl:0/energy_uj" in probe.reason


def test_rapl_permission_error_names_the_cause(tmp_path: Path) -> None:
    fx.rapl(tmp_path, [1000])

    def root_only(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text().strip()

    probe = RaplReader(tmp_path, read=root_only).probe()
    assert not probe.ok
    assert "intel-rapl:0/energy_uj" in probe.reason
    assert "root-only since Linux 5.10" in probe.reason


def test_rapl_absent_and_malformed(tmp_path: Path) -> None:
    missing = RaplReader(tmp_path).probe()
    assert not missing.ok
    assert "powercap" in missing.reason
    fx.rapl(tmp_path, [1000])
    fx.set_rapl(tmp_path, 0, 0)
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("garbage\n")
    sample = RaplReader(tmp_path).sample()
    assert sample.energy_j is None
    assert sample.error is not None
    assert "intel-rapl:0/energy_uj: not a number: 'garbage'" in sample.error


def test_hwmon_power_in_microwatts(tmp_path: Path) -> None:
    fx.hwmon_chip(tmp_path, 0, "acpitz", {"temp1_input": "27800"})
    fx.hwmon_chip(tmp_path, 1, "amdgpu", {"power1_average": "15000000"})
    fx.hwmon_chip(tmp_path, 2, "ina226", {"power1_input": "3250000", "in1_input": "5000"})
    reader = HwmonReader(tmp_path)
    sample = reader.sample()
    assert sample.power_w == pytest.approx(3.25)
    assert sample.energy_j is None
    assert "ina226" in reader.describe()


def test_hwmon_energy_counter_and_chip_choice(tmp_path: Path) -> None:
    fx.hwmon_chip(tmp_path, 3, "ina226", {"power1_input": "3250000"})
    fx.hwmon_chip(tmp_path, 10, "power_meter", {"energy1_input": "7500000"})
    sample = HwmonReader(tmp_path, chip="power_meter").sample()
    assert sample.energy_j == pytest.approx(7.5)
    assert sample.power_w is None
    # hwmon3 sorts before hwmon10 by number, not by text.
    assert HwmonReader(tmp_path).sample().power_w == pytest.approx(3.25)


def test_hwmon_absent_or_malformed(tmp_path: Path) -> None:
    fx.hwmon_chip(tmp_path, 0, "acpitz", {"temp1_input": "27800"})
    probe = HwmonReader(tmp_path).probe()
    assert not probe.ok
    assert "no hwmon chip" in probe.reason
    fx.hwmon_chip(tmp_path, 1, "ina226", {"power1_input": ""})
    sample = HwmonReader(tmp_path).sample()
    assert sample.error is not None
    assert "hwmon1/power1_input: not a number" in sample.error


def test_jetson_jp5_reports_vdd_in(tmp_path: Path) -> None:
    fx.jetson_jp5(tmp_path, fx.ORIN_NANO_RAILS)
    reader = JetsonReader(tmp_path)
    sample = reader.sample()
    assert sample.power_w == pytest.approx(5.072 * 1.208)
    assert [r.label for r in reader.rails] == ["VDD_IN"]
    assert "VDD_IN (1-0040)" in reader.describe()


def test_jetson_jp5_without_vdd_in_sums_connected_rails(tmp_path: Path) -> None:
    # AGX Orin: no input rail on its INA3221s, and unconnected channels labelled NC.
    fx.jetson_jp5(
        tmp_path,
        [("VDD_GPU_SOC", 5000, 1000), ("VDD_CPU_CV", 5000, 600), ("VIN_SYS_5V0", 5000, 400)],
    )
    fx.jetson_jp5(
        tmp_path,
        [("NC", 0, 0), ("VDDQ_VDD2_1V8AO", 5000, 200), ("NC", 0, 0)],
        device="1-0041",
        hwmon="hwmon2",
    )
    reader = JetsonReader(tmp_path)
    assert reader.sample().power_w == pytest.approx(5.0 * 2.2)
    labels = [r.label for r in reader.rails]
    assert labels == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]


def test_jetson_jp4_reads_power_files(tmp_path: Path) -> None:
    fx.jetson_jp4(
        tmp_path,
        {
            "POM_5V_IN": (2743, 5048, 543),
            "POM_5V_GPU": (40, 5040, 8),
            "POM_5V_CPU": (642, 5040, 127),
        },
    )
    reader = JetsonReader(tmp_path)
    assert reader.sample().power_w == pytest.approx(2.743)
    assert [r.label for r in reader.rails] == ["POM_5V_IN"]


def test_jetson_malformed_current_names_the_file(tmp_path: Path) -> None:
    chip = fx.jetson_jp5(tmp_path, fx.ORIN_NANO_RAILS)
    (chip / "curr1_input").write_text("abc\n")
    sample = JetsonReader(tmp_path).sample()
    assert sample.power_w is None
    assert sample.error is not None
    assert "hwmon1/curr1_input: not a number: 'abc'" in sample.error


def test_jetson_absent(tmp_path: Path) -> None:
    probe = JetsonReader(tmp_path).probe()
    assert not probe.ok
    assert "no INA3221 rails" in probe.reason
