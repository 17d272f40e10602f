"""Fetching one bundle archive from the broker's retained chunks, through a sliding window.

The coordinator publishes an archive once, retained, QoS 1: chunk i on
`bundle/{sha256}/chunk/{i}` and the `BundleOffer` on `bundle/{sha256}/meta`. A device does NOT
subscribe to `bundle/{sha256}/chunk/+`: the broker would then queue the whole archive for each
device at once, and send every chunk again after each reconnect. Instead it subscribes to the
meta topic, then to a window of W (default 8) individual missing chunk topics. Each retained
chunk arrives once per subscription; when it has arrived (and its hash matched), its topic is
unsubscribed and the next missing chunk subscribed. So:

* the broker holds at most W chunks in flight per device, whatever the archive size;
* a slow link is its own flow control: the next chunk is asked for only when one is in;
* resuming is subscribing to what is missing: the partial file is re-hashed on open
  (agent/update/chunks.py), and after a reconnect the link subscribes the window again.

A window chunk that has not arrived `rerequest_s` after it was asked for (counted only while
connected) is asked for again: unsubscribe then subscribe, which makes the broker send the
retained message again. A chunk that arrives with the wrong length or hash is counted, logged
and never written; its topic stays subscribed (a corrected retained publish arrives on it at
once) and it is re-requested after `rerequest_s`, never in a tight loop against a broker that
holds bad bytes. No new chunk for `give_up_s` fails the download with a TransferError naming
the counts, and the partial file stays for the next install command to resume. An empty
retained payload on the meta topic (the coordinator cleared the offer) before the archive is
complete fails it as "offer withdrawn".

`Download.run` blocks the caller's thread (the low-priority update thread); messages come from
paho's network thread through `on_message`, which only enqueues.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from edgefleet.agent.protocol import BundleOffer, ProtocolError, TopicTree, decode
from edgefleet.agent.update.chunks import ChunkError, ChunkStore, TransferError

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8
PROGRESS_EVERY_S = 1.0
_TICK_S = 0.2  # how often timers are looked at while no message arrives


class TransferCancelled(Exception):
    """The caller cancelled the download; the partial file stays for a later resume."""


class TransferLink(Protocol):
    """What a download needs from the device's MQTT link (edgefleet.agent.link.Link)."""

    def transfer_subscribe(self, topics: list[str]) -> None: ...

    def transfer_unsubscribe(self, topics: list[str]) -> None: ...

    @property
    def connected(self) -> threading.Event: ...


@dataclass(frozen=True)
class Expect:
    """What the install command says the archive must be; the offer must agree."""

    sha256: str
    model_id: str
    version: int
    manifest_sha256: str
    kind: Literal["full", "delta"] = "full"
    base_manifest_sha256: str | None = None


@dataclass
class TransferStats:
    """Counters of one download, for events and for tests."""

    chunks_received: int = 0  # chunk messages that arrived, good, bad or duplicate
    chunks_written: int = 0
    duplicates: int = 0
    bad_chunks: int = 0
    rerequests: int = 0
    bad_offers: int = 0


class Download:
    """One archive download over a TransferLink; `run` it in a thread that may wait."""

    def __init__(
        self,
        link: TransferLink,
        tree: TopicTree,
        transfers_dir: Path,
        expect: Expect,
        *,
        max_bytes: int,
        window: int = DEFAULT_WINDOW,
        rerequest_s: float = 20.0,
        give_up_s: float = 600.0,
        on_progress: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.link = link
        self.tree = tree
        self.transfers_dir = transfers_dir
        self.expect = expect
        self.max_bytes = max_bytes
        self.window = window
        self.rerequest_s = rerequest_s
        self.give_up_s = give_up_s
        self.on_progress = on_progress
        self.clock = clock
        self.stats = TransferStats()
        self.meta_topic = tree.bundle_meta(expect.sha256)
        self._chunk_prefix = self.meta_topic[: -len("meta")] + "chunk/"
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._subscribed: set[str] = set()

    # -- network thread -----------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """Take a message under bundle/ (thread-safe, never blocks); others' are ignored."""
        if topic == self.meta_topic or topic.startswith(self._chunk_prefix):
            self._inbox.put((topic, payload))

    # -- caller's thread ----------------------------------------------------------------

    def run(self, cancel: threading.Event) -> Path:
        """Fetch the archive; return the path of the complete, whole-hash-checked file.

        Raises TransferError (naming the sha, the chunk counts and why) or TransferCancelled.
        Every topic it subscribed is unsubscribed on the way out.
        """
        try:
            offer = self._wait_offer(cancel)
            store = ChunkStore.open(self.transfers_dir, offer, max_bytes=self.max_bytes)
            try:
                return self._fetch(store, cancel)
            finally:
                store.close()
        finally:
            if self._subscribed:
                self.link.transfer_unsubscribe(sorted(self._subscribed))
                self._subscribed.clear()

    def _subscribe(self, topics: list[str]) -> None:
        self._subscribed.update(topics)
        self.link.transfer_subscribe(topics)

    def _unsubscribe(self, topics: list[str]) -> None:
        self._subscribed.difference_update(topics)
        self.link.transfer_unsubscribe(topics)

    def _next(self, cancel: threading.Event) -> tuple[str, bytes] | None:
        if cancel.is_set():
            raise TransferCancelled(f"download of bundle archive {self.expect.sha256} cancelled")
        try:
            return self._inbox.get(timeout=_TICK_S)
        except queue.Empty:
            return None

    def _wait_offer(self, cancel: threading.Event) -> BundleOffer:
        """Subscribe to the meta topic and wait for a valid offer that matches the command."""
        sha = self.expect.sha256
        self._subscribe([self.meta_topic])
        started = asked = self.clock()
        while True:
            msg = self._next(cancel)
            now = self.clock()
            if msg is None:
                if not self.link.connected.is_set():
                    asked = now  # the link subscribes again on reconnect
                elif now - asked >= self.rerequest_s:
                    self._rerequest([self.meta_topic])
                    asked = now
                if now - started >= self.give_up_s:
                    raise TransferError(
                        f"no offer published on {self.meta_topic} after {self.give_up_s:g} s"
                        + self._offline_note()
                    )
                continue
            topic, payload = msg
            if topic != self.meta_topic:
                continue  # a chunk from a subscription of an earlier attempt
            if not payload:
                continue  # a live clear of an offer we never saw: still nothing offered
            offer = decode(BundleOffer, payload, topic=topic)
            if isinstance(offer, ProtocolError):
                self.stats.bad_offers += 1
                raise TransferError(f"offer for {sha} is invalid: {offer.message}")
            self._check_offer(offer)
            log.info(
                "transfer %s: offer of model %s v%d, %d bytes in %d chunks",
                sha,
                offer.model_id,
                offer.version,
                offer.size,
                offer.chunk_count,
            )
            return offer

    def _check_offer(self, offer: BundleOffer) -> None:
        expect = self.expect
        where = f"offer on {self.meta_topic}"
        for field, said, wanted in (
            ("sha256", offer.sha256, expect.sha256),
            ("model", offer.model_id, expect.model_id),
            ("version", offer.version, expect.version),
            ("manifest sha256", offer.manifest_sha256, expect.manifest_sha256),
            ("kind", offer.kind, expect.kind),
            ("base manifest sha256", offer.base_manifest_sha256, expect.base_manifest_sha256),
        ):
            if said != wanted:
                self.stats.bad_offers += 1
                raise TransferError(f"{where} says {field} {said!r}, the command says {wanted!r}")

    def _fetch(self, store: ChunkStore, cancel: threading.Event) -> Path:
        """Move the window over the missing chunks until all are in, then complete the file."""
        sha = store.offer.sha256
        pending = deque(store.missing())
        asked: dict[int, float] = {}  # window: chunk index -> when it was (re)requested

        def fill() -> None:
            new: list[int] = []
            while pending and len(asked) < self.window:
                index = pending.popleft()
                if not store.has(index):
                    new.append(index)
                    asked[index] = self.clock()
            if new:
                self._subscribe([self.tree.bundle_chunk(sha, i) for i in new])

        fill()
        last_progress = self.clock()
        last_report = float("-inf")
        reported = -1
        while asked:
            msg = self._next(cancel)
            now = self.clock()
            if msg is not None:
                topic, payload = msg
                if topic == self.meta_topic:
                    self._on_meta_again(store, payload)
                elif self._on_chunk(store, topic, payload, asked):
                    last_progress = now
                    fill()
            if store.have_count != reported and now - last_report >= PROGRESS_EVERY_S:
                self._progress(store)
                reported, last_report = store.have_count, now
            if not self.link.connected.is_set():
                # Offline: nothing can arrive, and the reconnect subscribes the window again.
                for index in asked:
                    asked[index] = now
            else:
                late = [i for i, t in asked.items() if now - t >= self.rerequest_s]
                if late:
                    self._rerequest([self.tree.bundle_chunk(sha, i) for i in late])
                    for index in late:
                        asked[index] = now
            if now - last_progress >= self.give_up_s:
                raise TransferError(
                    f"offer for {sha} never completed: {store.have_count}/{store.total} chunks "
                    f"after {self.give_up_s:g} s without a new chunk (waiting for chunks "
                    f"{sorted(asked)[:8]}; {self.stats.bad_chunks} bad chunks refused)"
                    + self._offline_note()
                )
        path = store.complete()
        self._progress(store)
        return path

    def _on_chunk(
        self, store: ChunkStore, topic: str, payload: bytes, asked: dict[int, float]
    ) -> bool:
        """Handle one chunk message; True when it was new and written."""
        self.stats.chunks_received += 1
        suffix = topic[len(self._chunk_prefix) :]
        if not suffix.isdigit() or str(int(suffix)) != suffix:
            log.warning(
                "transfer %s: ignoring message on unexpected topic %s", store.offer.sha256, topic
            )
            return False
        index = int(suffix)
        try:
            written = store.put(index, payload)
        except ChunkError as exc:
            self.stats.bad_chunks += 1
            log.warning("transfer: refused chunk on %s: %s", topic, exc)
            if index in asked:
                asked[index] = self.clock()  # re-requested after rerequest_s unless fixed live
            return False
        if index in asked:
            del asked[index]
            self._unsubscribe([topic])
        if not written:
            self.stats.duplicates += 1
            return False
        self.stats.chunks_written += 1
        return True

    def _on_meta_again(self, store: ChunkStore, payload: bytes) -> None:
        """The meta topic spoke again: the same offer (a reconnect), withdrawn, or another."""
        sha = store.offer.sha256
        if not payload:
            raise TransferError(
                f"offer for {sha} withdrawn (empty retained payload on {self.meta_topic}) "
                f"with {store.have_count}/{store.total} chunks fetched"
            )
        offer = decode(BundleOffer, payload, topic=self.meta_topic)
        if isinstance(offer, ProtocolError):
            self.stats.bad_offers += 1
            log.warning("transfer %s: ignoring invalid offer repeat: %s", sha, offer.message)
            return
        if offer != store.offer:
            # Same sha names the same bytes, but the chunk layout may differ: the store was
            # opened against the old one, so start again from a fresh run.
            raise TransferError(
                f"offer for {sha} changed during the download "
                f"(chunk_size {store.offer.chunk_size} -> {offer.chunk_size}); "
                f"{store.have_count}/{store.total} chunks fetched, retry the install"
            )

    def _rerequest(self, topics: list[str]) -> None:
        """Unsubscribe then subscribe: the broker sends each retained message again."""
        self.stats.rerequests += len(topics)
        log.info(
            "transfer %s: re-requesting %d topic(s), first %s",
            self.expect.sha256,
            len(topics),
            topics[0],
        )
        self.link.transfer_unsubscribe(topics)
        self.link.transfer_subscribe(topics)

    def _progress(self, store: ChunkStore) -> None:
        if self.on_progress is not None:
            self.on_progress(store.have_count, store.total)

    def _offline_note(self) -> str:
        return "" if self.link.connected.is_set() else "; the broker is unreachable"
