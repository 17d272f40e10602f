"""Helpers for coordinator tests: wait for a condition, build ingestors, publish raw bytes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.fleet.ingest import IngestConfig, Ingestor
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.localbroker import MosquittoBroker


def wait_until(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    """Poll pred until it holds; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll)
    if not pred():
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_ingestor(
    broker: MosquittoBroker,
    root: str,
    store: Store,
    client_id: str = "coord-1",
    writer_url: str | None = None,
    **kw: object,
) -> Ingestor:
    """An ingestor on broker; with writer_url it writes from a child process, as the service."""
    cfg = IngestConfig(host=broker.host, port=broker.port, root=root, client_id=client_id, **kw)
    ing = Ingestor(cfg, store, writer_url=writer_url)
    ing.start()
    assert ing.wait_connected(10), f"{client_id} did not connect"
    # The subscriptions are in place once the broker answered them; a ping round trip is not
    # exposed by paho, so give SUBACK a moment.
    time.sleep(0.3)
    return ing


class RawPublisher:
    """A plain MQTT client for hand-made (often broken) payloads."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
