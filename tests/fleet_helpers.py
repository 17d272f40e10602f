"""Helpers for coordinator tests: build ingestors, publish raw bytes."""

from __future__ import annotations

import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.fleet.ingest import IngestConfig, Ingestor
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.local.broker import MosquittoBroker


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
    # It subscribed on CONNACK, before anything else on this connection; the broker handles
    # one connection's packets in order, so once it acknowledged a QoS 1 publish sent after
    # the SUBSCRIBE, the subscriptions are in place (no topic anyone listens to is used).
    probe = ing.client.publish(f"{root}/harness/{client_id}/subscribed", b"", qos=1)
    probe.wait_for_publish(10)
    assert probe.is_published(), f"{client_id}: the broker never acknowledged the probe"
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
