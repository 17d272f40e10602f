"""Lossless telemetry ingestion: MQTT 5 shared subscriptions in, one store transaction per batch.

Why it cannot lose a message:
* The session is persistent (clean_start False, a session expiry), so while this coordinator
  is down the broker queues what its subscriptions match and delivers it on reconnect.
* Acks are manual: a QoS 1 message is acknowledged only after the batch holding it was
  committed. A crash between commit and ack makes the broker deliver it again, and the
  store's (device_id, seq) key turns that into a counted duplicate, not a second row.
* Decoding and writing happen on a writer thread that takes whatever accumulated (up to
  batch_max), so the network thread only appends to a queue and never stalls: a slow
  consumer would make mosquitto drop QoS 1 messages once max_queued_messages is reached.
  With writer_url, that work moves to a child process (see writer.py), on another core.
* Only an unavailable store makes a batch wait (unacked, retried). A message the store refuses
  for good is rejected alone and the rest of its batch stored (store/isolate.py), so no single
  message, however extreme, can stop ingestion for the others (issue 12).

Shared subscriptions are opt-in (share_group): mosquitto 2.0 restores a persistent session's
plain subscriptions from its persistence file after a broker restart but not its shared ones,
so until the coordinator reconnects and subscribes again, what devices publish is queued for
nobody. One coordinator with plain subscriptions loses nothing across broker restarts; several
coordinators with a share group split the load and carry that window (it shows as lost seqs).

Device statuses are subscribed without $share by every coordinator: status is state, not a
log, so each coordinator applying it is idempotent, and mosquitto (2.0) hands retained
messages to shared subscribers unevenly.

Federated updates (fed/+/update/+) take the same path as telemetry, shared like it: decoded by
the writer, stored in the batch's transaction against their round (store/fed.py), acked after
the commit. The round engine reads them from the store; an update for no known round, a stale,
late or duplicate one is counted here and logged in one line naming the device and topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.protocol import DEFAULT_ROOT, Reply, TopicTree
from edgefleet.agent.protocol.topics import DeviceKind
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.writer import (
    ProcessWriter,
    StoreWriteError,
    ThreadWriter,
    Writer,
    Written,
)

log = logging.getLogger(__name__)

_SHARED_KINDS: tuple[DeviceKind, ...] = ("telemetry", "events")
# Replies go to every coordinator: the one whose command waits for them may not be the one a
# shared subscription would pick. Storing them is idempotent (command id, device id).
_EVERY_COORDINATOR: tuple[DeviceKind, ...] = ("status", "reply")


class IngestConfig(BaseModel):
    """Where to read from and how to batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    root: str = DEFAULT_ROOT
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Stable across restarts (the session is persistent); None: the service "
        "picks this installation's id (see fleet/client_id.py) before the Ingestor starts.",
    )
    share_group: str | None = Field(
        None,
        description="Coordinators with the same share group split the device traffic (MQTT 5 "
        "shared subscriptions); None: this coordinator subscribes to all of it.",
    )
    username: str | None = Field(None, description="This coordinator's broker identity.")
    password: str | None = Field(None, description="Its password (edgefleet fleet provision).")
    tls_ca: str | None = Field(
        None,
        description="CA certificate (PEM) that signed the broker's: connect over TLS and verify "
        "the broker; None: plain TCP (the secure broker's loopback listener on the same host).",
    )
    session_expiry_s: int = Field(
        7 * 24 * 3600, ge=0, description="How long the broker queues for us while we are down."
    )
    batch_max: int = Field(1000, ge=1, le=100_000)
    batch_wait_s: float = Field(
        0.05, ge=0, le=5, description="How long a batch may wait to fill before it is written."
    )
    registration_open: bool = Field(True, description="Register unknown devices on first sight.")
    keepalive_s: int = Field(30, ge=5, le=3600)


@dataclass
class IngestStats:
    """Counters since this ingestor started."""

    received: int = 0
    batches: int = 0
    telemetry_inserted: int = 0
    telemetry_duplicates: int = 0
    events_inserted: int = 0
    events_duplicates: int = 0
    statuses: int = 0
    replies: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    unregistered: int = 0
    id_conflicts: int = 0
    clock_skewed: int = 0
    store_errors: int = 0
    fed_received: int = 0
    # Federated updates not taken into their round, by reason (unknown_round, stale, ...).
    fed_ignored: Counter[str] = field(default_factory=Counter)
    # (window end on the device, seconds from then to its commit here), newest last.
    lags: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=200_000))


@dataclass(frozen=True)
class _Raw:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float


class Ingestor:
    """One coordinator's MQTT consumer writing into a Store."""

    def __init__(self, cfg: IngestConfig, store: Store, *, writer_url: str | None = None) -> None:
        """store serves reads (commands); writes go through it too unless writer_url is given,
        in which case a child process opens that store URL and does decoding and writing."""
        if cfg.client_id is None:
            # paho would make up an id per connection, and the persistent session would go.
            raise ValueError("IngestConfig.client_id is required (see fleet/client_id.py)")
        self.cfg = cfg
        self.store = store
        self.tree = TopicTree(cfg.root)
        # The writer process starts here, not in start(): it takes a second or two to import.
        self._writer: Writer = (
            ThreadWriter(store, cfg.root, cfg.registration_open)
            if writer_url is None
            else ProcessWriter(writer_url, cfg.root, cfg.registration_open)
        )
        self.stats = IngestStats()
        self.connected = threading.Event()  # connected and subscribed (SUBACK received)
        self._subscribe_mid: int | None = None
        self._queue: deque[_Raw] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listeners: list[_ReplyListener] = []
        self._write_thread = threading.Thread(
            target=self._write_loop, name="ingest-writer", daemon=True
        )
        self.connects = 0  # broker sessions so far: a new one may have lost retained messages
        # Messages under {root}/bundle/ (the rollout engine checking its own retained offers)
        # go here instead of the store; None drops them.
        self.on_bundle: Callable[[str, bytes], None] | None = None
        self._bundle_prefix = f"{self.tree.root}/bundle/"
        self.client = self._make_client()

    # -- MQTT -----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls_ca:
            client.tls_set(ca_certs=self.cfg.tls_ca)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        # Unacked messages wait for their batch's commit; a small window would throttle us.
        props.ReceiveMaximum = 65535
        return props

    def _subscriptions(self) -> list[tuple[str, int]]:
        subs = [(self.tree.all_devices(kind), 1) for kind in _EVERY_COORDINATOR]
        group = self.cfg.share_group
        shared = [self.tree.all_devices(kind) for kind in _SHARED_KINDS]
        shared.append(self.fed_updates_filter)
        subs += [(TopicTree.shared(group, f) if group else f, 1) for f in shared]
        return subs

    @property
    def fed_updates_filter(self) -> str:
        """Every device's update of every federated round: {root}/fed/+/update/+."""
        return f"{self.tree.root}/fed/+/update/+"

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: object,
        _props: object,
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker %s:%s refused %s: %s", self.cfg.host, self.cfg.port,
                      self.cfg.client_id, reason)
            return
        # Subscribing again on a resumed session is harmless and covers an expired one.
        _rc, self._subscribe_mid = client.subscribe(self._subscriptions())
        self.connects += 1
        log.info(
            "coordinator %s connected to %s:%s (session %s), ingesting %s/dev/+",
            self.cfg.client_id,
            self.cfg.host,
            self.cfg.port,
            "resumed" if flags.session_present else "new",
            self.cfg.root,
        )

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, mid: int, _codes: object, _p: object
    ) -> None:
        # Connected means subscribed: before the SUBACK, a message another client publishes
        # may reach the broker ahead of the SUBSCRIBE and never be routed to a new session.
        if mid == self._subscribe_mid:
            self.connected.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, reason: object, _p: object
    ) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("coordinator %s lost the broker %s:%s (%s); reconnecting",
                        self.cfg.client_id, self.cfg.host, self.cfg.port, reason)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(self._bundle_prefix):
            self.client.ack(msg.mid, msg.qos)
            handler = self.on_bundle
            if handler is not None:
                handler(msg.topic, bytes(msg.payload))
            return
        # Network thread: only enqueue. Decoding and the store happen on the writer.
        raw = _Raw(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.time())
        with self._cond:
            self._queue.append(raw)
            if len(self._queue) >= self.cfg.batch_max:
                self._cond.notify()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and start writing; paho retries while the broker is away."""
        self.client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self.client.loop_start()
        self._write_thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what was received, ack it, then disconnect keeping the session."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._write_thread.join(timeout)
        self._writer.close()
        self.client.disconnect()
        self.client.loop_stop()

    def kill(self) -> None:
        """Drop the connection without writing what is queued (tests: a crashing coordinator)."""
        self._stop.set()
        with self._cond:
            self._queue.clear()
            self._cond.notify()
        self._write_thread.join(5)
        self._writer.close()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self.client.loop_stop()

    # -- writing --------------------------------------------------------------------------

    def _take(self) -> list[_Raw]:
        with self._cond:
            if len(self._queue) < self.cfg.batch_max and not self._stop.is_set():
                self._cond.wait(self.cfg.batch_wait_s)
            n = min(len(self._queue), self.cfg.batch_max)
            return [self._queue.popleft() for _ in range(n)]

    def _write_loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            raws = self._take()
            if raws:
                self._write(raws)
            elif stopping:
                return

    def _write(self, raws: list[_Raw]) -> None:
        try:
            written = self._writer.write([(r.topic, r.payload, r.received_at) for r in raws])
        except StoreWriteError as exc:  # the store is unavailable: keep the messages, retry
            self.stats.store_errors += 1
            # What was committed before the failure is acked; only the rest waits.
            done = exc.done.size if exc.done is not None else 0
            if exc.done is not None:
                self._committed(raws[:done], exc.done)
            log.error("store write of %d messages failed, retrying: %s", len(raws) - done, exc)
            with self._cond:
                self._queue.extendleft(reversed(raws[done:]))
            time.sleep(1.0)
            return
        self._committed(raws, written)

    def _committed(self, raws: list[_Raw], written: Written) -> None:
        for raw in raws:
            if raw.qos > 0:
                self.client.ack(raw.mid, raw.qos)
        self._account(written)
        for reply in written.replies:
            for listener in list(self._listeners):
                listener.offer(reply)

    def _account(self, w: Written) -> None:
        s, outcome = self.stats, w.outcome
        s.received += w.size
        s.batches += 1
        s.telemetry_inserted += outcome.telemetry_inserted
        s.telemetry_duplicates += outcome.telemetry_duplicates
        s.events_inserted += outcome.events_inserted
        s.events_duplicates += outcome.events_duplicates
        s.statuses += w.statuses
        s.replies += len(w.replies)
        s.unregistered += outcome.unregistered
        s.clock_skewed += outcome.clock_skewed
        s.id_conflicts += len(outcome.id_conflicts)
        s.fed_received += outcome.fed_received
        s.rejects.update(w.rejects)
        s.lags.extend(w.lags)
        new = outcome.devices_registered
        if len(new) <= 3:
            for device in new:
                log.info("registered device %s on first sight", device)
        else:  # a fleet coming up at once: one line, not hundreds
            log.info("registered %d devices on first sight: %s ... %s", len(new), new[0], new[-1])
        for device in outcome.id_conflicts:
            log.warning("device %s: two agents claim this id (a replaced boot_id came back)",
                        device)
        for ig in outcome.fed_ignored:
            s.fed_ignored[ig.reason] += 1
            log.info("ignored %s federated update from %s on %s: %s", ig.reason, ig.device_id,
                     self.tree.fed_update(ig.round_id, ig.device_id), ig.detail)

    # -- replies --------------------------------------------------------------------------

    def listen_replies(self) -> _ReplyListener:
        """Collect replies this coordinator ingests; close() it when done."""
        listener = _ReplyListener(self)
        self._listeners.append(listener)
        return listener


class _ReplyListener:
    """Replies seen by one ingestor while a command waits for them."""

    def __init__(self, owner: Ingestor) -> None:
        self._owner = owner
        self._cond = threading.Condition()
        self.replies: dict[tuple[str, str], Reply] = {}

    def offer(self, reply: Reply) -> None:
        with self._cond:
            self.replies[(reply.id, reply.device_id)] = reply
            self._cond.notify_all()

    def wait(self, command_id: str, devices: set[str], timeout: float) -> dict[str, Reply]:
        """Replies to command_id from these devices, as many as came before the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {d: r for (cid, d), r in self.replies.items() if cid == command_id}
                left = deadline - time.monotonic()
                if devices <= got.keys() or left <= 0:
                    return got
                self._cond.wait(left)

    def close(self) -> None:
        if self in self._owner._listeners:
            self._owner._listeners.remove(self)
