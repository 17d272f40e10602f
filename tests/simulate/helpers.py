"""The simulator tests' observer: a real paho subscriber, and waits on what it saw."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.protocol import (
    Message,
    ProtocolError,
    Telemetry,
    TopicTree,
    decode_topic,
)
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until


@dataclass(frozen=True)
class Received:
    """One message as the subscriber saw it, decoded."""

    topic: str
    msg: Message
    retained: bool
    at: float


class Collector:
    """A paho subscriber with a persistent session (survives a broker restart) that decodes all."""

    def __init__(self, broker: MosquittoBroker, root: str) -> None:
        self.tree = TopicTree(root)
        self.received: list[Received] = []
        self.errors: list[ProtocolError] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300  # the broker queues QoS 1 for us while we are away
        # clean_start=False from the first connect, like tests/agent_harness.py: mosquitto
        # then persists the session across its restart.
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector did not subscribe"

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any
    ) -> None:
        if not flags.session_present:
            client.subscribe(
                [(self.tree.all_devices(kind), 1) for kind in ("status", "telemetry", "events")]
                + [(self.tree.all_devices("reply"), 1)]
            )

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, m.topic, m.payload)
        with self._lock:
            if isinstance(decoded, ProtocolError):
                self.errors.append(decoded)
            else:
                self.received.append(Received(m.topic, decoded, bool(m.retain), time.monotonic()))

    def describe(self) -> str:
        """Per device, how many windows arrived and the highest seq, for failure messages."""
        seen: dict[str, list[int]] = {}
        for t in self.of(Telemetry):
            seen.setdefault(t.device_id, []).append(t.seq)
        return ", ".join(f"{d}: {len(s)} max {max(s)}" for d, s in sorted(seen.items()))

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> list[Received]:
        """Everything received so far."""
        with self._lock:
            return list(self.received)

    def of(self, kind: type[Any], device: str | None = None) -> list[Any]:
        """Decoded messages of one model (and device), in arrival order."""
        return [
            r.msg
            for r in self.snapshot()
            if isinstance(r.msg, kind) and (device is None or _device(r.msg) == device)
        ]

    def seqs(self, device: str) -> list[int]:
        """Telemetry seqs of one device in arrival order."""
        return [t.seq for t in self.of(Telemetry, device)]

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll cond until true; fail naming what was awaited and what arrived."""
        wait_until(
            cond,
            timeout,
            what,
            poll=0.05,
            detail=lambda: f"decode errors: {self.errors[:3]}; {self.describe()}",
        )


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll cond until true; fail naming what was awaited (tests without a collector)."""
    wait_until(cond, timeout, what, poll=0.05)


def _device(msg: Message) -> str | None:
    return getattr(msg, "device_id", None)


def start(sims: list[Simulator], cfg: SimConfig) -> Simulator:
    sim = Simulator(cfg)
    sims.append(sim)
    sim.start()
    return sim


def missing(c: Collector, sim: Simulator) -> dict[str, list[int]]:
    """Seqs each device produced that the collector has not received."""
    stats = sim.stats().by_id()
    gaps = {d: sorted(set(range(s.next_seq)) - set(c.seqs(d))) for d, s in stats.items()}
    return {d: g for d, g in gaps.items() if g}


def all_seqs_received(c: Collector, sim: Simulator) -> bool:
    return not missing(c, sim)


