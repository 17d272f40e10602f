"""Downloading a retained, chunked archive through the device's real Link and a real mosquitto."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.config import MqttConfig
from edgefleet.agent.hardware import describe
from edgefleet.agent.link import Link
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.protocol import BundleOffer, Status, TopicTree, encode
from edgefleet.agent.update.chunks import ChunkStore, TransferError
from edgefleet.agent.update.fetch import Download, Expect, TransferCancelled
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests.harness.mqttclient import Client
from tests.update.transfer_helpers import MANIFEST_SHA, make_offer, random_archive

CHUNK = 32 * 1024
SIZE = 1024 * 1024 - 1000  # ~1 MB: 32 chunks, the last one short
BIG = 1 << 40
BOOT = str(uuid.uuid4())


def _birth() -> Status:
    return Status(
        device_id="pi-fetch",
        ts=time.time(),
        online=True,
        agent_version="test",
        hardware=describe(),
        boot_id=BOOT,
    )


@dataclass
class Rig:
    """A connected device Link, the coordinator's side as a plain client, one archive."""

    broker: MosquittoBroker
    link: Link
    tree: TopicTree
    transfers: Path
    data: bytes
    offer: BundleOffer
    chunks: list[bytes]
    coordinator: Client

    def publish_chunks(self, indexes: list[int] | range) -> None:
        # All in flight at once, then wait for each PUBACK: one round trip, not one per chunk.
        sent = [
            self.coordinator.client.publish(
                self.tree.bundle_chunk(self.offer.sha256, i), self.chunks[i], qos=1, retain=True
            )
            for i in indexes
        ]
        for info in sent:
            info.wait_for_publish(10)
            assert info.is_published()

    def publish_chunk(self, index: int, payload: bytes) -> None:
        topic = self.tree.bundle_chunk(self.offer.sha256, index)
        assert not self.coordinator.publish(topic, payload, retain=True).is_failure

    def publish_offer(self, offer: BundleOffer | None = None) -> None:
        payload = encode(offer or self.offer)
        topic = self.tree.bundle_meta(self.offer.sha256)
        assert not self.coordinator.publish(topic, payload, retain=True).is_failure

    def reconnect_coordinator(self) -> None:
        self.coordinator.close()
        self.coordinator = Client(self.broker, None)

    def expect(self, **changes: object) -> Expect:
        fields: dict[str, object] = {
            "sha256": self.offer.sha256,
            "model_id": "digits-ee",
            "version": 3,
            "manifest_sha256": MANIFEST_SHA,
        }
        fields.update(changes)
        return Expect(**fields)  # type: ignore[arg-type]

    def download(self, **kwargs: object) -> Download:
        options: dict[str, object] = {
            "max_bytes": BIG,
            "window": 4,
            "rerequest_s": 60.0,
            "give_up_s": 30.0,
        }
        options.update(kwargs)
        dl = Download(self.link, self.tree, self.transfers, self.expect(), **options)  # type: ignore[arg-type]
        self.link.on_transfer = dl.on_message
        return dl


@pytest.fixture
def rig(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Rig]:
    cfg = MqttConfig(
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        keepalive_s=5,
        topic_root=f"{topic_prefix}/edgefleet/v1",
    )
    data = random_archive(SIZE)
    offer, chunks = make_offer(data, CHUNK)
    assert offer.chunk_count == 32
    with Outbox(tmp_path / "outbox.db") as outbox:
        link = Link("pi-fetch", None, cfg, outbox, _birth)
        link.start()
        coordinator = Client(mqtt_broker, None)
        rig = Rig(
            mqtt_broker,
            link,
            TopicTree(cfg.topic_root),
            tmp_path / "transfers",
            data,
            offer,
            chunks,
            coordinator,
        )
        try:
            assert link.connected.wait(10)
            yield rig
        finally:
            rig.coordinator.close()
            link.stop(timeout=1)


def _in_thread(dl: Download, cancel: threading.Event) -> tuple[ThreadPoolExecutor, Future[Path]]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(dl.run, cancel)


def test_a_published_archive_arrives_byte_identical(rig: Rig) -> None:
    rig.publish_chunks(range(32))
    rig.publish_offer()
    progress: list[tuple[int, int]] = []
    dl = rig.download(on_progress=lambda have, total: progress.append((have, total)))
    path = dl.run(threading.Event())
    assert path.read_bytes() == rig.data
    assert dl.stats.chunks_written == 32
    assert dl.stats.bad_chunks == dl.stats.rerequests == 0
    assert progress[-1] == (32, 32)
    assert rig.link.transfer_topics == frozenset()  # everything unsubscribed on success


def test_the_download_resumes_across_a_broker_restart(rig: Rig) -> None:
    """Retained chunks survive the restart (persistence) and the Link resubscribes the window.

    rerequest_s is far beyond the test, so only the Link's own resubscription can bring the
    rest: the download's re-requests stay at zero.
    """
    rig.publish_chunks(range(16))
    rig.publish_offer()
    dl = rig.download()
    cancel = threading.Event()
    pool, future = _in_thread(dl, cancel)
    try:
        wait_until(lambda: dl.stats.chunks_written == 16, 20, "the first 16 chunks")
        rig.broker.restart()
        rig.reconnect_coordinator()
        # MosquittoBroker persists retained messages: chunk 0 is still there after the restart.
        probe = Client(rig.broker, None)
        try:
            probe.subscribe(rig.tree.bundle_chunk(rig.offer.sha256, 0))
            wait_until(lambda: len(probe.messages) == 1, 10, "retained chunk 0 after restart")
        finally:
            probe.close()
        wait_until(rig.link.connected.is_set, 20, "the device reconnecting")
        rig.publish_chunks(range(16, 32))
        assert future.result(timeout=30).read_bytes() == rig.data
    finally:
        cancel.set()
        pool.shutdown()
    assert dl.stats.chunks_written == 32
    assert dl.stats.rerequests == 0


def test_a_corrupted_chunk_is_refused_rerequested_then_fetched(rig: Rig) -> None:
    good = rig.chunks[5]
    rig.publish_chunks([i for i in range(32) if i != 5])
    rig.publish_chunk(5, bytes([good[0] ^ 0xFF]) + good[1:])
    rig.publish_offer()
    dl = rig.download(rerequest_s=0.3)
    cancel = threading.Event()
    pool, future = _in_thread(dl, cancel)
    try:
        # A second refusal means the re-request made the broker send the retained bytes again.
        wait_until(lambda: dl.stats.bad_chunks >= 2, 20, "chunk 5 refused twice")
        assert dl.stats.rerequests >= 1
        rig.publish_chunk(5, good)
        assert future.result(timeout=20).read_bytes() == rig.data
    finally:
        cancel.set()
        pool.shutdown()
    assert dl.stats.chunks_written == 32


def test_an_offer_that_never_completes_fails_naming_the_counts_and_keeps_the_part(
    rig: Rig,
) -> None:
    rig.publish_chunks([i for i in range(32) if i != 7])
    rig.publish_offer()
    dl = rig.download(give_up_s=2.0, rerequest_s=0.5)
    with pytest.raises(TransferError) as failed:
        dl.run(threading.Event())
    sha = rig.offer.sha256
    assert f"offer for {sha} never completed: 31/32 chunks after 2 s" in str(failed.value)
    assert "[7]" in str(failed.value)
    assert dl.stats.rerequests >= 1
    assert rig.link.transfer_topics == frozenset()
    with ChunkStore.open(rig.transfers, rig.offer, max_bytes=BIG) as partial:
        assert partial.missing() == [7]


def test_no_offer_at_all_fails_after_give_up(rig: Rig) -> None:
    dl = rig.download(give_up_s=1.0)
    meta = rig.tree.bundle_meta(rig.offer.sha256)
    with pytest.raises(TransferError, match=f"no offer published on {meta} after 1 s"):
        dl.run(threading.Event())


def test_an_offer_for_another_model_is_refused(rig: Rig) -> None:
    rig.publish_chunks(range(32))
    rig.publish_offer(rig.offer.model_copy(update={"model_id": "cats"}))
    dl = rig.download()
    meta = rig.tree.bundle_meta(rig.offer.sha256)
    with pytest.raises(
        TransferError, match=f"offer on {meta} says model 'cats', the command says 'digits-ee'"
    ):
        dl.run(threading.Event())
    assert not (rig.transfers / rig.offer.sha256).exists()  # nothing fetched for it
    assert rig.link.transfer_topics == frozenset()


def test_an_offer_withdrawn_mid_download_fails(rig: Rig) -> None:
    rig.publish_chunks(range(10))
    rig.publish_offer()
    dl = rig.download()
    cancel = threading.Event()
    pool, future = _in_thread(dl, cancel)
    try:
        wait_until(lambda: dl.stats.chunks_written == 10, 20, "the first 10 chunks")
        rig.coordinator.publish(rig.tree.bundle_meta(rig.offer.sha256), b"", retain=True)
        with pytest.raises(TransferError, match=r"withdrawn .* with 10/32 chunks fetched"):
            future.result(timeout=20)
    finally:
        cancel.set()
        pool.shutdown()


def test_a_second_download_fetches_only_what_the_first_did_not(rig: Rig) -> None:
    """A cancelled (or killed) download leaves verified chunks; the next asks for the rest."""
    rig.publish_chunks(range(20))
    rig.publish_offer()
    first = rig.download()
    cancel = threading.Event()
    pool, future = _in_thread(first, cancel)
    try:
        wait_until(lambda: first.stats.chunks_written == 20, 20, "the first 20 chunks")
        cancel.set()
        with pytest.raises(TransferCancelled):
            future.result(timeout=10)
    finally:
        cancel.set()
        pool.shutdown()
    assert rig.link.transfer_topics == frozenset()
    rig.publish_chunks(range(20, 32))
    second = rig.download()
    assert second.run(threading.Event()).read_bytes() == rig.data
    assert second.stats.chunks_written == 12
    assert second.stats.chunks_received == 12  # not one of the 20 it already had
