"""Power, energy and temperature readers for the telemetry, chosen per device by `detect`."""

from edgefleet.agent.power.base import (
    NoPowerReader,
    PowerMeter,
    PowerReader,
    PowerSample,
    PowerWindow,
    Probe,
    SensorError,
    counter_delta,
    energy_per_frame_mj,
    trapezoid_energy_j,
    window_power,
)
from edgefleet.agent.power.detect import detect, detect_temperature, power_candidates
from edgefleet.agent.power.estimate import PROFILES, EstimateReader, PowerProfile, profile_for_model
from edgefleet.agent.power.hwmon import HwmonReader
from edgefleet.agent.power.jetson import JetsonReader
from edgefleet.agent.power.rapl import RaplReader
from edgefleet.agent.power.raspberrypi import (
    PmicReader,
    Throttling,
    VcgencmdThermalReader,
    parse_measure_temp,
    parse_pmic_adc,
    parse_throttled,
    run_vcgencmd,
)
from edgefleet.agent.power.thermal import (
    NoTemperatureReader,
    PsutilTemperatureReader,
    TemperatureReader,
    ThermalReading,
    ThermalZoneReader,
)

__all__ = [
    "PROFILES",
    "EstimateReader",
    "HwmonReader",
    "JetsonReader",
    "NoPowerReader",
    "NoTemperatureReader",
    "PmicReader",
    "PowerMeter",
    "PowerProfile",
    "PowerReader",
    "PowerSample",
    "PowerWindow",
    "Probe",
    "PsutilTemperatureReader",
    "RaplReader",
    "SensorError",
    "TemperatureReader",
    "ThermalReading",
    "ThermalZoneReader",
    "Throttling",
    "VcgencmdThermalReader",
    "counter_delta",
    "detect",
    "detect_temperature",
    "energy_per_frame_mj",
    "parse_measure_temp",
    "parse_pmic_adc",
    "parse_throttled",
    "power_candidates",
    "profile_for_model",
    "run_vcgencmd",
    "trapezoid_energy_j",
    "window_power",
]
