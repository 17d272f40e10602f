"""Pick the best power and temperature sources this device has, and log why."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.power.base import PowerReader
from edgefleet.agent.power.estimate import EstimateReader, PowerProfile
from edgefleet.agent.power.hwmon import HwmonReader
from edgefleet.agent.power.jetson import JetsonReader
from edgefleet.agent.power.rapl import RaplReader
from edgefleet.agent.power.raspberrypi import (
    PmicReader,
    Runner,
    VcgencmdThermalReader,
    run_vcgencmd,
)
from edgefleet.agent.power.thermal import (
    NoTemperatureReader,
    PsutilTemperatureReader,
    Sensors,
    TemperatureReader,
    ThermalZoneReader,
)

log = logging.getLogger(__name__)


def power_candidates(root: Path | str = "/", runner: Runner = run_vcgencmd) -> list[PowerReader]:
    """Measured sources, best first: a board meter before a CPU counter before a generic chip."""
    return [JetsonReader(root), PmicReader(runner), RaplReader(root), HwmonReader(root)]


def detect(
    root: Path | str = "/",
    runner: Runner = run_vcgencmd,
    *,
    profile: PowerProfile | str | None = None,
    cpu_fraction: Callable[[], float] | None = None,
    source: str = "auto",
) -> PowerReader:
    """The first measured source that reads here, else an estimate from CPU load.

    source (the config's `power.source`) forces one: "estimate", or a measured source's name
    ("rapl", "hwmon", "ina3221", "pmic"), which is used if it reads here; if it does not, a
    warning names why and the estimate stands in (labelled as such in every window).
    """
    candidates = power_candidates(root, runner)
    if source not in ("auto", "estimate"):
        known = [r.name for r in candidates]
        if source not in known:
            raise ValueError(f"power source {source!r} unknown; one of auto, estimate, {known}")
        candidates = [r for r in candidates if r.name == source]
    if source == "estimate":
        candidates = []
    for reader in candidates:
        probe = reader.probe()
        if probe.ok:
            log.info("power source %s: %s", reader.name, probe.reason)
            return reader
        if source == "auto":
            log.info("power source %s not used: %s", reader.name, probe.reason)
        else:
            log.warning(
                "power source %s (power.source) does not read here: %s; estimating instead",
                reader.name,
                probe.reason,
            )
    estimate = EstimateReader(profile, root=root, cpu_fraction=cpu_fraction)
    log.info("power source %s: %s", estimate.name, estimate.describe())
    return estimate


def detect_temperature(
    root: Path | str = "/",
    runner: Runner = run_vcgencmd,
    *,
    sensors: Sensors | None = None,
) -> TemperatureReader:
    """Thermal zone (with vcgencmd throttling on a Pi), else psutil, else none."""
    zones = ThermalZoneReader(root)
    zone_probe = zones.probe()
    zone = zones if zone_probe.ok else None
    if zone is None:
        log.info("temperature from thermal zones not used: %s", zone_probe.reason)
    pi = VcgencmdThermalReader(runner, temperature=zone)
    pi_probe = pi.probe()
    if pi_probe.ok:
        log.info("temperature: %s", pi_probe.reason)
        return pi
    log.info("throttling from vcgencmd not used: %s", pi_probe.reason)
    if zone is not None:
        log.info("temperature: %s", zone.describe())
        return zone
    fallback = PsutilTemperatureReader() if sensors is None else PsutilTemperatureReader(sensors)
    fallback_probe = fallback.probe()
    if fallback_probe.ok:
        log.info("temperature: %s", fallback_probe.reason)
        return fallback
    log.info("temperature from psutil not used: %s", fallback_probe.reason)
    return NoTemperatureReader("no thermal zone, vcgencmd or psutil sensor")
