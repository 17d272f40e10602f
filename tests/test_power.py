"""Power, energy and temperature readers against fake sysfs trees and captured vcgencmd output."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pytest

from edgefleet.agent.power import (
    EstimateReader,
    HwmonReader,
    JetsonReader,
    NoPowerReader,
    NoTemperatureReader,
    PmicReader,
    PowerMeter,
    PowerProfile,
    PowerReader,
    PowerSample,
    PsutilTemperatureReader,
    RaplReader,
    SensorError,
    ThermalReading,
    ThermalZoneReader,
    VcgencmdThermalReader,
    counter_delta,
    detect,
    detect_temperature,
    energy_per_frame_mj,
    parse_measure_temp,
    parse_pmic_adc,
    parse_throttled,
    profile_for_model,
    trapezoid_energy_j,
    window_power,
)
from edgefleet.agent.power.estimate import estimate_power_w
from edgefleet.agent.protocol.messages import PowerSource
from tests import power_fixtures as fx


class Clock:
    """A settable monotonic clock."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- pure numerics -------------------------------------------------------------------------


def test_counter_delta_plain_wrap_and_reset() -> None:
    assert counter_delta(100.0, 350.0, 1000.0) == 250.0
    assert counter_delta(900.0, 100.0, 1000.0) == 200.0  # wrapped at max_energy_range_uj
    assert counter_delta(900.0, 100.0, None) is None  # went back with no known range
    assert counter_delta(2000.0, 100.0, 1000.0) is None  # impossible under that range


def test_trapezoid_integrates_constant_and_ramp() -> None:
    assert trapezoid_energy_j([(float(t), 2.0) for t in range(11)]) == pytest.approx(20.0)
    # 0 W to 4 W over 2 s is a triangle of 4 J.
    assert trapezoid_energy_j([(0.0, 0.0), (1.0, 2.0), (2.0, 4.0)]) == pytest.approx(4.0)
    assert trapezoid_energy_j([(0.0, 5.0)]) == 0.0


def test_energy_per_frame_two_watts_ten_seconds_500_frames_is_40_mj() -> None:
    assert energy_per_frame_mj(2.0, 10.0, 500) == pytest.approx(40.0)
    assert energy_per_frame_mj(2.0, 10.0, 0) is None
    assert energy_per_frame_mj(None, 10.0, 500) is None
    assert energy_per_frame_mj(2.0, 0.0, 500) is None


def test_window_power_prefers_counters_and_falls_back_to_power() -> None:
    counters = [PowerSample(float(t), energy_j=2.0 * t) for t in range(11)]
    assert window_power(counters) == pytest.approx((2.0, 20.0, 10.0))
    powers = [PowerSample(float(t), power_w=2.0) for t in range(11)]
    assert window_power(powers) == pytest.approx((2.0, 20.0, 10.0))
    # A counter that went back (driver reset) is ignored in favour of the power samples.
    reset = [PowerSample(0.0, 3.0, 50.0), PowerSample(10.0, 3.0, 1.0)]
    assert window_power(reset) == pytest.approx((3.0, 30.0, 10.0))
    assert window_power([PowerSample(5.0, power_w=4.0)]) == (4.0, None, 0.0)
    assert window_power([PowerSample(5.0, error="x")]) == (None, None, 0.0)


def test_meter_from_counters_gives_40_mj_per_frame() -> None:
    meter = PowerMeter("rapl")
    for t in range(11):
        meter.add(PowerSample(1000.0 + t, energy_j=500.0 + 2.0 * t))
    window = meter.close(frames=500, window_s=10.0)
    assert window.power_w == pytest.approx(2.0)
    assert window.energy_j == pytest.approx(20.0)
    assert window.energy_per_frame_mj == pytest.approx(40.0)
    assert window.error is None


def test_meter_from_power_samples_gives_40_mj_per_frame() -> None:
    meter = PowerMeter("ina3221")
    for t in range(11):
        meter.add(PowerSample(float(t), power_w=2.0))
    window = meter.close(frames=500, window_s=10.0)
    assert window.power_w == pytest.approx(2.0)
    assert window.energy_per_frame_mj == pytest.approx(40.0)


def test_meter_windows_join_without_losing_time() -> None:
    meter = PowerMeter("hwmon")
    for t in range(6):
        meter.add(PowerSample(float(t), power_w=2.0))
    first = meter.close(frames=100, window_s=5.0)
    # Next window starts at t=5 with the carried sample: 4 W from t=6 on.
    for t in range(6, 11):
        meter.add(PowerSample(float(t), power_w=4.0))
    second = meter.close(frames=100, window_s=5.0)
    assert first.energy_j == pytest.approx(10.0)
    assert second.energy_j == pytest.approx(3.0 + 4 * 4.0)
    assert second.span_s == pytest.approx(5.0)


def test_meter_without_fresh_samples_reports_the_error() -> None:
    meter = PowerMeter("rapl")
    meter.add(PowerSample(0.0, energy_j=1.0))
    meter.add(PowerSample(1.0, energy_j=3.0))
    meter.close(frames=10, window_s=1.0)
    meter.add(PowerSample(2.0, error="/sys/x/energy_uj: gone"))
    window = meter.close(frames=10, window_s=1.0)
    assert window.power_w is None
    assert window.energy_per_frame_mj is None
    assert window.error == "/sys/x/energy_uj: gone"


# --- RAPL ----------------------------------------------------------------------------------


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


# --- hwmon ---------------------------------------------------------------------------------


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


# --- Jetson INA3221 ------------------------------------------------------------------------

ORIN_NANO_RAILS = [("VDD_IN", 5072, 1208), ("VDD_CPU_GPU_CV", 5072, 412), ("VDD_SOC", 5072, 352)]


def test_jetson_jp5_reports_vdd_in(tmp_path: Path) -> None:
    fx.jetson_jp5(tmp_path, ORIN_NANO_RAILS)
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
    chip = fx.jetson_jp5(tmp_path, ORIN_NANO_RAILS)
    (chip / "curr1_input").write_text("abc\n")
    sample = JetsonReader(tmp_path).sample()
    assert sample.power_w is None
    assert sample.error is not None
    assert "hwmon1/curr1_input: not a number: 'abc'" in sample.error


def test_jetson_absent(tmp_path: Path) -> None:
    probe = JetsonReader(tmp_path).probe()
    assert not probe.ok
    assert "no INA3221 rails" in probe.reason


# --- Raspberry Pi --------------------------------------------------------------------------


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


# --- thermal zones and psutil --------------------------------------------------------------


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


# --- estimate ------------------------------------------------------------------------------


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


# --- no exception escapes sample() ---------------------------------------------------------


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


# --- detection -----------------------------------------------------------------------------


def _everything(root: Path) -> None:
    fx.rapl(root, [1000])
    fx.hwmon_chip(root, 0, "ina226", {"power1_input": "3000000"})
    fx.thermal_zones(root, [("cpu-thermal", "48300")])


def test_detect_prefers_jetson(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _everything(tmp_path)
    fx.jetson_jp5(tmp_path, ORIN_NANO_RAILS)
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


def test_detect_honours_a_forced_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _everything(tmp_path)
    fx.jetson_jp5(tmp_path, ORIN_NANO_RAILS)
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


# --- the real vcgencmd runner, against scripts on PATH -------------------------------------


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
    _fake_binary(bin_dir, "exec sleep 5")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{system_path}")
    monkeypatch.setattr("edgefleet.agent.power.raspberrypi.VCGENCMD_TIMEOUT_S", 0.2)
    assert run_vcgencmd_error() == "vcgencmd pmic_read_adc: no answer within 0.2 s"


def run_vcgencmd_error() -> str | None:
    return PmicReader().sample().error
