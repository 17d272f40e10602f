"""x86 RAPL: cumulative package energy counters under /sys/class/powercap."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgefleet.agent.power.base import (
    Clock,
    PowerReader,
    ReadText,
    SensorError,
    counter_delta,
    read_number,
    read_text,
    sysfs,
)
from edgefleet.agent.protocol.messages import PowerSource

POWERCAP = "/sys/class/powercap"
# Top-level zones only: intel-rapl:0:0 (core, uncore, dram) are parts of package 0 already.
_ZONE = re.compile(r"intel-rapl:(\d+)")
# Since Linux 5.10 (CVE-2020-8694, "Platypus") energy_uj is readable by root only.
_DENIED = (
    "permission denied (energy_uj is root-only since Linux 5.10; run the agent as root "
    "or grant read access with a udev rule)"
)


@dataclass
class _Zone:
    path: Path
    label: str
    wrap_uj: float | None
    last_uj: float | None = None


class RaplReader(PowerReader):
    """Sum of the RAPL package zones' energy counters, unwrapped into one growing total."""

    name: ClassVar[PowerSource] = "rapl"

    def __init__(
        self, root: Path | str = "/", *, read: ReadText = read_text, clock: Clock = time.monotonic
    ) -> None:
        super().__init__(clock)
        self._dir = sysfs(root, POWERCAP)
        self._read_text = read
        self._zones: list[_Zone] = []
        self._total_uj = 0.0

    def describe(self) -> str:
        """Which zones are summed."""
        labels = ", ".join(z.label for z in self._zones) or "no zones yet"
        return f"RAPL energy counters of {labels} under {self._dir}"

    def _discover(self) -> list[_Zone]:
        try:
            entries = sorted(self._dir.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            raise SensorError(self._dir, exc.strerror or "cannot list") from None
        zones = []
        for entry in entries:
            match = _ZONE.fullmatch(entry.name)
            if match is None:
                continue
            try:
                label = self._read_text(entry / "name")
            except OSError:
                label = f"package-{match.group(1)}"
            # psys (platform) already contains the packages; adding it would count them twice.
            if not label.startswith("package"):
                continue
            try:
                wrap: float | None = read_number(entry / "max_energy_range_uj", self._read_text)
            except SensorError:
                wrap = None
            zones.append(_Zone(entry, label, wrap))
        if not zones:
            raise SensorError(self._dir, "no intel-rapl package zones")
        return zones

    def read(self) -> tuple[float | None, float | None]:
        """Cumulative joules since the first reading; RAPL gives no instantaneous power."""
        if not self._zones:
            self._zones = self._discover()
        # Read every zone before updating any, so one failing file leaves the state consistent.
        raw = [
            read_number(z.path / "energy_uj", self._read_text, denied=_DENIED) for z in self._zones
        ]
        went_back = None
        for zone, now in zip(self._zones, raw, strict=True):
            if zone.last_uj is not None:
                delta = counter_delta(zone.last_uj, now, zone.wrap_uj)
                if delta is None:
                    went_back = zone
                else:
                    self._total_uj += delta
            zone.last_uj = now
        if went_back is not None:
            raise SensorError(
                went_back.path / "energy_uj", "counter went back without max_energy_range_uj"
            )
        return None, self._total_uj / 1e6
