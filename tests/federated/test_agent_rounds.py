"""Federated rounds through a real mosquitto with the agent as a process: a retained task in,
a FedUpdate out; sitting out with the reason; supplied labels from the watched folder; an
update produced while the broker is down delivered after it is back, and again by an agent
restarted with it pending; inference fps while training."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.federated import HeadWeights, decode_update
from edgefleet.agent.federated.wire import from_tensors, split_heads
from edgefleet.agent.protocol import FedUpdate, TopicTree
from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import poll_until

from .test_agent_labels import write_digits
from .test_agent_support import FedListener, exits_bundle, fed_task

DEVICE = "pi-fl"


def heads_of(bundle: Path, key: FleetKey) -> dict[int, HeadWeights]:
    """The bundle's early-exit heads by exit index."""
    v = verify_bundle(bundle, [key.public])
    m = v.manifest
    out = {}
    for k, stage in enumerate(m.early_exits):
        spec = m.stages[stage].exit
        assert spec is not None and spec.head_file is not None
        out[k] = HeadWeights.from_npz_bytes(v.read(spec.head_file))
    return out


def start_agent(
    root: Path, broker: MosquittoBroker, bundle: Path, key: FleetKey, topic: str, fed: str,
    *, fps: float = 30, interval_s: float = 1.0,
) -> AgentProcess:  # fmt: skip
    cfg = write_config(
        root, device_id=DEVICE, broker=broker, bundle=bundle, key=key, topic_root=topic,
        fps=fps, interval_s=interval_s, group="lab",
        extra="[federated]\nenabled = true\n" + fed,
    )  # fmt: skip
    return AgentProcess(cfg, root / "agent.log")


@pytest.fixture
def listener(mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[FedListener]:
    fl = FedListener(mqtt_broker, TopicTree(topic_prefix))
    try:
        yield fl
    finally:
        fl.close()


def updates_for(fl: FedListener, round_id: str) -> list[FedUpdate]:
    return [u for u in fl.updates if u.round_id == round_id]


def test_a_round_in_and_an_update_out_sitting_out_and_supplied_labels(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    listener: FedListener,
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    labels_dir = tmp_path / "labels"
    supplied = write_digits(labels_dir, 40)
    (labels_dir / "4" / "broken.png").write_bytes(b"\x89PNG truncated")
    fed = f'probe_every = 2\nlabels_dir = "{labels_dir}"\nlabels_scan_s = 0.5\n'
    with start_agent(tmp_path / "dev", mqtt_broker, bundle, key, topic_prefix, fed) as agent:
        listener.publish_task(fed_task(bundle, key, "r-a", labels="both", group="lab"))
        listener.publish_task(fed_task(bundle, key, "r-b", base_manifest_sha256="ab" * 32))
        listener.publish_task(fed_task(bundle, key, "r-s", labels="supplied", min_samples=24,
                                       heads=[1], compression="q8"))  # fmt: skip
        assert listener.wait(
            lambda fl: bool(updates_for(fl, "r-a") and updates_for(fl, "r-s")), 60
        ), agent.tail()
        heads = heads_of(bundle, key)
        update = updates_for(listener, "r-a")[0]
        assert update.device_id == DEVICE and update.base_version == 1
        assert update.base_manifest_sha256 == verify_bundle(bundle, [key.public]).manifest_sha256
        deltas = split_heads(decode_update(from_tensors(update.tensors)))
        assert sorted(deltas) == [0, 1]
        for k, delta in deltas.items():
            assert delta["weight"].shape == heads[k].weight.shape
            assert delta["bias"].shape == heads[k].bias.shape
        assert any(np.abs(d["weight"]).max() > 0 for d in deltas.values())
        assert update.samples >= 32 and update.val_samples > 0 and update.cpu_s > 0
        assert update.encoded_bytes == update.raw_bytes // 2  # fp16
        # Supplied labels only: the folder's digits, every example supplied.
        sup = updates_for(listener, "r-s")[0]
        assert sup.samples >= 24 and sup.supplied_samples == sup.samples
        assert sup.samples + sup.val_samples <= len(supplied)
        assert [t.name for t in sup.tensors] == ["exit1.bias", "exit1.weight"]
        assert all(t.scheme == "q8" for t in sup.tensors)
        # The round for another bundle: sat out, saying why, once.
        assert listener.wait(lambda fl: any(
            e.details.get("round_id") == "r-b" for e in fl.events_of("fed_skipped")), 20)
        skipped = [e for e in listener.events_of("fed_skipped") if e.details["round_id"] == "r-b"]
        assert len(skipped) == 1 and skipped[0].details["reason"] == "wrong_base"
        assert "the round's base is v1 (abababababab)" in skipped[0].message
        sent = {e.details["round_id"]: e for e in listener.events_of("fed_update_sent")}
        assert sent["r-a"].details["encoded_bytes"] == update.encoded_bytes
        assert sent["r-a"].details["val_accuracy_after"] == update.val_accuracy_after
        # The folder: every good image consumed once, the broken one refused by name.
        assert listener.wait(lambda fl: any(
            e.details.get("reason") == "label_rejected" for e in fl.events_of("error")), 20)
        bad = [e for e in listener.events_of("error") if e.details["reason"] == "label_rejected"]
        assert "broken.png" in str(bad[0].details["file"])
        assert "not a readable image" in bad[0].message
        assert len(list((labels_dir / ".done").rglob("*.png"))) == len(supplied)
        assert poll_until(lambda: not (tmp_path / "dev/state/fed/pending/r-b.json").exists(), 1)
        # Closing the round removes what was kept for it.
        pending = tmp_path / "dev" / "state" / "fed" / "pending" / "r-a.json"
        assert pending.exists()
        listener.clear_task("r-a")
        assert poll_until(lambda: not pending.exists(), 10), agent.tail()
        assert agent.alive()


def test_an_update_made_while_the_broker_is_down_arrives_after_and_after_a_restart(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    listener: FedListener,
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    # Enough examples to need several seconds of frames: the broker is gone before then.
    listener.publish_task(fed_task(bundle, key, "r-down", min_samples=60, heads=[0]))
    pending = tmp_path / "dev" / "state" / "fed" / "pending" / "r-down.json"
    root = tmp_path / "dev"
    with start_agent(root, mqtt_broker, bundle, key, topic_prefix, "probe_every = 2\n") as agent:
        assert listener.wait(lambda fl: bool(fl.telemetry), 30), agent.tail()  # subscribed
        mqtt_broker.stop()
        assert poll_until(pending.exists, 40), agent.tail()
        assert not updates_for(listener, "r-down")
        mqtt_broker.start()
        assert listener.wait(lambda fl: bool(updates_for(fl, "r-down")), 30), agent.tail()
        first = updates_for(listener, "r-down")[0]
        assert first.samples >= 60
        agent.kill()  # SIGKILL: the update is still pending on disk
    with start_agent(root, mqtt_broker, bundle, key, topic_prefix, "probe_every = 2\n") as again:
        assert listener.wait(lambda fl: len(updates_for(fl, "r-down")) >= 2, 30), again.tail()
        # The same update again, not a new training run (the coordinator keeps the first).
        assert updates_for(listener, "r-down")[1] == first
        sent = listener.events_of("fed_update_sent")
        assert len(sent) == 1 and sent[0].details["published"] is False


def test_inference_fps_while_training_stays_within_ten_percent(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    listener: FedListener,
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    # Every frame probed (the same work per frame before and during training), and a round
    # that keeps the training thread busy for seconds: single-example batches, 100 epochs
    # over 400 samples (about 6 CPU s on the development machine), stopped by its CPU budget
    # or, on a much faster CPU, by its last epoch: either way seconds of training.
    with start_agent(tmp_path / "dev", mqtt_broker, bundle, key, topic_prefix,
                     "probe_every = 1\nbuffer_size = 800\n") as agent:  # fmt: skip
        assert listener.wait(lambda fl: len(fl.telemetry) >= 4, 30), agent.tail()
        listener.publish_task(fed_task(
            bundle, key, "r-fps", min_samples=400, local_epochs=100, batch_size=1,
            cpu_budget_s=4.0, learning_rate=0.001,
        ))  # fmt: skip
        assert listener.wait(lambda fl: bool(fl.events_of("fed_update_sent")), 60), agent.tail()
        done = listener.events_of("fed_update_sent")[0].details
        start, wall = float(done["started_ts"]), float(done["wall_s"])
        finished = done["stopped_by_budget"] is True or done["epochs_done"] == 100
        assert finished and wall >= 3.0, str(done)
        assert listener.wait(
            lambda fl: any(t.window_start > start + wall + 2 for t in fl.telemetry), 10
        )
        windows = sorted(listener.telemetry, key=lambda t: t.window_start)[2:]  # warmed up
        end = start + wall
        during = [t.fps for t in windows if t.window_start >= start and t.window_end <= end]
        before = [t.fps for t in windows if t.window_end <= start]
        assert len(during) >= 2 and len(before) >= 3, (before, during)
        ratio = statistics.median(during) / statistics.median(before)
        p95 = [
            statistics.median(t.latency_ms.p95 for t in windows if pick(t))
            for pick in (lambda t: t.window_end <= start,
                         lambda t: t.window_start >= start and t.window_end <= end)
        ]  # fmt: skip
        print(f"fps before {before}, during training {during}: ratio {ratio:.3f}; "
              f"p95 ms before {p95[0]:.2f}, during {p95[1]:.2f}")  # fmt: skip
        assert ratio >= 0.9, (before, during)
        assert all(t.frames_dropped <= 0.1 * t.frames_captured for t in windows)
