"""A local fleet for rollout tests: broker, coordinator (in-process or as a process), agents.

Agents are real `edgefleet.agent run` processes on the reference video; the coordinator is the
real service with its HTTP API, rollout engine and store. Bundles are the reference model,
signed with a fresh fleet key, in as many versions as a test needs.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import MANIFEST_NAME, ManifestBody, Metrics, verify_bundle
from edgefleet.agent.bundle.writer import write_bundle
from edgefleet.agent.protocol import TopicTree
from edgefleet.agent.protocol.codec import encode
from edgefleet.agent.protocol.commands import AnyCommand, Command
from edgefleet.server.bundles.plain import plain_body, write_plain_bundle
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.reference import MODEL_PATH, reference_preprocessing

DIGITS = [str(i) for i in range(10)]
TOKEN = "rollout-test-token"


def reference_version(root: Path, key: FleetKey, version: int) -> Path:
    """The reference model as bundle `mnist-cnn` v<version> (same ONNX file every time)."""
    body = plain_body(
        MODEL_PATH,
        model_id="mnist-cnn",
        version=version,
        preprocessing=reference_preprocessing(),
        labels=DIGITS,
        metrics=Metrics(),
    )
    out = root / f"bundle-v{version}"
    write_plain_bundle(out, body, MODEL_PATH, key)
    return out


def broken_golden(src: Path, out: Path, key: FleetKey, version: int) -> Path:
    """src re-signed as `version` with golden outputs that the model cannot reproduce.

    Signed by the fleet key, so it passes every hash and signature check: only the device's
    health check can catch it, which is the point.
    """
    verified = verify_bundle(src, [key.public])
    m = verified.manifest
    assert m.health is not None, "the plain bundle records golden outputs"
    files = {name: (src / name).read_bytes() for name in m.files}
    golden = dict(np.load(io.BytesIO(files[m.health.golden_file]), allow_pickle=False))
    golden["probs"] = np.roll(golden["probs"], 1, axis=-1)  # another class wins everywhere
    golden["class_index"] = (golden["class_index"] + 1) % len(m.labels)
    buf = io.BytesIO()
    np.savez(buf, **golden)
    files[m.health.golden_file] = buf.getvalue()
    body = json.loads((src / MANIFEST_NAME).read_bytes())
    for k in ("signer", "files"):
        body.pop(k)
    body["version"] = version
    write_bundle(out, ManifestBody.model_validate(body), files, key.private)
    return out


@dataclass
class LocalFleet:
    """Broker + coordinator + agents under one directory."""

    root: Path
    broker: MosquittoBroker
    topic_root: str
    key: FleetKey = field(init=False)
    coordinator: Coordinator | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key, _ = init_key(self.root / "keys")

    def coordinator_config(self) -> CoordinatorConfig:
        return CoordinatorConfig(
            store=f"sqlite:///{self.root / 'coordinator' / 'fleet.db'}",
            mqtt=IngestConfig(host=self.broker.host, port=self.broker.port, root=self.topic_root),
            http_port=0,
            token=TOKEN,
            fleet_keys=[self.key.public_path],
            rollout_tick_s=0.2,
            state_dir=self.root / "coordinator",
            maintenance_every_s=5,
        )

    def start_coordinator(self) -> FleetClient:
        (self.root / "coordinator").mkdir(parents=True, exist_ok=True)
        self.coordinator = Coordinator(self.coordinator_config())
        self.coordinator.start()
        assert self.coordinator.ingestor.wait_connected(10)
        return FleetClient(self.coordinator.url, TOKEN)

    def start_agent(self, device_id: str, bundle: Path, group: str = "lab", **kw: object) -> None:
        extra = f'group = "{group}"\n'
        update = "[update]\nconfirm_frames = 10\nrerequest_s = 2\n"
        # kw "update": more [update] keys (TOML allows the table once); give_up_s may be one.
        more = str(kw.get("update", ""))
        update += more + ("" if "give_up_s" in more else "give_up_s = 60\n")
        cfg = write_config(
            self.root / device_id,
            device_id=device_id,
            broker=self.broker,
            bundle=bundle,
            key=self.key,
            topic_root=self.topic_root,
            extra=update + str(kw.get("extra", "")),
        )
        # group is a top-level key: it must come before the first [section].
        text = cfg.read_text()
        cfg.write_text(extra + text)
        self.agents[device_id] = AgentProcess(cfg, self.root / f"{device_id}.log")

    def wait_online(self, client: FleetClient, n: int, timeout: float = 60) -> None:
        def ready() -> bool:
            devices = client.devices()
            return sum(d.online and d.model_version is not None for d in devices) >= n

        wait_until(ready, timeout, f"{n} agents online", detail=self.logs)

    def logs(self) -> str:
        return "\n".join(f"--- {d}\n{a.tail(1500)}" for d, a in self.agents.items())

    def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.terminate(5)
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop()


@contextlib.contextmanager
def local_fleet(root: Path, broker: MosquittoBroker, topic_root: str) -> Iterator[LocalFleet]:
    fleet = LocalFleet(root, broker, topic_root)
    try:
        yield fleet
    finally:
        fleet.close()


def installed_dirs(state_dir: Path) -> list[str]:
    """Version directories an agent keeps under state_dir/bundles."""
    bundles = state_dir / "bundles"
    if not bundles.is_dir():
        return []
    return sorted(p.name for p in bundles.iterdir() if p.is_dir() and not p.is_symlink())


def start_coordinator_with(fleet: LocalFleet, **overrides: object) -> FleetClient:
    """fleet.start_coordinator with some CoordinatorConfig fields changed (rollout_resend_s)."""
    (fleet.root / "coordinator").mkdir(parents=True, exist_ok=True)
    fleet.coordinator = Coordinator(fleet.coordinator_config().model_copy(update=overrides))
    fleet.coordinator.start()
    assert fleet.coordinator.ingestor.wait_connected(10)
    return FleetClient(fleet.coordinator.url, TOKEN)


def restart_agent(fleet: LocalFleet, device_id: str) -> AgentProcess:
    """The agent started again on its config and state (after a kill), logging to the same file."""
    config = fleet.root / device_id / "agent.toml"
    fleet.agents[device_id] = AgentProcess(config, fleet.root / f"{device_id}.log")
    return fleet.agents[device_id]


def state_dir(fleet: LocalFleet, device_id: str) -> Path:
    """The agent's state directory (write_config puts it under root/device_id)."""
    return fleet.root / device_id / "state"


def send_command(client: mqtt.Client, topic_root: str, device_id: str, body: AnyCommand) -> str:
    """Publish one command to a device as the coordinator would (QoS 1); its correlation id."""
    now = time.time()
    cmd = Command(id=uuid.uuid4().hex[:16], ts=now, expires_at=now + 120, command=body)
    topic = TopicTree(topic_root).device(device_id, "cmd")
    client.publish(topic, encode(cmd), qos=1).wait_for_publish(5)
    return cmd.id


def resigned(src: Path, out: Path, private: Ed25519PrivateKey) -> Path:
    """src's files and manifest body, signed by another key (a manifest re-signed elsewhere)."""
    body = json.loads((src / MANIFEST_NAME).read_bytes())
    files = {name: (src / name).read_bytes() for name in body["files"]}
    for k in ("signer", "files"):
        body.pop(k)
    write_bundle(out, ManifestBody.model_validate(body), files, private)
    return out
