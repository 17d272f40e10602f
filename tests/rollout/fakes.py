"""Stand-ins for the broker side of the rollout engine, for engine tests on a real store."""

from __future__ import annotations

from edgefleet.agent.protocol.commands import AnyCommand
from edgefleet.server.rollout.archives import ArchiveInfo

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    """A clock the test moves by hand (`clock.now += 1`)."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Sender:
    """Commands the rollout engine would send (recorded, never delivered)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def command(self, device_id: str, body: AnyCommand, expires_s: float) -> str:
        self.sent.append((device_id, body.name))
        return f"c{len(self.sent)}"


class Publisher:
    """The broker's retained bundle offers, as a set."""

    def __init__(self) -> None:
        self.on_broker: set[str] = set()

    def publish(self, info: ArchiveInfo) -> int:
        self.on_broker.add(info.sha256)
        return info.size

    def clear(self, info: ArchiveInfo) -> None:
        self.on_broker.discard(info.sha256)

    def generation(self) -> int:
        return 1

    def present(self, info: ArchiveInfo) -> bool:
        return info.sha256 in self.on_broker
