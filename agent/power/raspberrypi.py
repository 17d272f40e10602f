"""Raspberry Pi firmware through vcgencmd: Pi 5 PMIC rails, throttling and temperature.

`vcgencmd pmic_read_adc` lists a current line (`VDD_CORE_A current(7)=1.3A`) and a voltage
line (`VDD_CORE_V volt(15)=0.9V`) per rail of the Pi 5's PMIC. The sum of V*A over the rails
omits everything fed straight from the 5 V input (USB devices, HATs, fan, NVMe) and the
PMIC's own losses, so it reads below a USB-C power meter; it is still the Pi's own best figure.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from edgefleet.agent.power.base import Clock, PowerReader, SensorError
from edgefleet.agent.power.thermal import TemperatureReader, ThermalReading
from edgefleet.agent.protocol.messages import PowerSource

Runner = Callable[[Sequence[str]], str]
VCGENCMD_TIMEOUT_S = 2.0

_PMIC_LINE = re.compile(
    r"(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)(?P=unit)"
)
_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+)")
_TEMP = re.compile(r"temp=(-?\d+(?:\.\d+)?)'C")
# Bits 0-3 are the state now; the same conditions at bits 16-19 mean "since boot".
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
}
_SINCE_BOOT_SHIFT = 16


def run_vcgencmd(args: Sequence[str]) -> str:
    """stdout of `vcgencmd ARGS`; SensorError when missing, failing or slow."""
    command = ["vcgencmd", *args]
    where = " ".join(command)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=VCGENCMD_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise SensorError("vcgencmd", "not installed (not a Raspberry Pi?)") from None
    except subprocess.TimeoutExpired:
        raise SensorError(where, f"no answer within {VCGENCMD_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise SensorError(where, exc.strerror or type(exc).__name__) from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()[:200] or f"exit status {done.returncode}"
        raise SensorError(where, message)
    return done.stdout


def vcgencmd(runner: Runner, *args: str) -> str:
    """Run through `runner` and refuse the firmware's `error=` answers (old firmware, Pi 4)."""
    where = " ".join(("vcgencmd", *args))
    try:
        out = runner(args).strip()
    except SensorError:
        raise
    except (OSError, subprocess.SubprocessError) as exc:
        raise SensorError(where, str(exc) or type(exc).__name__) from None
    if out.startswith("error="):
        raise SensorError(where, out[:200])
    return out


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail (V*A) for every rail with both a current and a voltage line."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for match in _PMIC_LINE.finditer(text):
        table = amps if match["unit"] == "A" else volts
        table[match["rail"]] = float(match["value"])
    # EXT5V_V and BATT_V have no current line: they are inputs, not loads.
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}


@dataclass(frozen=True)
class Throttling:
    """The decoded `vcgencmd get_throttled` bit field."""

    raw: int

    @property
    def now(self) -> tuple[str, ...]:
        """Conditions active now (bits 0-3)."""
        return tuple(name for bit, name in THROTTLE_BITS.items() if self.raw >> bit & 1)

    @property
    def since_boot(self) -> tuple[str, ...]:
        """Conditions seen since boot (bits 16-19)."""
        shift = _SINCE_BOOT_SHIFT
        return tuple(name for bit, name in THROTTLE_BITS.items() if self.raw >> (bit + shift) & 1)

    @property
    def throttled(self) -> bool:
        """Any condition active now: the Pi is (or may be) running slower than it should."""
        return self.raw & 0xF != 0

    @property
    def flags(self) -> tuple[str, ...]:
        """Active flags, then since-boot flags with a `_since_boot` suffix."""
        return self.now + tuple(f"{name}_since_boot" for name in self.since_boot)


def parse_throttled(text: str) -> Throttling:
    """Decode `throttled=0x50005`."""
    match = _THROTTLED.search(text)
    if match is None:
        raise SensorError("vcgencmd get_throttled", f"unexpected output {text[:80]!r}")
    return Throttling(int(match.group(1), 16))


def parse_measure_temp(text: str) -> float:
    """Degrees Celsius from `temp=48.3'C`."""
    match = _TEMP.search(text)
    if match is None:
        raise SensorError("vcgencmd measure_temp", f"unexpected output {text[:80]!r}")
    return float(match.group(1))


class PmicReader(PowerReader):
    """Raspberry Pi 5 power as the sum of its PMIC rails (omits 5 V loads, see the module)."""

    name: ClassVar[PowerSource] = "pmic"

    def __init__(self, runner: Runner = run_vcgencmd, *, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._runner = runner
        self._rails = 0

    def describe(self) -> str:
        """What is summed and what is missing."""
        return f"sum of {self._rails} Pi 5 PMIC rails (omits 5 V loads: USB, HATs, fan, NVMe)"

    def read(self) -> tuple[float | None, float | None]:
        """Watts now."""
        rails = parse_pmic_adc(vcgencmd(self._runner, "pmic_read_adc"))
        if not rails:
            raise SensorError("vcgencmd pmic_read_adc", "no rail with both current and voltage")
        self._rails = len(rails)
        return sum(rails.values()), None


class VcgencmdThermalReader(TemperatureReader):
    """Throttling from get_throttled; temperature from `temperature` or measure_temp."""

    def __init__(
        self, runner: Runner = run_vcgencmd, temperature: TemperatureReader | None = None
    ) -> None:
        self._runner = runner
        # A thermal zone is a file read; measure_temp costs a process per reading.
        self._temperature = temperature

    def describe(self) -> str:
        """Where each value comes from."""
        source = self._temperature.describe() if self._temperature else "vcgencmd measure_temp"
        return f"{source}; throttling from vcgencmd get_throttled"

    def read(self) -> ThermalReading:
        """Temperature and throttling now."""
        throttling = parse_throttled(vcgencmd(self._runner, "get_throttled"))
        if self._temperature is None:
            celsius = parse_measure_temp(vcgencmd(self._runner, "measure_temp"))
            return ThermalReading(celsius, throttling.throttled, throttling.flags)
        # A failed zone read must not hide the throttling state, which is the rarer signal.
        zone = self._temperature.sample()
        return ThermalReading(
            zone.temperature_c, throttling.throttled, throttling.flags, zone.error
        )
