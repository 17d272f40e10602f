"""Watch a fleet's traffic: decode every device message and print one line per message."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.protocol import (
    Event,
    ProtocolError,
    Reply,
    Result,
    Status,
    Telemetry,
    TopicTree,
    decode_topic,
)
from edgefleet.agent.protocol.codec import Message
from edgefleet.agent.protocol.topics import DEVICE_KINDS

log = logging.getLogger(__name__)


def describe(msg: Message) -> str:
    """One human line for a decoded message."""
    if isinstance(msg, Status):
        state = "online" if msg.online else "offline"
        return f"status {msg.device_id} {state} model={msg.model_id}@{msg.model_version}"
    if isinstance(msg, Telemetry):
        energy = (
            f" {msg.power_w:.1f}W {msg.energy_per_frame_mj:.0f}mJ/frame ({msg.power_source})"
            if msg.power_w is not None and msg.energy_per_frame_mj is not None
            else ""
        )
        return (
            f"telemetry {msg.device_id} seq={msg.seq} fps={msg.fps:.1f} "
            f"p95={msg.latency_ms.p95:.2f}ms exits={msg.exit_histogram}{energy}"
        )
    if isinstance(msg, Result):
        return f"result {msg.device_id} frame={msg.frame_index} {msg.label} ({msg.confidence:.2f})"
    if isinstance(msg, Event):
        return f"event {msg.device_id} #{msg.seq} {msg.kind} {msg.level}: {msg.message}"
    if isinstance(msg, Reply):
        return f"reply {msg.device_id} id={msg.id} ok={msg.ok} {msg.error or ''}".rstrip()
    return f"{type(msg).__name__}"


class Listener:
    """Subscribes to every device topic; counts valid and rejected messages by kind."""

    def __init__(self, host: str, port: int, tree: TopicTree, out: Callable[[str], None]) -> None:
        self.tree = tree
        self.out = out
        self.counts: Counter[str] = Counter()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker %s:%s refused the connection: %s", self.host, self.port, rc)
            return
        kinds = [k for k in DEVICE_KINDS if k != "cmd"]
        client.subscribe([(self.tree.all_devices(k), 1) for k in kinds])
        log.info(
            "connected to %s:%s, listening under %s/dev/+", self.host, self.port, self.tree.root
        )
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, msg.topic, bytes(msg.payload))
        if isinstance(decoded, ProtocolError):
            self.counts["rejected"] += 1
            log.warning("rejected %s: %s", msg.topic, decoded)
            return
        self.counts[type(decoded).__name__] += 1
        self.out(describe(decoded))

    def run(self, stop: threading.Event) -> None:
        """Connect (retrying in the background) and print until stop is set."""
        self.client.connect_async(self.host, self.port)
        self.client.loop_start()
        try:
            stop.wait()
        finally:
            self.client.loop_stop()
            self.client.disconnect()
