"""The round worker on a real bundle, in-process: features from probed video frames, the local
update and every figure in it, who sits out and why, the kept update and its republication.
MQTT is left out here (test_agent_rounds.py runs the same against a broker and a process)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.config import FederatedConfig
from edgefleet.agent.federated import HeadWeights, decode_update, evaluate, update_norm
from edgefleet.agent.federated.collect import FeatureCollector
from edgefleet.agent.federated.local import (
    Budget,
    RunningBundle,
    SitOut,
    check_eligible,
    local_update,
)
from edgefleet.agent.federated.wire import from_tensors, split_heads
from edgefleet.agent.federated.worker import FedWorker, PendingStore
from edgefleet.agent.protocol import FedTask, FedUpdate, PrivacySpec, TopicTree, decode, sampled
from edgefleet.agent.protocol.codec import encode
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.waiting import poll_until

from .test_agent_support import (
    exits_bundle,
    fed_task,
    load_model,
    skewed_bundle,
    video_frames,
    video_labels,
)

DEVICE = "pi-fed"


@pytest.fixture(scope="module")
def probed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[StagedModel, FeatureCollector, Path, FleetKey]:
    """The bundle's model, and a collector holding 200 probed frames of the reference video."""
    bundle, key = exits_bundle(tmp_path_factory)
    model, pre = load_model(bundle, key)
    collector = FeatureCollector(1, 500, 100, model.verified.manifest_sha256)
    for frame in video_frames()[:200]:
        assert collector.due()
        collector.add_probe(model.probe_frame(frame, pre))
    return model, collector, bundle, key


def running(model: StagedModel) -> RunningBundle:
    m, v = model.manifest, model.verified
    return RunningBundle(m.model_id, m.version, v.manifest_sha256, m, v.read, model.thresholds)


def base_heads(model: StagedModel) -> dict[int, HeadWeights]:
    m = model.manifest
    out = {}
    for k, stage in enumerate(m.early_exits):
        spec = m.stages[stage].exit
        assert spec is not None and spec.head_file is not None
        out[k] = HeadWeights.from_npz_bytes(model.verified.read(spec.head_file))
    return out


def data_for(collector: FeatureCollector, task: FedTask) -> dict[int, Any]:
    return {h: collector.examples(h, task.labels, task.min_confidence)[1] for h in task.heads}


def test_local_update_trains_both_heads_and_reports_what_it_did(probed: Any) -> None:
    model, collector, bundle, key = probed
    task = fed_task(bundle, key, "r-1", local_epochs=5, learning_rate=0.02)
    data = data_for(collector, task)
    # The reference video's digits: the final head is sure of most of them.
    assert all(len(ex) > 150 and not ex.supplied.any() for ex in data.values())
    update = local_update(
        task, running(model), data, device_id=DEVICE, budget=Budget(30.0),
        noise_rng=np.random.default_rng(0),
    )  # fmt: skip
    wire = decode(FedUpdate, encode(update))
    assert isinstance(wire, FedUpdate) and wire == update
    bases = base_heads(model)
    deltas = split_heads(decode_update(from_tensors(update.tensors)))
    assert sorted(deltas) == [0, 1]
    for head, delta in deltas.items():
        assert delta["weight"].shape == bases[head].weight.shape
        assert delta["bias"].shape == bases[head].bias.shape
        assert np.abs(delta["weight"]).max() > 0  # it learnt something
    n = len(data[0])
    assert update.samples + update.val_samples == n and update.val_samples == round(0.2 * n)
    assert update.samples >= task.min_samples and update.supplied_samples == 0
    assert update.epochs_done == pytest.approx(5.0) and not update.stopped_by_budget
    assert 0 < update.cpu_s < 30 and update.noise_multiplier == 0 and not update.clipped
    raw = sum(4 * h.weight.size + 4 * h.bias.size for h in bases.values())
    assert update.raw_bytes == raw and update.encoded_bytes == raw // 2  # fp16
    sent = {f"{h}.{k}": v for h, parts in deltas.items() for k, v in parts.items()}
    assert update.norm == pytest.approx(update_norm(sent), rel=1e-3)  # fp16 rounding only
    for field in ("val_accuracy_before", "val_accuracy_after", "val_exit_rate_before",
                  "val_exit_rate_after", "train_loss"):  # fmt: skip
        value = getattr(update, field)
        assert value is not None and 0 <= value <= (1 if field != "train_loss" else 10), field


def test_a_skewed_exit_head_learns_the_devices_scene_from_its_own_final_head(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bundle, key = skewed_bundle(tmp_path_factory)
    model, pre = load_model(bundle, key)
    collector = FeatureCollector(1, 500, 10, model.verified.manifest_sha256)
    frames, truth = video_frames(), video_labels()
    for frame in frames[:300]:  # the device's own frames; no true label is used
        collector.add_probe(model.probe_frame(frame, pre))
    task = fed_task(bundle, key, "r-skew", heads=[0], local_epochs=10, learning_rate=0.3,
                    compression="q8")  # fmt: skip
    update = local_update(
        task, running(model), data_for(collector, task), device_id=DEVICE,
        budget=Budget(30.0), noise_rng=np.random.default_rng(0),
    )  # fmt: skip
    assert update.val_accuracy_before is not None and update.val_accuracy_after is not None
    assert update.val_accuracy_after > update.val_accuracy_before + 0.25
    # (The exit rate may go either way: the skewed head is confidently wrong on 5-9.)
    # On held-out frames with their true digits, the head as the coordinator would rebuild
    # it from the 8-bit delta is right far more often than the skewed one.
    base = base_heads(model)[0]
    trained = base.apply(split_heads(decode_update(from_tensors(update.tensors)))[0])
    held = np.stack([model.probe_frame(f, pre).features[0] for f in frames[300:]])
    _, before = evaluate(base, held, truth[300:])
    _, after = evaluate(trained, held, truth[300:])
    assert before < 0.6 and after > before + 0.3, (before, after)


def test_privacy_clips_and_noises_and_q8_is_a_quarter(probed: Any) -> None:
    model, collector, bundle, key = probed
    clip = 0.05
    task = fed_task(
        bundle, key, "r-dp", privacy=PrivacySpec(clip=clip, noise_multiplier=0.5),
        compression="q8", local_epochs=3,
    )  # fmt: skip
    update = local_update(
        task, running(model), data_for(collector, task), device_id=DEVICE,
        budget=Budget(30.0), noise_rng=np.random.default_rng(1),
    )  # fmt: skip
    assert update.clipped and update.norm > clip and update.noise_multiplier == 0.5
    assert update.encoded_bytes == update.raw_bytes // 4 + 8 * len(update.tensors)
    sent = decode_update(from_tensors(update.tensors))
    # Clipped to 0.05, then noise of std 0.025 per value: the norm is the noise's, far above.
    values = sum(v.size for v in sent.values())
    assert update_norm(sent) == pytest.approx(0.025 * values**0.5, rel=0.2)


def test_the_cpu_budget_stops_training_between_batches(probed: Any) -> None:
    model, collector, bundle, key = probed
    task = fed_task(bundle, key, "r-budget", local_epochs=50, batch_size=8, cpu_budget_s=10)
    ticks = itertools.count()
    # A fake clock: one second per read, so the budget of 10 is used up within a few batches.
    update = local_update(
        task, running(model), data_for(collector, task), device_id=DEVICE,
        budget=Budget(10.0, clock=lambda: float(next(ticks))),
        noise_rng=np.random.default_rng(0),
    )  # fmt: skip
    assert update.stopped_by_budget and update.epochs_done < 1
    assert update.cpu_s == pytest.approx(next(ticks) - 1)


def test_who_sits_out_and_why(probed: Any) -> None:
    model, _, bundle, key = probed
    run = running(model)
    now = time.time()

    def reason(task: FedTask, group: str | None = None) -> str | None:
        try:
            check_eligible(task, run, DEVICE, group, now)
        except SitOut as out:
            return out.reason
        return None

    assert reason(fed_task(bundle, key, "ok")) is None
    assert reason(fed_task(bundle, key, "a", base_manifest_sha256="ab" * 32)) == "wrong_base"
    assert reason(fed_task(bundle, key, "b", model_id="other")) == "wrong_model"
    assert reason(fed_task(bundle, key, "c", group="lab"), group="field") == "not_in_group"
    assert reason(fed_task(bundle, key, "c", group="lab"), group="lab") is None
    assert reason(fed_task(bundle, key, "d", deadline_ts=now - 1)) == "deadline_passed"
    assert reason(fed_task(bundle, key, "e", heads=[5])) == "head_unavailable"
    out = next(r for r in (f"s-{i}" for i in range(100)) if not sampled(r, DEVICE, 0.3))
    assert reason(fed_task(bundle, key, out, sampling=0.3)) == "not_sampled"


class Recorder:
    """publish and event callbacks of a worker, recorded."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.online = True

    def publish(self, round_id: str, payload: bytes) -> bool:
        with self.lock:
            if self.online:
                self.published.append((round_id, payload))
            return self.online

    def event(self, kind: str, message: str, details: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((kind, message, details))

    def kinds(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [(m, d) for k, m, d in self.events if k == kind]


@pytest.fixture
def worker(probed: Any, tmp_path: Path) -> Iterator[tuple[FedWorker, Recorder, TopicTree]]:
    model, collector, _, _ = probed
    rec = Recorder()
    tree = TopicTree("t/fed")
    w = FedWorker(
        device_id=DEVICE, group="lab", cfg=FederatedConfig(enabled=True), tree=tree,
        state_dir=tmp_path, collector=collector, running=lambda: running(model),
        publish=rec.publish, event=rec.event,
    )  # fmt: skip
    w.start()
    try:
        yield w, rec, tree
    finally:
        w.stop(5)


def test_worker_sends_keeps_republishes_and_forgets_when_the_round_closes(
    worker: tuple[FedWorker, Recorder, TopicTree], probed: Any
) -> None:
    w, rec, tree = worker
    _, _, bundle, key = probed
    task = fed_task(bundle, key, "r-7", local_epochs=2)
    topic = tree.fed_task("r-7")
    rec.online = False  # trained while the broker is away: kept, published later
    w.on_task(topic, encode(task))
    assert poll_until(lambda: w.pending.load("r-7") is not None, 30)
    assert rec.published == [] and w.produced == 1
    sent = rec.kinds("fed_update_sent")
    assert len(sent) == 1 and sent[0][1]["published"] is False
    assert sent[0][1]["samples"] >= task.min_samples and sent[0][1]["encoded_bytes"] > 0
    # The retained task again (a reconnect): the kept update goes out, nothing is retrained.
    rec.online = True
    w.on_task(topic, encode(task))
    assert poll_until(lambda: len(rec.published) == 1, 10)
    kept = w.pending.load("r-7")
    assert kept is not None and rec.published[0] == ("r-7", encode(kept[0]))
    assert w.produced == 1
    w.on_task(topic, encode(task))
    assert poll_until(lambda: len(rec.published) == 2, 10)
    assert rec.published[1] == rec.published[0]
    # Closed: the kept update is dropped and never sent again.
    w.on_task(topic, b"")
    assert poll_until(lambda: w.pending.load("r-7") is None, 10)


def test_worker_reports_each_reason_once_and_refuses_a_bad_task(
    worker: tuple[FedWorker, Recorder, TopicTree], probed: Any
) -> None:
    w, rec, tree = worker
    _, _, bundle, key = probed
    other = fed_task(bundle, key, "r-other", base_manifest_sha256="cd" * 32)
    for _ in range(3):  # three reconnects: one event
        w.on_task(tree.fed_task("r-other"), encode(other))
    few = fed_task(bundle, key, "r-few", min_samples=100_000, deadline_ts=time.time() + 3)
    w.on_task(tree.fed_task("r-few"), encode(few))
    w.on_task(tree.fed_task("r-bad"), b'{"v": 1, "round_id": "r-bad"}')
    mismatched = fed_task(bundle, key, "r-x")
    w.on_task(tree.fed_task("r-y"), encode(mismatched))  # round differs from the topic
    assert poll_until(lambda: len(rec.kinds("fed_skipped")) == 4, 20), rec.events
    by_round = {d["round_id"]: (m, d) for m, d in rec.kinds("fed_skipped")}
    assert by_round["r-other"][1]["reason"] == "wrong_base"
    assert "the round's base is" in by_round["r-other"][0]
    assert by_round["r-few"][1]["reason"] == "too_few_samples"
    assert by_round["r-few"][1]["need"] == 100_000
    assert by_round["r-bad"][1]["reason"] == "bad_task"
    assert by_round["r-y"][1]["reason"] == "bad_task" and "r-x" in by_round["r-y"][0]
    assert rec.published == [] and w.produced == 0


def test_pending_store_survives_a_restart_and_expires(tmp_path: Path, probed: Any) -> None:
    model, collector, bundle, key = probed
    task = fed_task(bundle, key, "r-disk", heads=[0], local_epochs=1)
    update = local_update(
        task, running(model), data_for(collector, task), device_id=DEVICE,
        budget=Budget(30.0), noise_rng=np.random.default_rng(0),
    )  # fmt: skip
    store = PendingStore(tmp_path / "fed" / "pending")
    store.save(update, deadline_ts=1000.0)
    again = PendingStore(tmp_path / "fed" / "pending").load("r-disk")
    assert again is not None and again[0] == update and again[1] == 1000.0
    (tmp_path / "fed" / "pending" / "r-junk.json").write_text("{not json")
    assert store.load("r-junk") is None and store.rounds() == ["r-disk"]
    assert store.expire(999.0) == [] and store.expire(1000.0) == ["r-disk"]
    assert store.rounds() == []


def test_a_collector_reset_makes_old_features_unusable(probed: Any) -> None:
    model, _, bundle, key = probed
    sha = verify_bundle(bundle, [key.public]).manifest_sha256
    collector = FeatureCollector(3, 50, 10, sha)
    assert [collector.due() for _ in range(7)] == [True, False, False, True, False, False, True]
    _, pre = load_model(bundle, key)
    for frame in video_frames()[:20]:
        collector.add_probe(model.probe_frame(frame, pre))
    assert collector.examples(0, "pseudo", 0.0)[1].x.shape[0] == 20
    collector.reset("ef" * 32)
    owner, ex = collector.examples(0, "both", 0.0)
    assert owner == "ef" * 32 and len(ex) == 0
