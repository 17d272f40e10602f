"""What a simulation runs: how many devices, how fast, against which broker and topic root."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.agent.protocol import TopicTree, check_id


@dataclass(frozen=True)
class SimConfig:
    """What to simulate and where: `devices` agents sending `rate` windows per second each."""

    host: str
    port: int
    devices: int
    rate: float  # windows/s per device
    root: str = "edgefleet/v1"
    prefix: str = "sim"
    group: str | None = None
    events_every: int = 50  # one event per this many windows (0: none)
    backlog_limit: int = 10_000
    first_index: int = 0  # device ids start at {prefix}-{first_index:05d}; set per process
    connect_rate: float = 400.0  # new connections per second, so the broker is not flooded
    seed: int | None = None  # for reproducible telemetry values
    # device id -> broker password, the username being the device id (docs/security.md);
    # None: connect without credentials (a broker with anonymous access).
    passwords: Mapping[str, str] | None = field(default=None, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 windows/s, got {self.rate}")
        if self.backlog_limit < 1:
            raise ValueError(f"backlog_limit must be >= 1, got {self.backlog_limit}")
        if self.events_every < 0:
            raise ValueError(f"events_every must be >= 0, got {self.events_every}")
        if not self.connect_rate > 0:
            raise ValueError(f"connect_rate must be > 0, got {self.connect_rate}")
        if self.first_index < 0:
            raise ValueError(f"first_index must be >= 0, got {self.first_index}")
        check_id(device_id(self.prefix, self.first_index + self.devices - 1), "device id")
        if self.group is not None:
            check_id(self.group, "group name")
        TopicTree(self.root)  # validates the root

    def device_ids(self) -> list[str]:
        """The ids of the devices this config simulates, in index order."""
        return [device_id(self.prefix, i) for i in self.indices()]

    def indices(self) -> range:
        """The device numbers this config simulates (ids are derived from them)."""
        return range(self.first_index, self.first_index + self.devices)


def device_id(prefix: str, index: int) -> str:
    """The id of simulated device number `index`: `{prefix}-{index:05d}`."""
    return f"{prefix}-{index:05d}"
