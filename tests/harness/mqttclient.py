"""A real MQTT 5 client that remembers what the broker answered: CONNACK, PUBACK, SUBACK codes.

Brokers drop unauthorised traffic silently at the MQTT 3 level; MQTT 5 reason codes (QoS 1) are
what lets an ACL test assert a refusal instead of inferring it from silence.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until

TIMEOUT_S = 15.0


class Client:
    """One connection as `username` (None: anonymous), over TLS when ca is given."""

    def __init__(
        self,
        broker: MosquittoBroker,
        username: str | None,
        password: str | None = None,
        *,
        ca: Path | None = None,
        client_id: str = "",
    ) -> None:
        self._lock = threading.Lock()
        self.connack: ReasonCode | None = None
        self.disconnect: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self._acks: dict[int, ReasonCode | list[ReasonCode]] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        port = broker.tls_port if ca is not None else broker.port
        assert port is not None
        self.client.connect(broker.host, port, keepalive=10)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, TIMEOUT_S, f"CONNACK for {username}")

    @property
    def accepted(self) -> bool:
        """The broker accepted the connection and has not dropped it since."""
        return self.connack is not None and not self.connack.is_failure and self.disconnect is None

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.disconnect = rc

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._lock:
            self._acks[mid] = rc

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        with self._lock:
            self._acks[mid] = rcs

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _ack(self, mid: int, what: str) -> ReasonCode | list[ReasonCode]:
        wait_until(lambda: mid in self._acks, TIMEOUT_S, what)
        with self._lock:
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        ack = self._ack(info.mid, f"PUBACK for {topic}")
        assert isinstance(ack, ReasonCode)
        return ack

    def subscribe(self, topic_filter: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK's reason code."""
        _rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        ack = self._ack(mid, f"SUBACK for {topic_filter}")
        assert isinstance(ack, list)
        return ack[0]

    def topics(self) -> list[str]:
        """Topics of the messages received so far."""
        with self._lock:
            return [t for t, _ in self.messages]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
