"""Federated rounds end to end with every part real (issue 14): a mosquitto, the coordinator
service, three `edgefleet.agent run` processes on the reference video. Nobody plays a side.

The group runs the skewed v2 (exit 0 never says 5-9), rolled out to it first (e2e_fleet.py).
A round started through the HTTP API trains that exit head on the agents' own frames
labelled by their final head (self-distillation); the coordinator aggregates, judges the
result on the reference test split, signs v3 with the fleet key and rolls it out, and every
agent installs it as a delta (the new head file and manifest; the rest filled from v2). A
device SIGKILLed mid-round holds the round up until its deadline and no longer: it closes
with the two others, their weights renormalised; the two install the result while the dead
one is down, and the dead one, restarted, gets v3 as a delta too and the rollout completes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.agent.bundle import Manifest, verify_bundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.protocol import Event
from edgefleet.server.federated.evaluate import Holdout, exit_values, preprocess
from edgefleet.server.federated.views import RoundView
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.reference import load_reference_split
from edgefleet.server.rollout.views import RolloutView
from tests.rollout.fleet import restart_agent, state_dir

from .e2e_fleet import FED, ROUND, STARVED, FedFleet, fed_fleet


def head_files(m: Manifest, heads: list[int]) -> set[str]:
    """The npz files of these early exits' heads."""
    out = set()
    for k in heads:
        spec = m.stages[m.early_exits[k]].exit
        assert spec is not None and spec.head_file is not None
        out.add(spec.head_file)
    return out


def check_result_bundle(ff: FedFleet, done: RoundView) -> str:
    """The round's bundle: version + 1, signed by the fleet key, new heads, every other file
    byte for byte the base's; its manifest sha256."""
    assert done.result_path is not None
    new = verify_bundle(Path(done.result_path), [ff.key.public])
    base, m = ff.base_manifest, new.manifest
    assert (m.model_id, m.version) == (base.model_id, base.version + 1)
    assert m.stages == base.stages and m.operating_points == base.operating_points
    assert set(m.files) == set(base.files)
    heads = head_files(base, done.heads)
    assert done.heads == [0] and len(heads) == 1, heads  # the skewed exit only
    changed = {name for name in m.files if m.files[name].sha256 != base.files[name].sha256}
    assert changed == heads, changed
    for name in heads:
        old = HeadWeights.from_npz_bytes((ff.base / name).read_bytes())
        fresh = HeadWeights.from_npz_bytes(new.read(name))
        assert old.weight.shape == fresh.weight.shape and old.bias.shape == fresh.bias.shape
        assert not (old.weight == fresh.weight).all()
    return new.manifest_sha256


def high_digits_accuracy(ff: FedFleet, result: Path) -> tuple[float, float]:
    """Exit 0's accuracy on the held-out test digits 5-9: the base's head, the result's."""
    images, labels = load_reference_split()["test"]
    high = labels >= 5
    holdout = Holdout(list(images[high]), [str(v) for v in labels[high]], "test 5-9")
    base = verify_bundle(ff.base, [ff.key.public])
    features = exit_values(base, preprocess(base, holdout)).values[0]
    (name,) = head_files(base.manifest, [0])
    out = []
    for bundle in (base, verify_bundle(result, [ff.key.public])):
        head = HeadWeights.from_npz_bytes(bundle.read(name))
        guess = (features @ head.weight.T + head.bias).argmax(axis=1)
        out.append(float((guess == labels[high]).mean()))
    return out[0], out[1]


def check_installed_as_delta(ff: FedFleet, device_id: str, rollout_id: str, version: int) -> None:
    """The device's `installed` event for the rollout: from the base, transferred as a delta.

    Waited for: the status naming the new bundle (which the rollout counts as active) is
    sent at the switch, the event once the trial frames ran, through the outbox.
    """

    def installed() -> list[Event]:
        events = ff.events(device_id, "installed")
        return [e for e in events if e.details.get("rollout_id") == rollout_id]

    wait_until(lambda: bool(installed()), 20, f"{device_id}'s installed event")
    assert len(installed()) == 1, (device_id, installed())
    details = installed()[0].details
    assert details["transfer"] == "delta", (device_id, details)
    assert (details["version"], details["from_version"]) == (version, version - 1), details


def test_a_three_device_round_gives_new_heads_that_every_agent_installs_as_a_delta(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
) -> None:
    devices = ["pi-a", "pi-b", "pi-c"]
    agents = {d: FED for d in devices}
    with fed_fleet(tmp_path, tmp_path_factory, mqtt_broker, topic_prefix, agents) as ff:
        t0 = time.monotonic()
        started = ff.client.start_round({**ROUND, "deadline_s": 90})
        rid = started.round_id
        assert sorted(started.expected) == devices
        assert started.base_manifest_sha256 == ff.base_manifest_sha256
        done = ff.round_done(rid, 100)
        t_round = time.monotonic() - t0
        assert done.state == "done", done.reason
        # Closed as soon as all three had reported, not at the deadline.
        assert done.closed_at is not None and done.closed_at < done.deadline_at
        assert done.counts == {"accepted": 3}, done.updates

        # Every agent trained and published its own update.
        waited = {}
        for d in devices:
            sent = [e for e in ff.events(d, "fed_update_sent") if e.details["round_id"] == rid]
            assert len(sent) == 1, (d, sent)
            waited[d] = round(float(sent[0].details["started_ts"]) - started.created_at, 1)
            assert sent[0].details["published"] is True
            assert int(sent[0].details["samples"]) >= 100  # the round's min_samples
        # The round's figures: FedAvg over the three, judged on the held-out test split at the
        # devices' operating point, where the repaired exit 0 is right far more often.
        fig = done.figures or {}
        assert fig["aggregator"] == "fedavg" and fig["updates"] == 3 and fig["expected"] == 3
        assert sorted(fig["devices"]) == devices
        assert sum(fig["weights"].values()) == pytest.approx(1.0)
        held = fig["holdout"]
        assert held["samples"] == 1000 and fig["accepted"] is True, fig
        assert held["accuracy_after"] > held["accuracy_before"], held
        assert fig["devices_val"]["accuracy_after"] > fig["devices_val"]["accuracy_before"], fig

        new_manifest = check_result_bundle(ff, done)
        version = ff.base_manifest.version + 1
        assert done.result_version == version and done.rollout_id is not None
        # The skew is repaired: exit 0 of the base never says 5-9; the fleet's exit 0 does,
        # on held-out digits with their true labels (no device saw one of them).
        skewed, repaired = high_digits_accuracy(ff, Path(done.result_path or ""))
        assert skewed == 0.0 and repaired > 0.5, (skewed, repaired)

        rollout = ff.rollout_where(done.rollout_id, "done", lambda v: v.phase == "done", 120)
        t_rollout = time.monotonic() - t0
        assert rollout.state == "completed", rollout
        assert rollout.counts == {"active": 3}, rollout
        assert rollout.version == version and rollout.manifest_sha256 == new_manifest
        assert list(rollout.spec.deltas) == [ff.base_manifest_sha256]
        wait_until(
            lambda: set(ff.running().values()) == {new_manifest}, 20, "every agent on the result"
        )
        for d in devices:
            check_installed_as_delta(ff, d, done.rollout_id, version)
        print(f"training started {waited} s after the round, round {t_round:.1f} s, rollout "
              f"done {t_rollout:.1f} s after the start; exit 0 on 5-9 {skewed} -> {repaired}; "
              f"held-out {held}")  # fmt: skip


def test_a_device_killed_mid_round_does_not_block_it_and_gets_the_version_when_back(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
) -> None:
    live, victim = ["pi-a", "pi-b"], "pi-z"
    agents = {**{d: FED for d in live}, victim: STARVED}
    with fed_fleet(tmp_path, tmp_path_factory, mqtt_broker, topic_prefix, agents) as ff:
        t0 = time.monotonic()
        started = ff.client.start_round({**ROUND, "deadline_s": 30})
        rid = started.round_id
        assert sorted(started.expected) == sorted([*live, victim])

        def reported() -> set[str]:
            return {u.device_id for u in ff.client.round(rid).updates or []}

        # The two live agents report; the victim, waiting for examples, is killed.
        wait_until(lambda: reported() == set(live), 20, "the live agents' updates",
                   detail=ff.fleet.logs)  # fmt: skip
        ff.fleet.agents[victim].kill()
        assert not list((state_dir(ff.fleet, victim) / "fed").rglob("*.json"))
        # Its will says offline (keepalive 5 s) well before the deadline.
        wait_until(
            lambda: not ff.client.device(victim, windows=0, events=0).device.online,
            15,
            "the killed agent offline",
        )
        done = ff.round_done(rid, 60)
        t_round = time.monotonic() - t0
        assert done.state == "done", done.reason
        # Waited for the silent device until the deadline, and no longer.
        assert done.closed_at is not None and done.closed_at >= done.deadline_at
        assert done.closed_at < done.deadline_at + 5
        assert done.counts == {"accepted": 2}, done.updates
        assert not ff.events(victim, "fed_update_sent")
        fig = done.figures or {}
        assert fig["updates"] == 2 and fig["expected"] == 3 and sorted(fig["devices"]) == live
        # FedAvg's weights renormalised over the two that reported: samples / their total.
        total = sum(fig["samples"].values())
        assert fig["weights"] == pytest.approx({d: n / total for d, n in fig["samples"].items()})
        assert fig["accepted"] is True, fig
        new_manifest = check_result_bundle(ff, done)
        version = ff.base_manifest.version + 1
        assert done.rollout_id is not None
        rollout_id = done.rollout_id

        # The two live agents install the result while the dead one is still down: the
        # rollout waits for it (its device deadline is 30 min), it does not halt.
        def live_active(view: RolloutView) -> bool:
            devs = {d.device_id: d.state for d in view.devices or []}
            return all(devs.get(d) == "active" for d in live)

        during = ff.rollout_where(rollout_id, "the live agents active", live_active, 90)
        states = {d.device_id: (d.wave, d.state) for d in during.devices or []}
        assert during.state == "running" and states[victim] == (1, "sent"), during
        wait_until(
            lambda: all(ff.running()[d] == new_manifest for d in live), 20, "live agents on it"
        )
        # Down on the base. (Its stored status is the will of its last connection, which
        # names the bundle it ran when it connected: v1, before the base was rolled out.)
        assert ff.running()[victim] != new_manifest
        current = state_dir(ff.fleet, victim) / "bundles" / "current"
        assert current.resolve().name.startswith(f"{ff.base_manifest.model_id}-v{version - 1}-")

        # Back: it comes up on the base, is sent the install again and takes the delta too.
        restart_agent(ff.fleet, victim)
        final = ff.rollout_where(rollout_id, "done", lambda v: v.phase == "done", 90)
        t_all = time.monotonic() - t0
        assert final.state == "completed" and final.counts == {"active": 3}, final
        wait_until(
            lambda: set(ff.running().values()) == {new_manifest}, 20, "every agent on the result"
        )
        for d in [*live, victim]:
            check_installed_as_delta(ff, d, rollout_id, version)
        print(f"round closed {t_round:.1f} s after the start (deadline 30 s), every agent on "
              f"v{version} {t_all:.1f} s after")  # fmt: skip
