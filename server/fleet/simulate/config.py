"""What a simulation runs: how many devices, how fast, against which broker and topic root."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgefleet.agent.protocol import TopicTree, check_id

from .variants import CLASS_SPEED, SimVariant
from .workload import BOARD_CLASSES


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
    # Bundles the devices can install (variants.py); none: the fixed POINTS, no installs.
    variants: tuple[SimVariant, ...] = ()
    initial_variant: str | None = None  # manifest sha256 every device starts on
    install_s: float = 1.0  # from an accepted install_bundle to the variant running
    # device class -> latency multiplier; None: CLASS_SPEED.
    class_speed: Mapping[str, float] | None = field(default=None, hash=False)

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
        self._check_variants()

    def _check_variants(self) -> None:
        shas = [v.manifest_sha256 for v in self.variants]
        if len(set(shas)) != len(shas):
            dup = next(s for s in shas if shas.count(s) > 1)
            raise ValueError(f"variants: manifest {dup[:12]} is given twice")
        if self.variants and self.initial_variant is None:
            raise ValueError("initial_variant is required when variants are given")
        if self.initial_variant is not None and self.initial_variant not in shas:
            raise ValueError(
                f"initial_variant {self.initial_variant[:12]!r} is not one of the variants"
                if self.variants
                else "initial_variant needs variants"
            )
        if not self.install_s >= 0:
            raise ValueError(f"install_s must be >= 0 s, got {self.install_s}")
        speed = self.speeds()
        missing = sorted(set(BOARD_CLASSES) - set(speed))
        if missing:
            raise ValueError(f"class_speed lacks the device classes {', '.join(missing)}")
        bad = {c: s for c, s in speed.items() if not 0 < s < 1e4}
        if bad:
            raise ValueError(f"class_speed values must be > 0, got {bad}")

    def speeds(self) -> Mapping[str, float]:
        """Latency multiplier per device class."""
        return CLASS_SPEED if self.class_speed is None else self.class_speed

    def variant(self, manifest_sha256: str) -> SimVariant | None:
        """The configured variant with this manifest, if any."""
        return next((v for v in self.variants if v.manifest_sha256 == manifest_sha256), None)

    def device_ids(self) -> list[str]:
        """The ids of the devices this config simulates, in index order."""
        return [device_id(self.prefix, i) for i in self.indices()]

    def indices(self) -> range:
        """The device numbers this config simulates (ids are derived from them)."""
        return range(self.first_index, self.first_index + self.devices)


def device_id(prefix: str, index: int) -> str:
    """The id of simulated device number `index`: `{prefix}-{index:05d}`."""
    return f"{prefix}-{index:05d}"
