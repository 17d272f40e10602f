"""What only agent tests need: the reference bundle, a coordinator-side collector, and a look
into a running agent's outbox. The agent process itself is `edgefleet.server.local.agents`."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent.bundle import Metrics
from edgefleet.agent.protocol import (
    Event,
    ProtocolError,
    Reply,
    Status,
    Telemetry,
    TopicTree,
    decode_topic,
)
from edgefleet.server.bundles.plain import plain_body, write_plain_bundle
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import poll_until
from edgefleet.server.reference import MODEL_PATH, reference_preprocessing

DIGITS = [str(i) for i in range(10)]


def reference_bundle(root: Path) -> tuple[Path, FleetKey]:
    """A signed one-stage bundle of the reference model, and the key that signed it."""
    key, _ = init_key(root / "keys")
    body = plain_body(
        MODEL_PATH,
        model_id="mnist-cnn",
        version=1,
        preprocessing=reference_preprocessing(),
        labels=DIGITS,
        metrics=Metrics(),
    )
    out = root / "bundle"
    write_plain_bundle(out, body, MODEL_PATH, key)
    return out, key


@dataclass
class Collector:
    """A coordinator-side subscriber with a persistent session: it misses nothing."""

    broker: MosquittoBroker
    tree: TopicTree
    telemetry: list[Telemetry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    status: list[Status] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()  # pred() passed to wait() may call seqs()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._subscribed = threading.Event()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(
            self.broker.host, self.broker.port, keepalive=5, clean_start=False, properties=props
        )
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(
            [(self.tree.all_devices(k), 1) for k in ("telemetry", "events", "reply", "status")]
        )
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, msg.topic, bytes(msg.payload))
        with self._lock:
            if isinstance(decoded, ProtocolError):
                self.rejected.append(str(decoded))
            elif isinstance(decoded, Telemetry):
                self.telemetry.append(decoded)
            elif isinstance(decoded, Event):
                self.events.append(decoded)
            elif isinstance(decoded, Reply):
                self.replies.append(decoded)
            elif isinstance(decoded, Status):
                self.status.append(decoded)

    def seqs(self) -> list[int]:
        """Telemetry sequence numbers in arrival order."""
        with self._lock:
            return [t.seq for t in self.telemetry]

    def wait(self, pred: Callable[[Collector], bool], timeout: float) -> bool:
        """Poll pred(self) until true (True) or timeout (False)."""

        def holds() -> bool:
            with self._lock:
                return pred(self)

        return poll_until(holds, timeout)

    def publish(self, topic: str, payload: bytes) -> None:
        """Send something (a command) as the coordinator."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def missing(seqs: list[int]) -> list[int]:
    """Sequence numbers absent between 0 and the highest seen."""
    if not seqs:
        return []
    return sorted(set(range(max(seqs) + 1)) - set(seqs))


def queued(state_dir: Path, kind: str) -> int:
    """How many `kind` messages (telemetry, events...) a running agent holds in its outbox.

    Read-only, beside the agent's own connection (WAL lets a reader in without blocking the
    writer); 0 until the agent has created the file.
    """
    db = state_dir / "outbox.db"
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return 0
    try:
        row = conn.execute("SELECT COUNT(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # opened while the agent was still creating it
        return 0
    finally:
        conn.close()
