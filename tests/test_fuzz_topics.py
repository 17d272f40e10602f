"""A fuzz run of every subscribed topic against a real mosquitto and a real ingestor (issue 12).

Malformed and extreme messages on every topic the coordinator subscribes to, interleaved with
valid telemetry of other devices: ingestion must keep going for every other device with
nothing lost (sequence numbers prove it), on SQLite and PostgreSQL, and the poison message of
issue 12 redelivered by the persistent session after a coordinator restart must not stop it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree, encode
from edgefleet.server.fleet.ingest import Ingestor
from edgefleet.server.fleet.store import Store, open_store
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests import protocol_samples as samples
from tests.fleet_helpers import RawPublisher, start_ingestor
from tests.fuzz_payloads import corpus

GOOD_DEVICES = 4
FUZZ_DEVICE = "fz-1"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/fleet.db"
    return str(request.getfixturevalue("postgres_dsn"))


def _window(device_id: str, seq: int) -> bytes:
    now = time.time()
    msg = samples.telemetry(device_id, seq).model_copy(
        update={"window_start": now - 10, "window_end": now}
    )
    return encode(msg)


def _poison() -> bytes:
    """The message of issue 12: a valid-looking window whose seq is 2**63."""
    obj = json.loads(_window("poison-dev", 0))
    obj["seq"] = 9223372036854775808
    return json.dumps(obj).encode()


class _Traffic:
    """Valid windows of the good devices, numbered per device, and what was published."""

    def __init__(self, tree: TopicTree, pub: RawPublisher) -> None:
        self.tree, self.pub = tree, pub
        self.next_seq = dict.fromkeys((f"ok-{i}" for i in range(GOOD_DEVICES)), 0)
        self.subscribed = 0  # messages sent on topics the coordinator subscribes to

    def good(self) -> None:
        for device, seq in self.next_seq.items():
            self.pub.publish(self.tree.device(device, "telemetry"), _window(device, seq))
            self.next_seq[device] = seq + 1
            self.subscribed += 1

    def send(self, topic: str, payload: bytes, *, subscribed: bool) -> None:
        self.pub.publish(topic, payload)
        self.subscribed += subscribed


def _all_stored(store: Store, traffic: _Traffic) -> bool:
    reports = {r.device_id: r for r in store.sequence_reports()}
    return all(
        d in reports and reports[d].received == n and reports[d].max_seq == n - 1
        for d, n in traffic.next_seq.items()
    )


def _check_lossless(store: Store, traffic: _Traffic) -> None:
    store.declare_losses(time.time() + 3600, grace_s=0)
    reports = {r.device_id: r for r in store.sequence_reports()}
    for device, n in traffic.next_seq.items():
        r = reports[device]
        assert (r.first_seq, r.max_seq, r.received, r.missing, r.lost) == (0, n - 1, n, 0, 0)
        assert r.duplicates == 0, device


def test_fuzzing_every_subscribed_topic_stops_nobody(
    mqtt_broker: MosquittoBroker, topic_prefix: str, store_url: str
) -> None:
    tree = TopicTree(topic_prefix)
    store = open_store(store_url)
    # SQLite as `edgefleet-server run` writes it (a child process); PostgreSQL from a thread.
    writer_url = store_url if store_url.startswith("sqlite") else None
    ing: Ingestor = start_ingestor(mqtt_broker, topic_prefix, store, writer_url=writer_url)
    pub = RawPublisher(mqtt_broker)
    traffic = _Traffic(tree, pub)
    try:
        rng = random.Random(12)
        messages = corpus(rng, FUZZ_DEVICE, per_kind=40)
        rng.shuffle(messages)
        odd_ids = ["-bad", "x" * 100, "%00", "..", "\u00e9t\u00e9", "a b"]
        for i, (kind, payload) in enumerate(messages):
            if i % 10 == 0:
                traffic.good()
            traffic.send(tree.device(FUZZ_DEVICE, kind), payload, subscribed=kind != "results")
        for odd in odd_ids:  # a topic level that is no device id, on every subscribed kind
            for kind in ("status", "telemetry", "events", "reply"):
                traffic.send(
                    f"{topic_prefix}/dev/{odd}/{kind}", _window("ok-0", 0), subscribed=True
                )
        traffic.good()

        wait_until(
            lambda: _all_stored(store, traffic) and ing.stats.received >= traffic.subscribed,
            60,
            "every good window stored and every fuzz message accounted for",
            detail=lambda: f"received {ing.stats.received} of {traffic.subscribed}",
        )
        _check_lossless(store, traffic)
        assert ing.stats.received == traffic.subscribed
        assert ing.stats.store_errors == 0 and "unstorable" not in ing.stats.rejects
        assert sum(ing.stats.rejects.values()) > len(messages) // 2, ing.stats.rejects

        # The coordinator goes down; the poison and more windows wait in its persistent
        # session and are redelivered when it comes back with the same client id.
        ing.kill()
        traffic.good()
        traffic.send(tree.device("poison-dev", "telemetry"), _poison(), subscribed=True)
        traffic.good()
        ing = start_ingestor(mqtt_broker, topic_prefix, store, writer_url=writer_url)
        traffic.good()
        wait_until(lambda: _all_stored(store, traffic), 60, "the windows around the poison")
        _check_lossless(store, traffic)
        wait_until(lambda: ing.stats.rejects["invalid_payload"] >= 1, 10, "the poison rejected")
        assert ing.stats.store_errors == 0
        assert store.sequence_reports("poison-dev") == []
    finally:
        pub.close()
        ing.stop()
        store.close()
