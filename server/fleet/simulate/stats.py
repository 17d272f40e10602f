"""What a simulation reports: device counters, fleet snapshots, progress lines, the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceStats:
    """Counters of one simulated device."""

    device_id: str
    next_seq: int  # windows produced; the next window gets this seq
    acked: int  # windows whose PUBACK arrived
    backlog: int  # messages (windows, events, replies) not yet acknowledged
    overflow: int  # messages dropped because the backlog was full
    online: bool
    connects: int  # successful connections (CONNACK ok)
    events: int  # events produced
    commands: int  # commands answered with a reply
    commands_rejected: int  # command payloads without a readable id (answered uncorrelated)


@dataclass(frozen=True)
class SimStats:
    """A consistent snapshot of every device's counters, with totals."""

    devices: tuple[DeviceStats, ...]

    @property
    def produced(self) -> int:
        """Windows produced by all devices."""
        return sum(d.next_seq for d in self.devices)

    @property
    def acked(self) -> int:
        """Windows acknowledged by the broker."""
        return sum(d.acked for d in self.devices)

    @property
    def backlog(self) -> int:
        """Messages waiting for a PUBACK, all devices."""
        return sum(d.backlog for d in self.devices)

    @property
    def overflow(self) -> int:
        """Messages dropped for a full backlog, all devices."""
        return sum(d.overflow for d in self.devices)

    @property
    def online(self) -> int:
        """Devices connected now."""
        return sum(1 for d in self.devices if d.online)

    @property
    def connects(self) -> int:
        """Successful connections, all devices (first connects included)."""
        return sum(d.connects for d in self.devices)

    def by_id(self) -> dict[str, DeviceStats]:
        """The snapshot keyed by device id."""
        return {d.device_id: d for d in self.devices}


@dataclass(frozen=True)
class Progress:
    """One progress line of a running simulation."""

    elapsed_s: float
    produced: int
    acked: int
    backlog: int
    online: int
    devices: int


@dataclass(frozen=True)
class SimReport:
    """Result of `run_simulation`; the rates cover the measured `duration_s` only."""

    devices: int
    procs: int
    duration_s: float  # measured period, after every device had connected
    connect_s: float  # time to connect every device (slowest process)
    produced: int  # windows produced over the whole run (connect phase and final drain included)
    acked: int
    overflow: int
    backlog: int  # messages still unacknowledged at the end (0 when drained)
    publish_rate: float  # acknowledged windows per second during duration_s
    produce_rate: float  # produced windows per second during duration_s
    reconnects: int  # connections beyond each device's first
    offline_bursts: int  # --loss-burst rounds
    taken_offline: int  # device outages caused by --loss-burst
    drained: bool  # every produced window acknowledged (or counted as overflow) at the end

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)
