"""The device's MQTT link: birth and Last Will, commands in, outbox-backed QoS 1 out.

Telemetry, events and replies are written to the on-disk outbox first and acknowledged there
only on PUBACK, so a broker outage or an agent restart loses nothing: after reconnect the
outbox is replayed from its head, in order (at least once; sequence numbers make duplicates
visible). Results are QoS 0 and skip the outbox: a stale result is worth nothing.

Bundle transfers (agent/update/fetch.py) subscribe to individual `bundle/` topics through
`transfer_subscribe`; the link keeps that set and subscribes it again after every reconnect
(the broker forgets a session's subscriptions), and hands each message under `bundle/` to
`on_transfer` instead of the command queue.

With `on_fed_task` set before start, the link also subscribes to every round's retained task
(`fed/+/task`) and hands each one, and each clearing, to it; `publish_fed_update` sends a
round's update (QoS 1). Keeping and resending updates is agent/federated/worker.py's job.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.agent.config import MqttConfig, TlsConfig
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.protocol import Status, TopicTree, encode, offline_will

log = logging.getLogger(__name__)

# MQTT 5 reason 142 "Session taken over": another client connected with our client id.
SESSION_TAKEN_OVER = 142
TAKEOVER_BACKOFF_S = 300  # how long a device whose session was taken over stays away
# A connection the broker drops within this many seconds counts as short; after each short
# one the reconnect wait doubles (up to TAKEOVER_BACKOFF_S) instead of starting again at 1 s.
SHORT_CONNECTION_S = 30.0
MAX_INFLIGHT = 64


class TlsSetupError(ValueError):
    """The configured TLS files cannot be used; the message names the key and the file."""


def apply_tls(client: mqtt.Client, tls: TlsConfig) -> None:
    """Load the CA (and client certificate) into the client, naming what is wrong if not.

    ssl's own errors do not say which file they came from ("[X509] no certificate or crl
    found"), so each file is first checked for being readable, under its config key.
    """
    for key, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
        if path is None:
            continue
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise TlsSetupError(f"mqtt.tls.{key} {path}: {exc.strerror}") from None
    try:
        client.tls_set(
            ca_certs=str(tls.ca),
            certfile=str(tls.cert) if tls.cert else None,
            keyfile=str(tls.key) if tls.key else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    except (ssl.SSLError, ValueError, OSError) as exc:
        files = ", ".join(str(p) for p in (tls.ca, tls.cert, tls.key) if p is not None)
        raise TlsSetupError(f"mqtt.tls ({files}): not usable: {exc}") from None


class Link:
    """One paho client per device; thread-safe `send` for the inference loop."""

    def __init__(
        self,
        device_id: str,
        group: str | None,
        cfg: MqttConfig,
        outbox: Outbox,
        birth: Callable[[], Status],
        on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
        takeover_backoff_s: int = TAKEOVER_BACKOFF_S,
    ) -> None:
        self.device_id = device_id
        self.takeover_backoff_s = takeover_backoff_s
        self.group = group
        self.cfg = cfg
        self.tree = TopicTree(cfg.topic_root)
        self.outbox = outbox
        self.birth = birth
        self.on_event = on_event or (lambda kind, msg, details: None)
        # (topic, payload, retained): the loop ignores a command that arrived retained.
        self.commands: queue.Queue[tuple[str, bytes, bool]] = queue.Queue(maxsize=256)
        self.connected = threading.Event()
        self.takeovers = 0
        self.short_drops = 0  # broker-dropped connections in a row that lasted < 30 s
        self._connected_at: float | None = None
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox entry id
        self._queued: set[int] = set()  # outbox ids published on this connection
        # mids acknowledged before the drainer recorded them, with when; QoS 0 results land here
        # too, so entries expire long before paho's 16-bit mids could come round again.
        self._early_acks: dict[int, float] = {}
        # Transfer topics (bundle meta and chunk windows) to hold across reconnects.
        self._transfer_topics: set[str] = set()
        self._bundle_prefix = f"{self.tree.root}/bundle/"
        # Called on paho's network thread for every message under bundle/: must only enqueue.
        self.on_transfer: Callable[[str, bytes], None] | None = None
        # Called on paho's network thread with each retained keys/trust document (fleet keys).
        self.on_keys: Callable[[bytes], None] | None = None
        # Set before start() to take part in federated rounds: called on paho's network
        # thread with (topic, payload) of every retained fed/{round}/task message, the empty
        # payload of a closed round included; must only enqueue.
        self.on_fed_task: Callable[[str, bytes], None] | None = None
        self._fed_prefix = f"{self.tree.root}/fed/"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain_loop, name="outbox-drain", daemon=True)
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        # The client id is the device id: a second process with the same id would make the
        # two kick each other off forever, so the agent also holds a local lock (see service).
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-{self.device_id}",
            protocol=mqtt.MQTTv5,
        )
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls is not None:
            apply_tls(client, self.cfg.tls)
        status_topic = self.tree.device(self.device_id, "status")
        client.will_set(status_topic, encode(offline_will(self.birth())), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho retries with backoff while the broker is away."""
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        self._drainer.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish the offline status, disconnect cleanly; unsent messages stay in the outbox."""
        self._stop.set()
        self._wake.set()
        if self.connected.is_set():
            info = self.client.publish(
                self.tree.device(self.device_id, "status"),
                encode(offline_will(self.birth())),
                qos=1,
                retain=True,
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        self._drainer.join(timeout)

    # -- sending ------------------------------------------------------------------------

    def send(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        """Durably queue a QoS 1 message of this kind (telemetry, events, reply)."""
        topic = self.tree.device(self.device_id, kind)  # type: ignore[arg-type]
        self.outbox.put(topic, payload, qos=1, retain=retain, kind=kind)
        self._wake.set()

    def republish_birth(self) -> None:
        """Publish the retained status again (a new model runs); the next connect does it too.

        The Last Will keeps the status of the connect it was set at: it is set again here for
        the next connection, so an offline device is shown with the model it last ran.
        """
        status = self.birth()
        self.client.will_set(
            self.tree.device(self.device_id, "status"),
            encode(offline_will(status)),
            qos=1,
            retain=True,
        )
        if self.connected.is_set():
            self.client.publish(
                self.tree.device(self.device_id, "status"), encode(status), qos=1, retain=True
            )

    def publish_result(self, payload: bytes) -> None:
        """QoS 0, only while connected: results are ephemeral."""
        if self.connected.is_set():
            self.client.publish(self.tree.device(self.device_id, "results"), payload, qos=0)

    def publish_fed_update(self, round_id: str, payload: bytes) -> bool:
        """Publish a round's update (QoS 1) now; False when not connected.

        Not through the outbox: the federated worker keeps the update on disk itself and
        publishes it again each time the round's retained task arrives (every reconnect)
        until the round ends, which also covers a broker that lost it after its PUBACK.
        """
        if not self.connected.is_set():
            return False
        topic = self.tree.fed_update(round_id, self.device_id)
        info = self.client.publish(topic, payload, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # -- bundle transfers ---------------------------------------------------------------

    def transfer_subscribe(self, topics: list[str]) -> None:
        """Subscribe (QoS 1) to these bundle topics now if connected, and after each reconnect."""
        with self._lock:
            new = [t for t in dict.fromkeys(topics) if t not in self._transfer_topics]
            self._transfer_topics.update(new)
        # Outside the lock: paho may call back into code that takes it (see _drain_once).
        if new and self.connected.is_set():
            self.client.subscribe([(t, SubscribeOptions(qos=1)) for t in new])

    def transfer_unsubscribe(self, topics: list[str]) -> None:
        """Stop receiving these bundle topics (and forget them for reconnects)."""
        with self._lock:
            gone = [t for t in dict.fromkeys(topics) if t in self._transfer_topics]
            self._transfer_topics.difference_update(gone)
        if gone and self.connected.is_set():
            self.client.unsubscribe(gone)

    @property
    def transfer_topics(self) -> frozenset[str]:
        """The bundle topics held now (subscribed, or to subscribe on connect)."""
        with self._lock:
            return frozenset(self._transfer_topics)

    def _resubscribe_transfers(self, client: mqtt.Client, subscribed: set[str]) -> None:
        """After connect: catch up with transfer topics added or dropped while subscribing.

        A topic added after the snapshot but before `connected` was set found the link
        offline and was not subscribed by its caller; one dropped after the snapshot may have
        been subscribed again by us. A topic subscribed twice only brings a duplicate that the
        download ignores.
        """
        with self._lock:
            late = sorted(self._transfer_topics - subscribed)
            dropped = sorted(subscribed - self._transfer_topics)
        if late:
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in late])
        if dropped:
            client.unsubscribe(dropped)

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if self.connected.is_set():
                try:
                    self._drain_once()
                except Exception:  # the drain thread must never die; the outbox keeps all
                    log.exception("outbox drain failed; will retry")

    def _drain_once(self) -> None:
        # paho calls on_publish while holding its own message lock, so client.publish must
        # never run under self._lock (that order deadlocks); bookkeeping alone is locked.
        with self._lock:
            room = MAX_INFLIGHT - len(self._inflight)
            if room <= 0:
                return
            queued = set(self._queued)
        head = self.outbox.peek(room + len(queued))
        for entry in [e for e in head if e.id not in queued][:room]:
            if not self.connected.is_set():
                return
            info = self.client.publish(
                entry.topic, entry.payload, qos=entry.qos, retain=entry.retain
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # not connected after all; the entry stays queued in the outbox
            with self._lock:
                self._queued.add(entry.id)
                seen_at = self._early_acks.pop(info.mid, None)
                if seen_at is not None and time.monotonic() - seen_at < 5:  # PUBACK came first
                    acked = True
                else:
                    self._inflight[info.mid] = entry.id
                    acked = False
            if acked:
                self.outbox.ack([entry.id])
                with self._lock:
                    self._queued.discard(entry.id)

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            log.error(
                "broker %s:%s refused device %s: %s",
                self.cfg.host,
                self.cfg.port,
                self.device_id,
                rc,
            )
            return
        with self._lock:
            # A new connection: whatever was in flight is re-sent from the outbox, in order.
            self._inflight.clear()
            self._queued.clear()
            self._early_acks.clear()
            transfers = set(self._transfer_topics)
        status = self.tree.device(self.device_id, "status")
        client.publish(status, encode(self.birth()), qos=1, retain=True)
        # retainAsPublished: a command published retained keeps its retain flag on the way to
        # us too, not only when the broker replays it at subscription, so the agent can refuse
        # every retained command, live or stale (docs/protocol.md, "Correlation ids").
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        subs = [(self.tree.device(self.device_id, "cmd"), opts)]
        if self.group:
            subs.append((self.tree.group_cmd(self.group), opts))
        # The fleet's key trust statements: retained, so each connect brings the current list.
        subs.append((self.tree.keys_trust(), SubscribeOptions(qos=1)))
        if self.on_fed_task is not None:
            # Retained: each connect brings every open round's task (docs/protocol.md).
            subs.append((self.tree.all_fed_tasks(), SubscribeOptions(qos=1)))
        client.subscribe(subs)
        if transfers:
            # Resume: the broker sends each retained chunk again on the new subscription.
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in sorted(transfers)])
        self._connected_at = time.monotonic()
        self.connected.set()
        self._resubscribe_transfers(client, transfers)
        log.info("device %s connected to %s:%s", self.device_id, self.cfg.host, self.cfg.port)
        self._wake.set()

    def _on_disconnect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.connected.clear()
        lived = time.monotonic() - self._connected_at if self._connected_at is not None else None
        self._connected_at = None
        if not self._stop.is_set():
            self._pace_reconnects(client, lived)
        if rc.value == SESSION_TAKEN_OVER:
            self.takeovers += 1
            # Yield instead of taking the session straight back: two devices sharing an id
            # would otherwise kick each other off every second, and neither would report.
            # The newer connection keeps the session; this one retries after the backoff,
            # with everything it produces meanwhile kept in the outbox.
            wait = self.takeover_backoff_s
            client.reconnect_delay_set(min_delay=wait, max_delay=wait)
            msg = (
                f"another client connected as device {self.device_id} (duplicate device id?); "
                f"yielding the session for {wait} s"
            )
            log.error(msg)
            self.on_event("error", msg, {"reason": "session_taken_over", "backoff_s": wait})
        elif not self._stop.is_set():
            log.warning(
                "device %s disconnected from %s:%s: %s",
                self.device_id,
                self.cfg.host,
                self.cfg.port,
                rc,
            )

    def _pace_reconnects(self, client: mqtt.Client, lived: float | None) -> None:
        """Back off further after each connection the broker drops soon after accepting it.

        paho starts its reconnect wait again at 1 s after every accepted connection, so a
        connection that is accepted and then dropped (a second device with this id, which
        mosquitto 2.0 reports as a plain socket close rather than "session taken over"; an
        ACL that refuses our first publish) would repeat every second forever. Short-lived
        connections in a row double the wait up to TAKEOVER_BACKOFF_S; the third is an event.
        """
        if lived is None:
            return  # never got connected: paho's own backoff (1 s .. 30 s) applies
        if lived >= SHORT_CONNECTION_S:
            self.short_drops = 0
            client.reconnect_delay_set(min_delay=1, max_delay=30)
            return
        self.short_drops += 1
        wait = min(self.takeover_backoff_s, 2**self.short_drops)
        client.reconnect_delay_set(min_delay=wait, max_delay=wait)
        if self.short_drops == 3:
            msg = (
                f"device {self.device_id}: the broker dropped 3 connections in a row within "
                f"{SHORT_CONNECTION_S:.0f} s of accepting them (another client with this "
                "device id? an ACL refusing this device?); reconnecting ever more slowly"
            )
            log.error(msg)
            self.on_event("error", msg, {"reason": "connection_flapping"})

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, _rc: ReasonCode, _p: Properties | None
    ) -> None:
        with self._lock:
            entry_id = self._inflight.pop(mid, None)
            if entry_id is None:
                now = time.monotonic()
                self._early_acks[mid] = now
                if len(self._early_acks) > 256:
                    self._early_acks = {m: t for m, t in self._early_acks.items() if now - t < 5}
                return
        self.outbox.ack([entry_id])
        with self._lock:
            self._queued.discard(entry_id)
        self._wake.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(self._bundle_prefix):
            handler = self.on_transfer
            if handler is None:
                log.debug("no transfer running; dropping message on %s", msg.topic)
                return
            try:
                handler(msg.topic, bytes(msg.payload))
            except Exception:  # a bug in a download must not kill paho's network thread
                log.exception("transfer handler failed on %s", msg.topic)
            return
        if msg.topic == self.tree.keys_trust():
            if self.on_keys is not None and msg.payload:  # empty: the document was cleared
                try:
                    self.on_keys(bytes(msg.payload))
                except Exception:  # a bug there must not kill paho's network thread
                    log.exception("key trust handler failed on %s", msg.topic)
            return
        if msg.topic.startswith(self._fed_prefix):
            fed = self.on_fed_task
            if fed is not None and msg.topic.endswith("/task"):
                try:
                    fed(msg.topic, bytes(msg.payload))
                except Exception:  # a bug there must not kill paho's network thread
                    log.exception("federated task handler failed on %s", msg.topic)
            return
        try:
            self.commands.put_nowait((msg.topic, bytes(msg.payload), bool(msg.retain)))
        except queue.Full:
            log.warning("command queue full; dropping command on %s", msg.topic)
