"""Publishing a bundle archive as retained chunks on a real mosquitto, and clearing it."""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.protocol import TopicTree
from edgefleet.agent.protocol.transfer import MAX_CHUNK_SIZE, MAX_CHUNKS, BundleOffer
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.rollout.publisher import (
    PublishError,
    choose_chunk_size,
    clear,
    make_offer,
    publish,
)
from tests.harness.mqttclient import Client

MANIFEST = "b" * 64
KIB = 1024


@pytest.fixture
def coordinator(mqtt_broker: MosquittoBroker) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connected: list[bool] = []
    client.on_connect = lambda *_a: connected.append(True)
    client.connect(mqtt_broker.host, mqtt_broker.port, keepalive=10)
    client.loop_start()
    wait_until(lambda: bool(connected), 15, "the coordinator's CONNACK")
    yield client
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(os.urandom(3 * 64 * KIB + 1234))  # 4 chunks, the last one short
    return path


def test_choose_chunk_size() -> None:
    assert choose_chunk_size(1) == 64 * KIB
    assert choose_chunk_size(MAX_CHUNKS * 64 * KIB) == 64 * KIB
    assert choose_chunk_size(MAX_CHUNKS * 64 * KIB + 1) == 128 * KIB
    assert choose_chunk_size(MAX_CHUNKS * MAX_CHUNK_SIZE) == MAX_CHUNK_SIZE
    with pytest.raises(PublishError, match="needs more than 900 chunks"):
        choose_chunk_size(MAX_CHUNKS * MAX_CHUNK_SIZE + 1)
    with pytest.raises(PublishError):
        choose_chunk_size(0)


def test_make_offer_hashes_the_archive_and_each_chunk(archive: Path) -> None:
    data = archive.read_bytes()
    offer = make_offer(archive, model_id="tiny-cnn", version=3, manifest_sha256=MANIFEST)
    assert offer.sha256 == hashlib.sha256(data).hexdigest()
    assert (offer.size, offer.chunk_size, offer.chunk_count) == (len(data), 64 * KIB, 4)
    assert offer.chunk_sha256[3] == hashlib.sha256(data[3 * 64 * KIB :]).hexdigest()
    delta = make_offer(
        archive,
        model_id="tiny-cnn",
        version=4,
        manifest_sha256=MANIFEST,
        kind="delta",
        base_manifest_sha256="c" * 64,
        chunk_size=100 * KIB,
    )
    assert delta.kind == "delta" and delta.chunk_count == 2


def _retained(broker: MosquittoBroker, tree: TopicTree, sha: str) -> list[tuple[str, bytes]]:
    """Every retained message under bundle/{sha}/, read by a fresh subscriber.

    A sentinel retained on another topic, subscribed second, arrives after every retained
    message of the first subscription: when it is there, nothing else is still on its way.
    """
    sentinel = f"{tree.root}/sentinel/{uuid.uuid4().hex}"
    writer = Client(broker, None)
    reader = Client(broker, None)
    try:
        assert not writer.publish(sentinel, b"end", retain=True).is_failure
        assert not reader.subscribe(f"{tree.root}/bundle/{sha}/#").is_failure
        assert not reader.subscribe(sentinel).is_failure
        wait_until(lambda: sentinel in reader.topics(), 15, "the sentinel")
        return [(t, p) for t, p in reader.messages if t != sentinel]
    finally:
        writer.close()
        reader.close()


def test_publish_leaves_every_chunk_retained_and_the_offer_last_then_clear_removes_them(
    mqtt_broker: MosquittoBroker, coordinator: mqtt.Client, archive: Path, topic_prefix: str
) -> None:
    tree = TopicTree(topic_prefix)
    data = archive.read_bytes()
    offer = make_offer(archive, model_id="tiny-cnn", version=3, manifest_sha256=MANIFEST)
    live = Client(mqtt_broker, None)
    try:
        live.subscribe(f"{tree.root}/bundle/{offer.sha256}/#")
        report = publish(coordinator, tree, archive, offer, timeout_s=15, max_in_flight=2)
        # Live subscribers see the offer after the last chunk.
        wait_until(lambda: len(live.messages) == 5, 15, "5 live messages")
        assert live.topics()[-1] == tree.bundle_meta(offer.sha256)
    finally:
        live.close()
    assert report.messages == 5
    meta_len = len(offer.model_dump_json().encode())
    assert report.bytes_published == len(data) + meta_len

    got = dict(_retained(mqtt_broker, tree, offer.sha256))
    assert set(got) == {tree.bundle_meta(offer.sha256)} | {
        tree.bundle_chunk(offer.sha256, i) for i in range(4)
    }
    assert BundleOffer.model_validate_json(got[tree.bundle_meta(offer.sha256)]) == offer
    assert b"".join(got[tree.bundle_chunk(offer.sha256, i)] for i in range(4)) == data

    cleared = clear(coordinator, tree, offer, timeout_s=15)
    assert cleared.messages == 5
    assert _retained(mqtt_broker, tree, offer.sha256) == []


def test_an_archive_changed_after_its_offer_is_not_published(
    mqtt_broker: MosquittoBroker, coordinator: mqtt.Client, archive: Path, topic_prefix: str
) -> None:
    tree = TopicTree(topic_prefix)
    offer = make_offer(archive, model_id="tiny-cnn", version=3, manifest_sha256=MANIFEST)
    data = bytearray(archive.read_bytes())
    data[2 * 64 * KIB + 5] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(PublishError, match=r"chunk 2 of .* does not match the offer"):
        publish(coordinator, tree, archive, offer, timeout_s=15)
    # The offer never appeared.
    retained = _retained(mqtt_broker, tree, offer.sha256)
    assert tree.bundle_meta(offer.sha256) not in dict(retained)


def test_a_stalled_broker_is_a_timeout_naming_the_chunk(
    mqtt_broker: MosquittoBroker, coordinator: mqtt.Client, archive: Path, topic_prefix: str
) -> None:
    tree = TopicTree(topic_prefix)
    offer = make_offer(archive, model_id="tiny-cnn", version=3, manifest_sha256=MANIFEST)
    (broker,) = [
        p
        for p in psutil.Process().children(recursive=True)
        if str(mqtt_broker.workdir) in " ".join(p.cmdline())
    ]
    os.kill(broker.pid, signal.SIGSTOP)  # alive but silent: no PUBACK ever comes
    try:
        with pytest.raises(PublishError, match=r"no PUBACK for chunk 0 within 0.5 s"):
            publish(coordinator, tree, archive, offer, timeout_s=0.5, max_in_flight=1)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
