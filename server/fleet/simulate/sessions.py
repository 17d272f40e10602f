"""The simulated devices' MQTT sessions, as `agent/link.py` keeps them, all on one loop thread.

Each connection is a fresh paho client (client id = device id, MQTT 5, no session kept across
connections) whose Last Will is that connection's birth with online=False; on CONNACK the
retained birth goes out, the device subscribes to its cmd topic (and its group's) and its
backlog replays from the head. A loss schedules a reconnect with backoff; a graceful stop
publishes the offline statuses and sends DISCONNECT, so no will fires. Commands arriving on a
session are answered by the device (`SimDevice.answer`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.agent.protocol import encode, offline_will

from .backlog import Entry
from .config import SimConfig
from .device import DeviceState, SimDevice
from .scheduling import ConnectPacer
from .selector import PahoSelector

log = logging.getLogger(__name__)

# Per device; the agent uses 64, but 16 stays under the Receive Maximum of strict brokers (20 by
# default on many) with room for the birth, and is plenty on loopback (acks take ~1 ms).
MAX_INFLIGHT: Final = 16
KEEPALIVE_S: Final = 60
# paho's TCP connect blocks the loop; short, so an unreachable host stalls it little.
CONNECT_TIMEOUT_S: Final = 2.0
CONNACK_TIMEOUT_S: Final = 10.0
STOP_PUBACK_S: Final = 5.0  # a graceful stop waits this long for the offline statuses' PUBACKs
STOP_DISCONNECT_S: Final = 3.0  # ... and this long for the broker to close the connections

Phase = Literal["new", "running", "draining", "disconnecting", "done"]


class Sessions:
    """Opens, keeps, feeds and closes every device's connection; loop thread only."""

    def __init__(self, cfg: SimConfig, devices: Sequence[SimDevice], pacer: ConnectPacer) -> None:
        self.cfg = cfg
        self.devices = devices
        self.pacer = pacer
        self.io = PahoSelector(self.lost)
        self.phase: Phase = "new"
        self._phase_deadline = 0.0
        self.connecting: set[SimDevice] = set()
        self.to_pump: set[SimDevice] = set()  # devices with backlog to hand to paho
        self.last_error: str | None = None  # last connection error, for the start timeout
        self.started_at = 0.0
        self._all_connected_logged = False

    # -- connecting --------------------------------------------------------------------

    def connect_due(self, now: float) -> None:
        """Open the connections that are due, as the pacer allows."""
        for position in self.pacer.due(now, lambda: len(self.connecting), self._ready):
            self._open(self.devices[position], now)

    def _ready(self, position: int) -> bool:
        dev = self.devices[position]
        return dev.state == "waiting" and dev.client is None

    def _open(self, dev: SimDevice, now: float) -> None:
        """One connection attempt with a fresh paho client (no state from older connections)."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dev.device_id,
            protocol=mqtt.MQTTv5,
            userdata=dev,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        if self.cfg.passwords is not None:
            client.username_pw_set(dev.device_id, self.cfg.passwords[dev.device_id])
        client.max_inflight_messages_set(0)  # we limit in-flight ourselves (MAX_INFLIGHT)
        # The will is exactly this connection's birth with online=False (agent/link.py).
        birth = dev.session_birth = dev.birth()
        client.will_set(dev.topics["status"], encode(offline_will(birth)), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.io.attach(client)
        dev.client = client
        dev.state = "connecting"
        dev.connect_started = now
        self.connecting.add(dev)
        try:
            # clean_start: like the agent (paho's default plus no session expiry), the broker
            # keeps no session between connections; what was in flight replays from the backlog.
            client.connect(self.cfg.host, self.cfg.port, keepalive=KEEPALIVE_S, clean_start=True)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.io.forget(client)
            dev.client = None
            self.connecting.discard(dev)
            dev.state = "waiting"
            dev.retry_delay = self.pacer.retry(dev.position, dev.retry_delay, now)
            self.pacer.failed(now)
            log.debug("%s: connect failed: %s", dev.device_id, exc)

    def misc(self, now: float) -> None:
        """Keepalive pings and handshake timeouts."""
        for dev in self.devices:
            client = dev.client
            if client is None:
                continue
            if dev.state == "connecting" and now - dev.connect_started > CONNACK_TIMEOUT_S:
                log.warning("%s: no CONNACK within %.0f s", dev.device_id, CONNACK_TIMEOUT_S)
                self.lost(dev, "CONNACK timeout")
                continue
            try:
                client.loop_misc()
            except Exception:
                log.exception("%s: keepalive handling failed", dev.device_id)
                if dev.client is client:
                    self.lost(dev, "internal error")

    # -- losing ------------------------------------------------------------------------

    def drop(self, dev: SimDevice, state: DeviceState) -> None:
        """Forget dev's connection (the broker sees the socket close) and set its state."""
        was_online = dev.state == "online"
        if dev.client is not None:
            self.io.forget(dev.client)
        dev.client = None  # its late callbacks now fail the identity check
        dev.backlog.disconnected()
        self.connecting.discard(dev)
        self.to_pump.discard(dev)
        dev.state = state
        if was_online:
            dev.disconnected_at = time.monotonic()

    def lost(self, dev: SimDevice, why: str) -> None:
        """An unexpected loss: forget the connection and reconnect later."""
        if dev.state == "online":
            log.warning(
                "%s disconnected (%s), %d messages in backlog", dev.device_id, why, len(dev.backlog)
            )
        self.drop(dev, "waiting")
        if self.phase == "running":
            dev.retry_delay = self.pacer.retry(dev.position, dev.retry_delay, time.monotonic())
        else:
            dev.state = "stopped"

    # -- sending -----------------------------------------------------------------------

    def pump_all(self) -> None:
        """Hand every marked device's queued backlog to paho."""
        to_pump, self.to_pump = self.to_pump, set()
        for dev in to_pump:
            self._pump(dev)

    def _pump(self, dev: SimDevice) -> None:
        """In order, keeping at most MAX_INFLIGHT unacknowledged."""
        client = dev.client
        if client is None or dev.state != "online":
            return
        topics = dev.topics

        def publish(entry: Entry) -> int | None:
            info = client.publish(topics[entry.kind], entry.payload, qos=1)
            return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

        dev.backlog.send(publish, MAX_INFLIGHT)

    def republish_birth(self, dev: SimDevice) -> None:
        """Publish dev's retained status again (another model runs), as agent/link.py does.

        The current connection's Last Will keeps the status it was connected with (MQTT has
        no way to change it); the next connection's will is made from the new birth.
        """
        if dev.client is None or self.phase != "running":
            return  # the next connect publishes it; a stopping device publishes offline
        birth = dev.session_birth = dev.birth()
        if dev.state == "online":
            dev.client.publish(dev.topics["status"], encode(birth), qos=1, retain=True)
            log.info("%s published its status again: %s", dev.device_id, dev.model_label())

    # -- paho callbacks (loop thread); the identity checks ignore discarded clients ---------

    def _on_connect(
        self,
        client: mqtt.Client,
        dev: SimDevice,
        _flags: mqtt.ConnectFlags,
        rc: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if dev.client is not client:
            return
        self.connecting.discard(dev)
        if rc.is_failure:
            self.last_error = f"broker refused {dev.device_id}: {rc}"
            log.error("%s: broker refused the connection: %s", dev.device_id, rc)
            self.lost(dev, str(rc))
            return
        first = dev.connects == 0
        dev.connects += 1
        dev.retry_delay = 0.0
        self.pacer.succeeded()
        dev.state = "online"
        birth = dev.session_birth or dev.birth()
        client.publish(dev.topics["status"], encode(birth), qos=1, retain=True)
        # As the agent: retain-as-published, so a command that arrives retained (stale, or
        # published retained by someone) is recognised and never run (docs/protocol.md).
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        subs = [(dev.topics["cmd"], opts)]
        if dev.group_topic:
            subs.append((dev.group_topic, opts))
        client.subscribe(subs)
        dev.backlog.replay()
        self.to_pump.add(dev)
        if first:
            log.debug("%s connected", dev.device_id)
        else:
            away = (
                f" after {time.monotonic() - dev.disconnected_at:.1f} s"
                if dev.disconnected_at is not None
                else ""
            )
            log.info(
                "%s reconnected%s, replaying %d windows (%d messages)",
                dev.device_id,
                away,
                dev.backlog.windows,
                len(dev.backlog),
            )
        if not self._all_connected_logged and all(d.connects for d in self.devices):
            self._all_connected_logged = True
            log.info(
                "all %d simulated devices connected in %.1f s",
                len(self.devices),
                time.monotonic() - self.started_at,
            )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        dev: SimDevice,
        flags: mqtt.DisconnectFlags,
        rc: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if dev.client is not client:
            return
        if self.phase in ("draining", "disconnecting"):
            self.drop(dev, "stopped")
            return
        # paho reports a dropped socket as "Unspecified error"; say what happened.
        self.lost(dev, f"broker: {rc}" if flags.is_disconnect_packet_from_server else "lost")

    def _on_publish(
        self, client: mqtt.Client, dev: SimDevice, mid: int, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if dev.client is not client:
            return
        if not dev.backlog.ack(mid):
            if mid == dev.stop_mid:
                dev.stop_mid = None
            return  # the birth, or something not tracked
        if rc.is_failure:  # nothing to gain from resending what the broker refuses
            log.warning("%s: broker refused a message: %s", dev.device_id, rc)
        self.to_pump.add(dev)

    def _on_message(self, client: mqtt.Client, dev: SimDevice, msg: mqtt.MQTTMessage) -> None:
        if dev.client is not client:
            return
        if msg.retain:
            log.warning("%s: ignored a retained command on %s", dev.device_id, msg.topic)
            return
        dev.answer(msg.topic, bytes(msg.payload))

    # -- stopping ------------------------------------------------------------------------

    def begin_stop(self, graceful: bool) -> None:
        """Graceful: offline statuses first (then stop_progress); otherwise drop every socket."""
        if not graceful:
            for dev in self.devices:
                self.drop(dev, "stopped")
            self.phase = "done"
            log.info("simulator stopped: %d connections dropped (wills fire)", len(self.devices))
            return
        for dev in self.devices:
            client = dev.client
            if dev.state == "online" and client is not None:
                info = client.publish(
                    dev.topics["status"], encode(dev.birth(online=False)), qos=1, retain=True
                )
                dev.stop_mid = info.mid
            else:
                self.drop(dev, "stopped")
        self.phase = "draining"
        self._phase_deadline = time.monotonic() + STOP_PUBACK_S

    def stop_progress(self, now: float) -> None:
        """Graceful stop: wait for the offline statuses' PUBACKs, then DISCONNECT everyone."""
        if self.phase == "draining":
            waiting = any(d.stop_mid is not None and d.client is not None for d in self.devices)
            if waiting and now < self._phase_deadline:
                return
            for dev in self.devices:
                if dev.client is not None:
                    dev.client.disconnect()
            self.phase = "disconnecting"
            self._phase_deadline = now + STOP_DISCONNECT_S
            return
        if any(d.client is not None for d in self.devices) and now < self._phase_deadline:
            return
        for dev in self.devices:
            self.drop(dev, "stopped")
        self.phase = "done"
        log.info("simulator stopped gracefully (%d devices)", len(self.devices))
