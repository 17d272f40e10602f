"""Decode received messages and write them to the store: in a thread, or in a child process.

The MQTT network thread and the decode + store work compete for one interpreter lock when
they share a process. On a small coordinator the child-process writer puts them on two
cores: the parent only receives and acks, the child validates and commits. Both writers
return the same Written summary, so the ingestor acks and counts the same way.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import Protocol

from edgefleet.agent.protocol import (
    Event,
    ProtocolError,
    Reply,
    Status,
    Telemetry,
    TopicError,
    TopicTree,
    decode,
)
from edgefleet.agent.protocol.codec import TOPIC_PAYLOADS
from edgefleet.server.fleet.gc_tuning import tune_gc
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import (
    EventIn,
    IngestBatch,
    IngestOutcome,
    Reject,
    RejectReason,
    ReplyIn,
    StatusIn,
    Store,
    TelemetryIn,
)

log = logging.getLogger(__name__)

# A received message: topic, payload, when it arrived (Unix seconds).
RawMessage = tuple[str, bytes, float]

_REASONS: dict[str, RejectReason] = {
    "too_large": "oversized",
    "unknown_topic": "invalid_topic",
}
# How long a reject reason stays quiet in the log after it was logged (it is still counted).
_LOG_EVERY_S = 10.0


class StoreWriteError(RuntimeError):
    """The store refused the batch; the messages must stay unacked and be retried."""


@dataclass
class Written:
    """What one committed batch did, for acks, counters and waiting commands."""

    outcome: IngestOutcome
    size: int
    statuses: int
    committed: float
    replies: list[Reply] = field(default_factory=list)
    rejects: list[RejectReason] = field(default_factory=list)
    # (window end on the device, seconds until the commit) per stored window.
    lags: list[tuple[float, float]] = field(default_factory=list)


class Decoder:
    """Topic + bytes -> validated payload, or a reject naming what was wrong."""

    def __init__(self, root: str) -> None:
        self.tree = TopicTree(root)
        # A fleet has a bounded set of topics; parsing each once saves its id checks.
        self._parse = lru_cache(maxsize=65_536)(self.tree.parse)
        self._last_logged: dict[str, float] = {}

    def build_batch(self, raws: list[RawMessage]) -> IngestBatch:
        batch = IngestBatch()
        for topic, payload, received_at in raws:
            msg = self._decode(topic, payload, received_at, batch)
            if isinstance(msg, Telemetry):
                batch.telemetry.append(TelemetryIn(received_at, msg, payload.decode()))
            elif isinstance(msg, Status):
                batch.statuses.append(StatusIn(received_at, msg))
            elif isinstance(msg, Event):
                batch.events.append(EventIn(received_at, msg))
            elif isinstance(msg, Reply):
                batch.replies.append(ReplyIn(received_at, msg))
        return batch

    def _decode(
        self, topic: str, payload: bytes, received_at: float, batch: IngestBatch
    ) -> Telemetry | Status | Event | Reply | None:
        try:
            parsed = self._parse(topic)
        except TopicError as exc:
            self._reject(batch, topic, received_at, None, "invalid_topic", str(exc))
            return None
        kind = TOPIC_PAYLOADS.get(parsed.kind)
        if kind not in ("status", "telemetry", "events", "reply"):
            self._reject(batch, topic, received_at, parsed.device_id, "invalid_topic",
                         f"topic {topic!r} is not one a device publishes")
            return None
        msg = decode(kind, payload, topic=topic)
        if isinstance(msg, ProtocolError):
            reason = _REASONS.get(msg.reason, "invalid_payload")
            self._reject(batch, topic, received_at, parsed.device_id, reason, msg.message)
            return None
        if not isinstance(msg, Telemetry | Status | Event | Reply):
            return None
        if msg.device_id != parsed.device_id:
            self._reject(
                batch, topic, received_at, parsed.device_id, "device_mismatch",
                f"payload device_id {msg.device_id!r} differs from the topic's "
                f"{parsed.device_id!r}",
            )
            return None
        return msg

    def _reject(
        self, batch: IngestBatch, topic: str, received_at: float, device: str | None,
        reason: RejectReason, detail: str,
    ) -> None:
        batch.rejects.append(Reject(received_at, topic, device, reason, detail[:1000]))
        now = time.monotonic()
        # One warning per reason every few seconds: a flood of garbage must not flood the log.
        if now - self._last_logged.get(reason, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[reason] = now
            log.warning("rejected %s from %s (%s): %s", topic, device or "?", reason, detail)


def write_batch(
    decoder: Decoder, store: Store, raws: list[RawMessage], registration_open: bool
) -> Written:
    """Decode and commit one batch; StoreWriteError when the store fails."""
    batch = decoder.build_batch(raws)
    try:
        outcome = store.ingest(batch, registration_open=registration_open)
    except Exception as exc:
        raise StoreWriteError(str(exc) or type(exc).__name__) from exc
    committed = time.time()
    return Written(
        outcome=outcome,
        size=len(batch),
        statuses=len(batch.statuses),
        committed=committed,
        replies=[r.reply for r in batch.replies],
        rejects=[r.reason for r in batch.rejects],
        lags=[(t.telemetry.window_end, committed - t.telemetry.window_end)
              for t in batch.telemetry],
    )


class Writer(Protocol):
    def write(self, raws: list[RawMessage]) -> Written: ...

    def close(self) -> None: ...


class ThreadWriter:
    """Decode and write in the calling thread, into a store object."""

    def __init__(self, store: Store, root: str, registration_open: bool) -> None:
        self.store = store
        self.decoder = Decoder(root)
        self.registration_open = registration_open

    def write(self, raws: list[RawMessage]) -> Written:
        return write_batch(self.decoder, self.store, raws, self.registration_open)

    def close(self) -> None:
        pass


def _child(conn: Connection, store_url: str, root: str, registration_open: bool) -> None:
    """The writer process: receive batches, answer each with Written or an error string."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(store_url)
    decoder = Decoder(root)
    tune_gc()
    conn.send("ready")
    try:
        while True:
            try:
                raws = conn.recv()
            except EOFError:
                return
            if raws is None:
                return
            try:
                conn.send(write_batch(decoder, store, raws, registration_open))
            except StoreWriteError as exc:
                conn.send(str(exc))
    finally:
        store.close()


class ProcessWriter:
    """Decode and write in a child process with its own store connection."""

    def __init__(self, store_url: str, root: str, registration_open: bool) -> None:
        self.args = (store_url, root, registration_open)
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, *self.args),
                                name="ingest-writer", daemon=True)
        self.proc.start()
        child_conn.close()
        if not self.conn.poll(60) or self.conn.recv() != "ready":
            raise StoreWriteError("the ingest writer process did not start")

    def write(self, raws: list[RawMessage]) -> Written:
        with self._lock:
            try:
                self.conn.send(raws)
                answer = self.conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                log.error("ingest writer process died (%s); starting a new one", exc)
                self.proc.join(1)
                self._start()
                raise StoreWriteError("writer process died") from exc
        if isinstance(answer, str):
            raise StoreWriteError(answer)
        assert isinstance(answer, Written)
        return answer

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
