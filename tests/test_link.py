"""The device's MQTT link against a real mosquitto: two clients claiming one device id."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from edgefleet.agent.config import MqttConfig
from edgefleet.agent.hardware import describe
from edgefleet.agent.link import Link
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.protocol import Status
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until

BOOT = str(uuid.uuid4())


def _birth() -> Status:
    return Status(
        device_id="pi-dup",
        ts=time.time(),
        online=True,
        agent_version="test",
        hardware=describe(),
        boot_id=BOOT,
    )


def _flagged(events: list[tuple[str, str, dict[str, Any]]]) -> bool:
    return any(details.get("reason") == "connection_flapping" for *_, details in events)


def test_two_clients_with_one_device_id_slow_down_instead_of_flapping(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    """mosquitto 2.0 just closes the older connection: each short one doubles the wait."""
    cfg = MqttConfig(
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        keepalive_s=5,
        topic_root=f"{topic_prefix}/edgefleet/v1",
    )
    events: list[tuple[str, str, dict[str, Any]]] = []
    with Outbox(tmp_path / "a.db") as out_a, Outbox(tmp_path / "b.db") as out_b:
        first = Link("pi-dup", None, cfg, out_a, _birth, lambda *e: events.append(e))
        second = Link("pi-dup", None, cfg, out_b, _birth, lambda *e: events.append(e))
        first.start()
        try:
            assert first.connected.wait(10)
            second.start()  # another machine with the same id
            wait_until(lambda: _flagged(events), 25, "a connection_flapping event")
            drops = first.short_drops + second.short_drops
            # Waits of 2, 4, 8 s: a handful of drops, where paho's reset to 1 s gives ~20.
            assert 3 <= drops <= 8, drops
            flapping = [m for _, m, d in events if d.get("reason") == "connection_flapping"]
            assert "another client with this device id?" in flapping[0]
        finally:
            first.stop(timeout=1)
            second.stop(timeout=1)
