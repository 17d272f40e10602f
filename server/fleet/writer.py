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
    FedUpdate,
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
    FedUpdateIn,
    IngestOutcome,
    Reject,
    RejectReason,
    ReplyIn,
    StatusIn,
    Store,
    TelemetryIn,
)
from edgefleet.server.fleet.store.isolate import (
    Isolated,
    IsolationStopped,
    Item,
    ingest_isolating,
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
    """The store cannot write now; the messages after `done` must stay unacked and be retried.

    done is what was committed before the failure (a prefix of the batch, see store/isolate.py),
    None when nothing was.
    """

    def __init__(self, message: str, done: Written | None = None) -> None:
        super().__init__(message)
        self.done = done


@dataclass
class Written:
    """What one committed batch did, for acks, counters and waiting commands."""

    outcome: IngestOutcome
    size: int  # messages committed: the first `size` of the batch
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

    def items(self, raws: list[RawMessage]) -> list[Item]:
        """One item per received message, in order: what to store, or why it was rejected."""
        return [self._item(topic, payload, received_at) for topic, payload, received_at in raws]

    def _item(self, topic: str, payload: bytes, received_at: float) -> Item:
        try:
            parsed = self._parse(topic)
        except TopicError as exc:
            return self._reject(topic, received_at, None, "invalid_topic", str(exc))
        kind = TOPIC_PAYLOADS.get(parsed.kind)
        if kind not in ("status", "telemetry", "events", "reply", "fed_update"):
            return self._reject(
                topic,
                received_at,
                parsed.device_id,
                "invalid_topic",
                f"topic {topic!r} is not one a device publishes",
            )
        msg = decode(kind, payload, topic=topic)
        if isinstance(msg, ProtocolError):
            reason = _REASONS.get(msg.reason, "invalid_payload")
            return self._reject(topic, received_at, parsed.device_id, reason, msg.message)
        if not isinstance(msg, Telemetry | Status | Event | Reply | FedUpdate):
            return self._reject(
                topic,
                received_at,
                parsed.device_id,
                "invalid_topic",
                f"topic {topic!r} does not carry a device's message",
            )
        if msg.device_id != parsed.device_id:
            return self._reject(
                topic,
                received_at,
                parsed.device_id,
                "device_mismatch",
                f"payload device_id {msg.device_id!r} differs from the topic's "
                f"{parsed.device_id!r}",
            )
        if isinstance(msg, FedUpdate):
            if msg.round_id != parsed.round_id:
                return self._reject(
                    topic,
                    received_at,
                    parsed.device_id,
                    "invalid_payload",
                    f"payload round_id {msg.round_id!r} differs from the topic's "
                    f"{parsed.round_id!r}",
                )
            return FedUpdateIn(received_at, msg, payload.decode())
        if isinstance(msg, Telemetry):
            return TelemetryIn(received_at, msg, payload.decode())
        if isinstance(msg, Status):
            return StatusIn(received_at, msg)
        if isinstance(msg, Event):
            return EventIn(received_at, msg)
        return ReplyIn(received_at, msg)

    def _reject(
        self,
        topic: str,
        received_at: float,
        device: str | None,
        reason: RejectReason,
        detail: str,
    ) -> Reject:
        reject = Reject(received_at, topic, device, reason, detail[:1000])
        now = time.monotonic()
        # One warning per reason every few seconds: a flood of garbage must not flood the log.
        if now - self._last_logged.get(reason, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[reason] = now
            log.warning("rejected %s from %s (%s): %s", topic, device or "?", reason, detail)
        return reject


def write_batch(
    decoder: Decoder, store: Store, raws: list[RawMessage], registration_open: bool
) -> Written:
    """Decode and commit one batch; StoreWriteError when the store is unavailable.

    Messages the store refuses for good are rejected as 'unstorable' and the rest is stored
    (store/isolate.py), so only an unavailable store makes the batch wait.
    """
    items = decoder.items(raws)
    try:
        done = ingest_isolating(store, items, registration_open=registration_open)
    except IsolationStopped as stopped:
        partial = _summary(stopped.done) if stopped.done.committed else None
        raise StoreWriteError(str(stopped), partial) from stopped.cause
    return _summary(done)


def _summary(done: Isolated) -> Written:
    committed = time.time()
    stored = done.stored
    return Written(
        outcome=done.outcome(),
        size=done.committed,
        statuses=sum(isinstance(i, StatusIn) for i in stored),
        committed=committed,
        replies=[i.reply for i in stored if isinstance(i, ReplyIn)],
        rejects=[i.reason for i in stored if isinstance(i, Reject)]
        + [r.reason for r in done.refused],
        lags=[
            (i.telemetry.window_end, committed - i.telemetry.window_end)
            for i in stored
            if isinstance(i, TelemetryIn)
        ],
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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
                conn.send((str(exc), exc.done))
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
        self.proc = ctx.Process(
            target=_child, args=(child_conn, *self.args), name="ingest-writer", daemon=True
        )
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
        if isinstance(answer, tuple):
            message, done = answer
            raise StoreWriteError(message, done)
        assert isinstance(answer, Written)
        return answer

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
