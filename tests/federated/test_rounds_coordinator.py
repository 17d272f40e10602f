"""A round end to end through a real mosquitto and the real coordinator (its API, CLI, metrics).

The test plays the devices as the agent does on the wire: retained births naming the bundle
they run, the retained FedTask read from fed/{round}/task, one FedUpdate each (QoS 1) on
fed/{round}/update/{device}. One expected device never answers (it vanished): the round
waits for its deadline, closes with the two others, publishes version + 1 signed by the
fleet key and rolls it out through a canary rollout.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.bundle import pack, verify_bundle
from edgefleet.agent.protocol import FedTask, TopicTree, decode, encode
from edgefleet.server.cli import app
from edgefleet.server.federated.client import RoundClient
from edgefleet.server.federated.views import RoundView
from edgefleet.server.fleet.client import ApiError
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests import protocol_samples as samples
from tests.federated.rounds_rig import digits, digits_bundle, fed_update, fleet_of, partitions
from tests.fleet_helpers import RawPublisher

TOKEN = "fed-test-token"


class TaskWatcher:
    """A device's view of fed/+/task: the retained tasks as they come and go."""

    def __init__(self, broker: MosquittoBroker, root: str) -> None:
        self.tasks: dict[str, FedTask | None] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{root}/fed/+/task", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        round_id = msg.topic.split("/")[-2]
        task = decode("fed_task", msg.payload) if msg.payload else None
        with self._lock:
            self.tasks[round_id] = task if isinstance(task, FedTask) else None

    def get(self, round_id: str) -> FedTask | None:
        with self._lock:
            return self.tasks.get(round_id)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def coordinator(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> Iterator[tuple[Coordinator, FleetKey]]:
    key, _ = init_key(tmp_path / "keys")
    d = digits()
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, images=d.test_images, labels=d.test_labels)
    cfg = CoordinatorConfig(
        store=f"sqlite:///{tmp_path / 'coordinator' / 'fleet.db'}",
        mqtt=IngestConfig(host=mqtt_broker.host, port=mqtt_broker.port, root=topic_prefix),
        http_port=0,
        token=TOKEN,
        fleet_keys=[key.public_path],
        signing_key=key.directory / "fleet.key",
        fed_holdout=holdout,
        rollout_tick_s=0.2,
        state_dir=tmp_path / "coordinator",
    )
    c = Coordinator(cfg)
    c.start()
    assert c.ingestor.wait_connected(10)
    try:
        yield c, key
    finally:
        c.stop()


def test_a_round_end_to_end_through_the_broker_and_the_coordinator(
    coordinator: tuple[Coordinator, FleetKey],
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    coord, key = coordinator
    client = RoundClient(coord.url, TOKEN)
    base_dir = digits_bundle(tmp_path / "bundles", key.private)
    base = client.upload_bundle(pack(base_dir, tmp_path / "base.tar.gz").read_bytes())
    tree = TopicTree(topic_prefix)
    raw = RawPublisher(mqtt_broker)
    watcher = TaskWatcher(mqtt_broker, topic_prefix)
    devices = ["pi-1", "pi-2", "pi-3"]
    try:
        for device in devices:
            birth = samples.status(device).model_copy(
                update={
                    "group": "lab",
                    "operating_point": 0,
                    "bundle_sha256": base.manifest_sha256,
                    "ts": time.time(),
                }
            )
            raw.publish(tree.device(device, "status"), encode(birth), retain=True)
        wait_until(
            lambda: sum(d.online for d in client.devices("lab")) == 3, 10, "3 devices online"
        )
        # Refusals, as documented: bad spec (422), heads the base lacks (400), no token (401).
        with pytest.raises(ApiError, match="HTTP 422"):
            client.start_round({"group": "lab", "quorum": "most"})
        with pytest.raises(ApiError, match="HTTP 400: early exit 2"):
            client.start_round({"group": "lab", "heads": [2]})
        with pytest.raises(ApiError, match="HTTP 401"):
            RoundClient(coord.url, "wrong").start_round({"group": "lab"})
        with pytest.raises(ApiError, match="HTTP 404"):
            client.start_round({"group": "nobody"})

        argv = ["fl", "start", "--group", "lab", "--deadline", "6s", "--quorum", "2",
                "--url", coord.url, "--token", TOKEN]
        assert app.main(argv) == 0
        out = capsys.readouterr().out
        assert "digits-ee v4, heads [0], group lab: 3 device(s) expected" in out, out
        (view,) = client.rounds("lab")
        rid = view.round_id
        with pytest.raises(ApiError, match="HTTP 409: group 'lab' already has federated round"):
            client.start_round({"group": "lab"})

        wait_until(lambda: watcher.get(rid) is not None, 10, "the retained task")
        task = watcher.get(rid)
        assert task is not None and task.base_manifest_sha256 == base.manifest_sha256
        fleet = fleet_of(base_dir, key.private)
        parts = partitions(3)
        ups = [
            fed_update(task, d, *fleet.delta(rows))
            for d, rows in zip(devices, parts, strict=True)
        ]
        # pi-3 has vanished; pi-1's update comes twice (a QoS 1 redelivery).
        for u in (ups[0], ups[1], ups[0]):
            raw.publish(tree.fed_update(rid, u.device_id), encode(u))
        wait_until(
            lambda: coord.ingestor.stats.fed_ignored["duplicate"] == 1, 10, "the duplicate"
        )

        final = wait_until_finished(client, rid, 60)
        assert final.state == "done", final.reason
        assert final.counts == {"accepted": 2}
        assert watcher.get(rid) is None  # the task was cleared when the round closed
        held = (final.figures or {})["holdout"]
        assert held["accuracy_after"] > held["accuracy_before"], held
        rollout = client.rollout(final.rollout_id or "")
        assert rollout.version == 5 and rollout.group == "lab"
        assert rollout.bundle_sha256 == final.result_bundle_sha256
        bundle = Path(final.result_path or "")
        assert verify_bundle(bundle, [key.public]).manifest.version == 5

        assert app.main(["fl", "status", rid, "--url", coord.url]) == 0
        out = capsys.readouterr().out
        assert f"{rid}: done, done: 3 expected, 2 accepted" in out
        assert "held-out (540 frames): accuracy" in out and f"rollout {final.rollout_id}" in out
        assert app.main(["fl", "history", "--url", coord.url]) == 0
        assert rid in capsys.readouterr().out
        with pytest.raises(ApiError, match="HTTP 409: cannot abort round"):
            client.abort_round(rid)
        with pytest.raises(ApiError, match="HTTP 404"):
            client.round("f-nope")

        with urllib.request.urlopen(f"{coord.url}/metrics") as resp:
            metrics = resp.read().decode()
        assert 'edgefleet_fed_rounds{state="done"} 1.0' in metrics
        assert 'edgefleet_fed_updates_total{status="accepted"} 2.0' in metrics
        assert 'edgefleet_fed_updates_ignored_total{reason="duplicate"} 1.0' in metrics
    finally:
        watcher.close()
        raw.close()


def wait_until_finished(client: RoundClient, round_id: str, timeout: float) -> RoundView:
    wait_until(
        lambda: client.round(round_id).state != "running",
        timeout,
        f"round {round_id} to end",
        detail=lambda: json.dumps(client.round(round_id).model_dump(mode="json"))[:2000],
    )
    return client.round(round_id)
