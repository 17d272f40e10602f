"""Publish a bundle archive once as retained MQTT chunks, and delete it again (protocol.md,
"Bundle transfer").

Order is the contract: every chunk retained at QoS 1 first, the offer on bundle/{sha}/meta
last, so an offer a device can see implies its chunks are on the broker; clearing goes the
other way round (the offer first), so no device starts on an offer whose chunks are going.

Memory stays bounded whatever the archive's size (up to 900 MiB): the file is read chunk by
chunk and at most max_in_flight chunks wait for their PUBACK, instead of handing paho the
whole archive to queue. A PUBACK that carries an MQTT 5 failure reason (the broker's ACL
refusing bundle/#) is an error, not a success.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.protocol import TopicTree
from edgefleet.agent.protocol.transfer import MAX_CHUNK_SIZE, MAX_CHUNKS, BundleOffer

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_IN_FLIGHT = 16


class PublishError(Exception):
    """Publishing or clearing a bundle failed; the message names the archive and the chunk."""


@dataclass(frozen=True)
class PublishReport:
    """What publish() or clear() sent: payload bytes and messages (chunks plus the offer)."""

    bytes_published: int
    messages: int


def choose_chunk_size(size: int) -> int:
    """64 KiB, or the smallest larger power of two that keeps the count within MAX_CHUNKS."""
    if size < 1:
        raise PublishError(f"an archive of {size} bytes cannot be offered (at least 1 byte)")
    chunk = DEFAULT_CHUNK_SIZE
    while -(-size // chunk) > MAX_CHUNKS:
        chunk *= 2
    if chunk > MAX_CHUNK_SIZE:
        raise PublishError(
            f"an archive of {size} bytes needs more than {MAX_CHUNKS} chunks of "
            f"{MAX_CHUNK_SIZE} bytes (limit {MAX_CHUNKS * MAX_CHUNK_SIZE} bytes)"
        )
    return chunk


def _chunks(archive: Path, chunk_size: int) -> Iterator[bytes]:
    with archive.open("rb") as fh:
        while data := fh.read(chunk_size):
            yield data


def make_offer(
    archive: Path,
    *,
    model_id: str,
    version: int,
    manifest_sha256: str,
    kind: Literal["full", "delta"] = "full",
    base_manifest_sha256: str | None = None,
    chunk_size: int | None = None,
) -> BundleOffer:
    """The offer of an archive: its sha256, size and every chunk's sha256 (one pass over it)."""
    size = archive.stat().st_size
    if chunk_size is None:
        chunk_size = choose_chunk_size(size)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE or -(-size // chunk_size) > MAX_CHUNKS:
        raise PublishError(
            f"{archive}: chunk size {chunk_size} for {size} bytes; it must be at most "
            f"{MAX_CHUNK_SIZE} and give at most {MAX_CHUNKS} chunks"
        )
    whole = hashlib.sha256()
    digests: list[str] = []
    read = 0
    for data in _chunks(archive, chunk_size):
        whole.update(data)
        digests.append(hashlib.sha256(data).hexdigest())
        read += len(data)
    if read != size:
        raise PublishError(f"{archive} changed size while it was read ({size} -> {read} bytes)")
    return BundleOffer(
        sha256=whole.hexdigest(),
        model_id=model_id,
        version=version,
        manifest_sha256=manifest_sha256,
        kind=kind,
        base_manifest_sha256=base_manifest_sha256,
        size=size,
        chunk_size=chunk_size,
        chunk_sha256=digests,
        created_ts=time.time(),
    )


class _Acks:
    """Publishes with at most `limit` unacknowledged; PUBACK failure reasons are caught.

    paho marks a message published on any PUBACK, whatever its reason code, so the client's
    on_publish is wrapped for the duration (and the original still called).
    """

    def __init__(self, client: mqtt.Client, limit: int, timeout_s: float, what: str) -> None:
        self._client = client
        self._limit = max(1, limit)
        self._timeout_s = timeout_s
        self._what = what
        self._pending: deque[tuple[mqtt.MQTTMessageInfo, str]] = deque()
        self._failed: dict[int, str] = {}
        self._lock = threading.Lock()
        self._previous: Callable[..., Any] | None = client.on_publish

    def __enter__(self) -> _Acks:
        self._client.on_publish = self._on_publish
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.on_publish = self._previous

    def _on_publish(self, *args: Any) -> None:
        # VERSION2: (client, userdata, mid, reason_code, properties); VERSION1: 3 arguments.
        if len(args) >= 4 and isinstance(args[3], ReasonCode) and args[3].is_failure:
            with self._lock:
                self._failed[int(args[2])] = str(args[3])
        if self._previous is not None:
            self._previous(*args)

    def send(self, topic: str, payload: bytes, name: str) -> None:
        """Publish retained at QoS 1, first waiting while `limit` others are unacknowledged."""
        while len(self._pending) >= self._limit:
            self._wait_oldest()
        info = self._client.publish(topic, payload, qos=1, retain=True)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            raise PublishError(
                f"{self._what}: {name} on {topic} could not be sent: {mqtt.error_string(info.rc)}"
            )
        self._pending.append((info, name))

    def drain(self) -> None:
        """Wait for every outstanding PUBACK."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        info, name = self._pending.popleft()
        try:
            info.wait_for_publish(self._timeout_s)
            done = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"{self._what}: {name} was not published: {exc}") from exc
        if not done:
            raise PublishError(
                f"{self._what}: no PUBACK for {name} within {self._timeout_s:g} s "
                "(broker unreachable or stalled)"
            )
        with self._lock:
            reason = self._failed.pop(info.mid, None)
        if reason is not None:
            raise PublishError(f"{self._what}: the broker refused {name}: {reason}")


def publish(
    client: mqtt.Client,
    tree: TopicTree,
    archive: Path,
    offer: BundleOffer,
    timeout_s: float = 30.0,
    *,
    max_in_flight: int = DEFAULT_IN_FLIGHT,
) -> PublishReport:
    """Every chunk retained, then the offer; returns once the broker acknowledged all of them.

    timeout_s bounds each wait for a PUBACK (no progress for that long is an error), so a
    900 MiB archive on a slow link is not cut off by a total deadline. Each chunk is checked
    against the offer's digest as it is read: an archive that changed since make_offer is
    refused rather than published with an offer that does not match.
    """
    what = f"bundle {offer.sha256[:12]}"
    started = time.monotonic()
    sent_bytes = 0
    with _Acks(client, max_in_flight, timeout_s, what) as acks:
        count = 0
        for index, data in enumerate(_chunks(archive, offer.chunk_size)):
            if index >= offer.chunk_count or len(data) != offer.chunk_length(index):
                raise PublishError(
                    f"{what}: {archive} is not the archive of the offer (chunk {index})"
                )
            if hashlib.sha256(data).hexdigest() != offer.chunk_sha256[index]:
                raise PublishError(
                    f"{what}: chunk {index} of {archive} does not match the offer's sha256 "
                    "(the archive changed since the offer was made)"
                )
            acks.send(tree.bundle_chunk(offer.sha256, index), data, f"chunk {index}")
            sent_bytes += len(data)
            count += 1
        if count != offer.chunk_count:
            raise PublishError(
                f"{what}: {archive} has {count} chunks, the offer {offer.chunk_count}"
            )
        acks.drain()  # every chunk is on the broker before the offer appears
        meta = offer.model_dump_json().encode()
        acks.send(tree.bundle_meta(offer.sha256), meta, "the offer")
        acks.drain()
    log.info(
        "published bundle %s (%s v%d, %d bytes in %d chunks) in %.1f s",
        offer.sha256,
        offer.model_id,
        offer.version,
        sent_bytes,
        count,
        time.monotonic() - started,
    )
    return PublishReport(bytes_published=sent_bytes + len(meta), messages=count + 1)


def clear(
    client: mqtt.Client,
    tree: TopicTree,
    offer: BundleOffer,
    timeout_s: float = 30.0,
    *,
    max_in_flight: int = DEFAULT_IN_FLIGHT,
) -> PublishReport:
    """Delete the retained offer, then every chunk (an empty retained payload deletes one)."""
    what = f"clearing bundle {offer.sha256[:12]}"
    with _Acks(client, max_in_flight, timeout_s, what) as acks:
        acks.send(tree.bundle_meta(offer.sha256), b"", "the offer")
        acks.drain()  # no device may see the offer once its chunks start to go
        for index in range(offer.chunk_count):
            acks.send(tree.bundle_chunk(offer.sha256, index), b"", f"chunk {index}")
        acks.drain()
    log.info("cleared bundle %s (%d chunks)", offer.sha256, offer.chunk_count)
    return PublishReport(bytes_published=0, messages=offer.chunk_count + 1)
