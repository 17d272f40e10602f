"""A simulated device's backlog: the agent's on-disk outbox, mirrored in memory.

An entry leaves only when its PUBACK arrives; after a reconnect the backlog replays from its
head, in order, so a coordinator sees no gaps. When full, the oldest window makes room (events
and replies are kept, as the agent's outbox does), and every dropped message is counted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final, Literal

EntryKind = Literal["telemetry", "events", "reply"]
TELEMETRY: Final = "telemetry"
EVENTS: Final = "events"
REPLY: Final = "reply"


class Entry:
    """One backlog message: what to publish and what it counts as."""

    __slots__ = ("kind", "payload")

    def __init__(self, kind: EntryKind, payload: bytes) -> None:
        self.kind = kind
        self.payload = payload


class Backlog:
    """Messages not yet acknowledged, in production order, and the in-flight bookkeeping."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # key -> entry in production order; keys are local message numbers.
        self.pending: OrderedDict[int, Entry] = OrderedDict()
        self.next_key = 0
        self.send_queue: deque[int] = deque()  # keys not yet handed to paho on this connection
        self.inflight: dict[int, int] = {}  # paho mid -> key
        self.windows = 0  # telemetry windows among the pending entries
        self.acked = 0  # windows whose PUBACK arrived
        self.overflow = 0  # messages dropped because the backlog was full

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, kind: EntryKind, payload: bytes, sending: bool) -> bool:
        """Append, evicting the oldest window when full; True when queued to send now."""
        pending = self.pending
        if len(pending) >= self.limit:
            victim = next((k for k, e in pending.items() if e.kind == TELEMETRY), None)
            self.overflow += 1
            if victim is None:
                return False  # only events and replies left: drop the new message instead
            del pending[victim]
            self.windows -= 1
        key = self.next_key
        self.next_key += 1
        pending[key] = Entry(kind, payload)
        if kind == TELEMETRY:
            self.windows += 1
        if sending:
            self.send_queue.append(key)
        return sending

    def send(self, publish: Callable[[Entry], int | None], max_inflight: int) -> None:
        """Hand queued entries to `publish` (it returns the mid, or None when it cannot)."""
        queue = self.send_queue
        while queue and len(self.inflight) < max_inflight:
            key = queue[0]
            entry = self.pending.get(key)
            if entry is None:  # evicted for overflow
                queue.popleft()
                continue
            mid = publish(entry)
            if mid is None:
                return  # connection going away; the entry replays on the next one
            queue.popleft()
            self.inflight[mid] = key

    def ack(self, mid: int) -> bool:
        """A PUBACK for mid: the entry leaves the backlog; False when mid is not ours."""
        key = self.inflight.pop(mid, None)
        if key is None:
            return False
        entry = self.pending.pop(key, None)
        if entry is not None and entry.kind == TELEMETRY:
            self.acked += 1
            self.windows -= 1
        return True

    def replay(self) -> None:
        """A new connection: everything pending is sent again, from the head."""
        self.inflight.clear()
        self.send_queue = deque(self.pending.keys())

    def disconnected(self) -> None:
        """The connection is gone: nothing is in flight or queued on it any more."""
        self.inflight.clear()
        self.send_queue.clear()
