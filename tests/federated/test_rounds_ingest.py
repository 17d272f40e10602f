"""Federated updates through a real mosquitto into the store, as the coordinator ingests them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree, encode
from edgefleet.server.fleet.store import Store, open_store
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests import protocol_samples as samples
from tests.fleet_helpers import RawPublisher, start_ingestor
from tests.store.test_fed_rounds import fed_round, update


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_updates_are_stored_once_and_the_rest_counted(
    writer: str, tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    url = f"sqlite://{tmp_path}/fleet.db"
    store: Store = open_store(url)
    store.create_fed_round(fed_round(deadline_at=4e9))
    ingestor = start_ingestor(
        mqtt_broker, topic_prefix, store, writer_url=url if writer == "process" else None
    )
    tree = TopicTree(topic_prefix)
    raw = RawPublisher(mqtt_broker)
    try:
        good = update("pi-7")
        raw.publish(tree.fed_update("r-12", "pi-7"), encode(good))
        raw.publish(tree.fed_update("r-12", "pi-7"), encode(good))  # a redelivery
        raw.publish(tree.fed_update("r-99", "pi-8"), encode(update("pi-8", round_id="r-99")))
        stale = update("pi-9", base="c" * 64)
        raw.publish(tree.fed_update("r-12", "pi-9"), encode(stale))
        # Another device's update on pi-10's topic, and a round that is not the topic's.
        raw.publish(tree.fed_update("r-12", "pi-10"), encode(update("pi-7")))
        raw.publish(tree.fed_update("r-12", "pi-11"), encode(update("pi-11", round_id="r-13")))
        raw.publish(tree.fed_update("r-12", "pi-12"), b"{not json")
        wait_until(
            lambda: ingestor.stats.received >= 7, 10, "7 messages ingested",
            detail=lambda: str(ingestor.stats),
        )
        stats = ingestor.stats
        assert stats.fed_received == 1
        assert dict(stats.fed_ignored) == {"duplicate": 1, "unknown_round": 1, "stale": 1}
        assert (stats.rejects["device_mismatch"], stats.rejects["invalid_payload"]) == (1, 2)
        rows = store.fed_updates("r-12", with_payload=True)
        assert [(u.device_id, u.status) for u in rows] == [("pi-7", "received"), ("pi-9", "stale")]
        assert rows[0].payload is not None and rows[0].samples == good.samples
        r = store.fed_round("r-12")
        assert r is not None and r.received == 1
        assert store.reject_counts()["device_mismatch"] == 1
        # Telemetry goes on through the same path meanwhile.
        raw.publish(tree.device("pi-7", "telemetry"), encode(samples.telemetry("pi-7", 1)))
        wait_until(lambda: store.telemetry_count() == 1, 10, "the telemetry window stored")
    finally:
        raw.close()
        ingestor.stop()
        store.close()
