"""Fake sysfs trees and captured vcgencmd outputs in the formats real devices produce.

Layouts follow the kernel's hwmon/ina3221 and powercap documentation and what jetson-stats
(rbonghi/jetson_stats, jtop/core/power.py) reads on JetPack 4 and 5; the vcgencmd outputs
follow published captures (e.g. jfikar/RPi5-power README) with our own numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from edgefleet.agent.power.base import SensorError

# `vcgencmd pmic_read_adc` on a Raspberry Pi 5: names right-aligned, currents first, then
# voltages; EXT5V_V (input) and BATT_V (RTC battery) have no current line.
PI5_PMIC_ADC = """\
 3V7_WL_SW_A current(0)=0.01562500A
   3V3_SYS_A current(1)=0.07500000A
   1V8_SYS_A current(2)=0.16000000A
  DDR_VDD2_A current(3)=0.00500000A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.20000000A
    0V8_SW_A current(6)=0.31000000A
  VDD_CORE_A current(7)=1.25000000A
   3V3_DAC_A current(17)=0.00036630A
   3V3_ADC_A current(18)=0.00042735A
   0V8_AON_A current(16)=0.00500000A
      HDMI_A current(22)=0.01500000A
 3V7_WL_SW_V volt(8)=3.70000000V
   3V3_SYS_V volt(9)=3.31000000V
   1V8_SYS_V volt(10)=1.80000000V
  DDR_VDD2_V volt(11)=1.10000000V
  DDR_VDDQ_V volt(12)=0.60500000V
   1V1_SYS_V volt(13)=1.10500000V
    0V8_SW_V volt(14)=0.80000000V
  VDD_CORE_V volt(15)=0.88000000V
   3V3_DAC_V volt(20)=3.30500000V
   3V3_ADC_V volt(21)=3.30200000V
   0V8_AON_V volt(19)=0.79800000V
      HDMI_V volt(23)=5.07000000V
     EXT5V_V volt(24)=5.08000000V
      BATT_V volt(25)=0.00000000V
"""
# The same rails as (amps, volts), to check the parser against by hand.
PI5_PMIC_RAILS = {
    "3V7_WL_SW": (0.015625, 3.70),
    "3V3_SYS": (0.075, 3.31),
    "1V8_SYS": (0.16, 1.80),
    "DDR_VDD2": (0.005, 1.10),
    "DDR_VDDQ": (0.0, 0.605),
    "1V1_SYS": (0.20, 1.105),
    "0V8_SW": (0.31, 0.80),
    "VDD_CORE": (1.25, 0.88),
    "3V3_DAC": (0.0003663, 3.305),
    "3V3_ADC": (0.00042735, 3.302),
    "0V8_AON": (0.005, 0.798),
    "HDMI": (0.015, 5.07),
}
# A Pi 4's firmware does not know the PMIC command and says so on stdout.
PI4_PMIC_ADC = 'error=1 error_msg="Command not registered"'
MEASURE_TEMP = "temp=48.3'C"
THROTTLED_OK = "throttled=0x0"
# Under-voltage and throttling now, and both since boot.
THROTTLED_UNDER_VOLTAGE = "throttled=0x50005"
# Soft temperature limit now and since boot.
THROTTLED_SOFT_TEMP = "throttled=0x80008"

RAPL_MAX_RANGE_UJ = 262143328850
# A Jetson Orin Nano's INA3221 on JetPack 5: (label, millivolts, milliamps) per channel.
ORIN_NANO_RAILS = [("VDD_IN", 5072, 1208), ("VDD_CPU_GPU_CV", 5072, 412), ("VDD_SOC", 5072, 352)]


def write(root: Path, path: str, text: str) -> Path:
    """Write `text` plus a newline at the device path `path` inside `root`, as sysfs does."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{text}\n")
    return target


class FakeVcgencmd:
    """A command runner answering `vcgencmd` sub-commands from a table; records the calls."""

    def __init__(self, answers: Mapping[str, str | Exception]) -> None:
        self.answers = dict(answers)
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, args: Sequence[str]) -> str:
        """The captured output for `args[0]`, or the error a missing binary would raise."""
        self.calls.append(tuple(args))
        answer = self.answers.get(args[0])
        if answer is None:
            raise SensorError("vcgencmd", "not installed (not a Raspberry Pi?)")
        if isinstance(answer, Exception):
            raise answer
        return answer + "\n"


def pi5_vcgencmd(throttled: str = THROTTLED_OK) -> FakeVcgencmd:
    """vcgencmd as on a Raspberry Pi 5."""
    return FakeVcgencmd(
        {"pmic_read_adc": PI5_PMIC_ADC, "get_throttled": throttled, "measure_temp": MEASURE_TEMP}
    )


def pi4_vcgencmd() -> FakeVcgencmd:
    """vcgencmd as on a Raspberry Pi 4: no PMIC command."""
    return FakeVcgencmd(
        {"pmic_read_adc": PI4_PMIC_ADC, "get_throttled": THROTTLED_OK, "measure_temp": MEASURE_TEMP}
    )


def no_vcgencmd() -> FakeVcgencmd:
    """No vcgencmd at all (a PC or a Jetson)."""
    return FakeVcgencmd({})


def board_model(root: Path, model: str) -> None:
    """/proc/device-tree/model: NUL-terminated, no newline."""
    target = root / "proc/device-tree/model"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model.encode() + b"\x00")


def rapl(
    root: Path, packages: Sequence[int], *, psys: int | None = None, wrap: int = RAPL_MAX_RANGE_UJ
) -> None:
    """/sys/class/powercap with one intel-rapl:N per package, core/uncore/dram subzones, psys."""
    base = "/sys/class/powercap"
    write(root, f"{base}/intel-rapl/enabled", "1")
    for n, energy in enumerate(packages):
        zone = f"{base}/intel-rapl:{n}"
        write(root, f"{zone}/name", f"package-{n}")
        write(root, f"{zone}/energy_uj", str(energy))
        write(root, f"{zone}/max_energy_range_uj", str(wrap))
        write(root, f"{zone}/enabled", "1")
        write(root, f"{zone}/constraint_0_name", "long_term")
        for sub, name in enumerate(("core", "uncore", "dram")):
            write(root, f"{zone}/intel-rapl:{n}:{sub}/name", name)
            write(root, f"{zone}/intel-rapl:{n}:{sub}/energy_uj", str(energy // 3))
            # sysfs also links each subzone flat under /sys/class/powercap.
            write(root, f"{base}/intel-rapl:{n}:{sub}/name", name)
            write(root, f"{base}/intel-rapl:{n}:{sub}/energy_uj", str(energy // 3))
    if psys is not None:
        zone = f"{base}/intel-rapl:{len(packages)}"
        write(root, f"{zone}/name", "psys")
        write(root, f"{zone}/energy_uj", str(psys))
        write(root, f"{zone}/max_energy_range_uj", str(wrap))
    # The MMIO interface duplicates package-0 on laptops; it must not be summed.
    write(root, f"{base}/intel-rapl-mmio:0/name", "package-0")
    write(root, f"{base}/intel-rapl-mmio:0/energy_uj", "5")


def set_rapl(root: Path, zone: int, energy_uj: int) -> None:
    """Advance (or wrap) one zone's counter."""
    write(root, f"/sys/class/powercap/intel-rapl:{zone}/energy_uj", str(energy_uj))


def hwmon_chip(root: Path, index: int, name: str, attributes: Mapping[str, str]) -> Path:
    """/sys/class/hwmon/hwmonN with a `name` file and the given attributes."""
    chip = root / f"sys/class/hwmon/hwmon{index}"
    write(root, f"/sys/class/hwmon/hwmon{index}/name", name)
    for attribute, value in attributes.items():
        write(root, f"/sys/class/hwmon/hwmon{index}/{attribute}", value)
    return chip


def jetson_jp5(
    root: Path,
    rails: Sequence[tuple[str, int, int]],
    *,
    device: str = "1-0040",
    hwmon: str = "hwmon1",
) -> Path:
    """A JetPack 5 INA3221 with (label, mV, mA) channels: hwmon in{N}_label, in{N}_input,
    curr{N}_input for N = 1..3.
    """
    dev = f"/sys/bus/i2c/devices/{device}"
    write(root, f"{dev}/name", "ina3221")
    write(root, f"{dev}/modalias", "of:NinaTCti,ina3221")
    chip = f"{dev}/hwmon/{hwmon}"
    write(root, f"{chip}/name", "ina3221")
    for n, (label, millivolts, milliamps) in enumerate(rails, start=1):
        write(root, f"{chip}/in{n}_label", label)
        write(root, f"{chip}/in{n}_enable", "0" if label == "NC" else "1")
        write(root, f"{chip}/in{n}_input", str(millivolts))
        write(root, f"{chip}/curr{n}_input", str(milliamps))
        write(root, f"{chip}/curr{n}_max", "32760")
        write(root, f"{chip}/curr{n}_crit", "32760")
        write(root, f"{chip}/curr{n}_max_alarm", "0")
        write(root, f"{chip}/curr{n}_crit_alarm", "0")
        write(root, f"{chip}/shunt{n}_resistor", "5000")
        write(root, f"{chip}/in{n + 3}_input", str(milliamps * 5))  # shunt drop, uV
    # Channel 7 is the driver's sum of shunt voltages: a label with no current.
    write(root, f"{chip}/in7_label", "sum of shunt voltages")
    write(root, f"{chip}/in7_input", "0")
    # Neighbours on the bus that are not power monitors.
    write(root, "/sys/bus/i2c/devices/i2c-1/name", "3160000.i2c")
    write(root, "/sys/bus/i2c/devices/1-0050/name", "24c02")
    return root / chip.lstrip("/")


def jetson_jp4(
    root: Path,
    rails: Mapping[str, tuple[int, int, int]],
    *,
    device: str = "6-0040",
) -> Path:
    """A JetPack 4 INA3221x: iio rail_name_{N}, in_power{N}_input (mW), volts, amps, N=0..2."""
    dev = f"/sys/bus/i2c/devices/{device}"
    write(root, f"{dev}/name", "ina3221x")
    iio = f"{dev}/iio:device0"
    write(root, f"{iio}/name", "ina3221x")
    for n, (label, (milliwatts, millivolts, milliamps)) in enumerate(rails.items()):
        write(root, f"{iio}/rail_name_{n}", label)
        write(root, f"{iio}/in_power{n}_input", str(milliwatts))
        write(root, f"{iio}/in_voltage{n}_input", str(millivolts))
        write(root, f"{iio}/in_current{n}_input", str(milliamps))
        write(root, f"{iio}/warn_current_limit_{n}", "32760")
        write(root, f"{iio}/crit_current_limit_{n}", "32760")
    return root / iio.lstrip("/")


def thermal_zones(root: Path, zones: Sequence[tuple[str, str]]) -> None:
    """/sys/class/thermal/thermal_zoneN with `type` and `temp` (millidegrees Celsius)."""
    for n, (kind, millidegrees) in enumerate(zones):
        write(root, f"/sys/class/thermal/thermal_zone{n}/type", kind)
        write(root, f"/sys/class/thermal/thermal_zone{n}/temp", millidegrees)
        write(root, f"/sys/class/thermal/thermal_zone{n}/policy", "step_wise")
    write(root, "/sys/class/thermal/cooling_device0/type", "Processor")
