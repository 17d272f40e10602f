"""Run the real agent process against a real broker, and watch what it publishes."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.agent.bundle import Metrics
from edgefleet.agent.protocol import (
    Event,
    ProtocolError,
    Reply,
    Status,
    Telemetry,
    TopicTree,
    decode_topic,
)
from edgefleet.server.bundles.plain import plain_body, write_plain_bundle
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.localbroker import MosquittoBroker
from edgefleet.server.reference import MODEL_PATH, VIDEO_PATH, reference_preprocessing

DIGITS = [str(i) for i in range(10)]


def reference_bundle(root: Path) -> tuple[Path, FleetKey]:
    """A signed one-stage bundle of the reference model, and the key that signed it."""
    key, _ = init_key(root / "keys")
    body = plain_body(
        MODEL_PATH,
        model_id="mnist-cnn",
        version=1,
        preprocessing=reference_preprocessing(),
        labels=DIGITS,
        metrics=Metrics(),
    )
    out = root / "bundle"
    write_plain_bundle(out, body, MODEL_PATH, key)
    return out, key


def write_config(
    root: Path,
    *,
    device_id: str,
    broker: MosquittoBroker,
    topic_root: str,
    bundle: Path,
    key: FleetKey,
    video: Path | None = None,
    interval_s: float = 1.0,
    extra: str = "",
) -> Path:
    """An agent.toml for a test agent (video looped at 30 fps, 1 s telemetry windows)."""
    if video is None:
        video = root / "camera.avi"
        shutil.copy(VIDEO_PATH, video)
    path = root / "agent.toml"
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'state_dir = "{root / "state"}"\n'
        "[camera]\n"
        f'source = "{video}"\nloop = true\nfps = 30\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        "[model]\n"
        f'bundle = "{bundle}"\ntrusted_keys = ["{key.public_path}"]\nthreads = 1\n'
        "[mqtt]\n"
        f'host = "{broker.host}"\nport = {broker.port}\ntopic_root = "{topic_root}"\n'
        "keepalive_s = 5\n"
        "[telemetry]\n"
        f"interval_s = {interval_s}\n"
        '[power]\nsource = "auto"\n' + extra
    )
    return path


class AgentProcess:
    """`python -m edgefleet.agent run` as a child process with its output in a log file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.agent", "run", "--config", str(config)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never leave a stuck agent behind a failed test
            self.proc.wait(10)
            raise
        finally:
            self._fh.close()

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        self.proc.kill()
        self.proc.wait(10)
        self._fh.close()

    def output(self) -> str:
        """Everything the agent logged."""
        return self.log.read_text(errors="replace")


@dataclass
class Collector:
    """A coordinator-side subscriber with a persistent session: it misses nothing."""

    broker: MosquittoBroker
    tree: TopicTree
    telemetry: list[Telemetry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    status: list[Status] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()  # pred() passed to wait() may call seqs()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._subscribed = threading.Event()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(
            self.broker.host, self.broker.port, keepalive=5, clean_start=False, properties=props
        )
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(
            [(self.tree.all_devices(k), 1) for k in ("telemetry", "events", "reply", "status")]
        )
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, msg.topic, bytes(msg.payload))
        with self._lock:
            if isinstance(decoded, ProtocolError):
                self.rejected.append(str(decoded))
            elif isinstance(decoded, Telemetry):
                self.telemetry.append(decoded)
            elif isinstance(decoded, Event):
                self.events.append(decoded)
            elif isinstance(decoded, Reply):
                self.replies.append(decoded)
            elif isinstance(decoded, Status):
                self.status.append(decoded)

    def seqs(self) -> list[int]:
        """Telemetry sequence numbers in arrival order."""
        with self._lock:
            return [t.seq for t in self.telemetry]

    def wait(self, pred: Callable[[Collector], bool], timeout: float) -> bool:
        """Poll pred(self) until true or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if pred(self):
                    return True
            time.sleep(0.1)
        with self._lock:
            return pred(self)

    def publish(self, topic: str, payload: bytes) -> None:
        """Send something (a command) as the coordinator."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def missing(seqs: list[int]) -> list[int]:
    """Sequence numbers absent between 0 and the highest seen."""
    if not seqs:
        return []
    return sorted(set(range(max(seqs) + 1)) - set(seqs))


def drain_queue(q: queue.Queue[Any]) -> list[Any]:
    """Everything currently in a queue."""
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out
