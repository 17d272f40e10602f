"""The round engine on a real store, real archives and a real digits bundle; fake broker.

Devices are simulated as the agent trains: the base bundle's own early-exit features of their
frames, pseudo labels from its final head, train_head from the base head, deltas encoded in
fp16 as FedUpdates, stored through the ingest path (Store.ingest) as the ingestor stores them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import generate_private_key, unpack, verify_bundle
from edgefleet.agent.federated import HeadWeights, decode_update
from edgefleet.agent.federated.wire import from_tensors
from edgefleet.server.federated.aggregate import fedavg
from edgefleet.server.federated.candidate import sign_candidate
from edgefleet.server.federated.rounds import RoundError, RoundNotFound, RoundSpecError
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.fleet.store import FedRoundConflict
from tests.federated.rounds_rig import Fleet, Rig, fed_update, fleet_of, partitions


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def rig(tmp_path: Path, key: Ed25519PrivateKey) -> Rig:
    return Rig(tmp_path, key)


@pytest.fixture
def fleet(rig: Rig, key: Ed25519PrivateKey) -> Fleet:
    return fleet_of(rig.bundle, key)


def updates_for(rig: Rig, fleet: Fleet, round_id: str, devices: list[str]) -> list:  # type: ignore[type-arg]
    task = rig.task(round_id)
    parts = partitions(len(devices))
    out = []
    for device, rows in zip(devices, parts, strict=True):
        delta, figures = fleet.delta(rows)
        out.append(fed_update(task, device, delta, figures))
    return out


def test_a_round_publishes_a_signed_version_plus_one_with_exactly_the_new_heads(
    rig: Rig, fleet: Fleet, key: Ed25519PrivateKey
) -> None:
    rig.devices("pi-1", "pi-2", "pi-3")
    rid = rig.start()
    task = rig.tasks.retained[rid]
    assert (task.base_manifest_sha256, task.base_version, task.heads) == (
        rig.base.manifest_sha256,
        4,
        [0],
    )
    assert rig.state(rid) == ("running", "collect")
    ups = updates_for(rig, fleet, rid, ["pi-1", "pi-2", "pi-3"])
    rig.send(*ups)
    rig.tick()  # every expected device reported: the round closes, the task is cleared
    assert rig.state(rid) == ("running", "aggregate") and rid not in rig.tasks.retained
    rig.tick()  # aggregate, evaluate, sign
    assert rig.state(rid) == ("running", "publish")
    rig.tick()  # archive + rollout
    r = rig.store.fed_round(rid)
    assert r is not None and (r.state, r.phase, r.received, r.rejected) == ("done", "done", 3, 0)
    figures = json.loads(r.figures_json or "{}")
    held = figures["holdout"]
    # The skewed early head gets much better on held-out digits at the devices' threshold.
    assert held["accuracy_after"] > held["accuracy_before"] + 0.05, held
    assert figures["accepted"] is True and figures["aggregator"] == "fedavg"
    assert figures["devices_val"]["accuracy_after"] > figures["devices_val"]["accuracy_before"]

    # The bundle: signed by the fleet key, version + 1, only the head file changed.
    info = rig.archives.get(r.result_bundle_sha256 or "")
    assert info is not None and info.version == 5
    assert info.manifest_sha256 == r.result_manifest_sha256
    new = verify_bundle(unpack(info.path, rig.tmp / "check"), [key.public_key()])
    old = verify_bundle(rig.bundle, [key.public_key()])
    changed = {n for n in new.manifest.files if new.manifest.files[n] != old.manifest.files[n]}
    assert changed == {"heads/exit0.npz"} and set(new.manifest.files) == set(old.manifest.files)
    assert new.manifest.stages == old.manifest.stages
    assert new.manifest.provenance.optimizer["fed_round"] == rid
    # Exactly the base head plus the sample-weighted mean of the decoded deltas.
    deltas = [decode_update(from_tensors(u.tensors)) for u in ups]
    mean = fedavg(deltas, [u.samples for u in ups])
    want = fleet.base_head.apply({"weight": mean["exit0.weight"], "bias": mean["exit0.bias"]})
    got = HeadWeights.from_npz_bytes(new.read("heads/exit0.npz"))
    np.testing.assert_array_equal(got.weight, want.weight)
    np.testing.assert_array_equal(got.bias, want.bias)

    # The rollout: to the group, canary first, with a delta against the base the devices run.
    rollout = rig.store.rollout(r.rollout_id or "")
    assert rollout is not None and (rollout.group, rollout.bundle_sha256) == ("lab", info.sha256)
    spec = json.loads(rollout.spec_json)
    assert rig.base.manifest_sha256 in spec["deltas"]
    assert rig.tasks.log == [("publish", rid), ("clear", rid)]


def test_duplicate_stale_late_and_unknown_updates_do_not_count(rig: Rig, fleet: Fleet) -> None:
    rig.devices("pi-1", "pi-2", "pi-3")
    rid = rig.start()
    u1, u2, u3 = updates_for(rig, fleet, rid, ["pi-1", "pi-2", "pi-3"])
    assert rig.send(u1).fed_received == 1
    # A QoS 1 redelivery, then a second training of the same device: the first one counts.
    again = rig.send(u1, u1.model_copy(update={"samples": 10_000}))
    assert [i.reason for i in again.fed_ignored] == ["duplicate", "duplicate"]
    stale = rig.send(u2.model_copy(update={"base_manifest_sha256": "e" * 64}))
    assert [i.reason for i in stale.fed_ignored] == ["stale"]
    unknown = rig.send(u2.model_copy(update={"round_id": "f-old-round"}))
    assert [i.reason for i in unknown.fed_ignored] == ["unknown_round"]
    rig.send(u2)
    rig.clock.now += 600  # the deadline passes with pi-3 silent
    rig.tick()
    late = rig.send(u3)
    assert [i.reason for i in late.fed_ignored] == ["late"]
    rig.until_done(rid)
    r = rig.store.fed_round(rid)
    assert r is not None and r.state == "done", r.reason
    figures = json.loads(r.figures_json or "{}")
    assert figures["devices"] == ["pi-1", "pi-2"] and figures["samples"]["pi-1"] == u1.samples
    base = rig.base.manifest_sha256
    rows = [(u.device_id, u.base_manifest_sha256, u.status) for u in rig.store.fed_updates(rid)]
    assert rows == [
        ("pi-1", base, "accepted"),
        ("pi-2", "e" * 64, "stale"),  # by device, then in the order they arrived
        ("pi-2", base, "accepted"),
        ("pi-3", base, "late"),
    ]


def test_nan_wrong_shape_and_huge_norm_updates_are_rejected_with_reasons(
    rig: Rig, fleet: Fleet
) -> None:
    rig.devices("pi-1", "pi-2", "pi-3", "pi-4", "pi-5")
    rid = rig.start(max_norm=50.0)
    task = rig.task(rid)
    good = updates_for(rig, fleet, rid, ["pi-1", "pi-2"])
    delta, figures = fleet.delta(partitions(3)[2])
    nan = {**delta, "weight": delta["weight"].copy()}
    nan["weight"][3, 7] = np.nan
    wrong = {"weight": delta["weight"][:, :8], "bias": delta["bias"]}
    huge = {k: v * 1000 for k, v in delta.items()}
    rig.send(
        *good,
        fed_update(task, "pi-3", nan, figures, scheme="raw"),
        fed_update(task, "pi-4", wrong, figures),
        fed_update(task, "pi-5", huge, figures, scheme="fp32"),
    )
    rig.tick()
    statuses = rig.statuses(rid)
    assert statuses["pi-3"] == ("rejected", "exit0.weight: 1 non-finite values (NaN/inf)")
    assert statuses["pi-4"] == ("rejected", "exit0.weight: shape (10, 8), expected (10, 16)")
    status, reason = statuses["pi-5"]
    assert status == "rejected" and reason is not None
    assert reason.startswith("norm ") and "above max_norm 50" in reason
    r = rig.store.fed_round(rid)
    assert r is not None and (r.received, r.rejected) == (5, 3)
    # Every expected device reported (two of them acceptably): the round goes on with two.
    rig.until_done(rid)
    r = rig.store.fed_round(rid)
    assert r is not None and r.state == "done", r.reason
    assert json.loads(r.figures_json or "{}")["devices"] == ["pi-1", "pi-2"]


def test_a_vanished_device_does_not_block_the_round_and_weights_are_renormalised(
    rig: Rig, fleet: Fleet
) -> None:
    rig.devices("pi-1", "pi-2", "pi-3")
    rid = rig.start(quorum="2")
    u1, u2, _ = updates_for(rig, fleet, rid, ["pi-1", "pi-2", "pi-3"])
    rig.send(u1, u2)
    rig.status("pi-3", online=False)  # gone mid-round
    rig.tick()
    assert rig.state(rid) == ("running", "collect")  # waits for the deadline, not for pi-3
    rig.clock.now += 600
    rig.until_done(rid)
    r = rig.store.fed_round(rid)
    assert r is not None and r.state == "done", r.reason
    weights = json.loads(r.figures_json or "{}")["weights"]
    total = u1.samples + u2.samples
    assert weights == pytest.approx({"pi-1": u1.samples / total, "pi-2": u2.samples / total})
    assert math.isclose(sum(weights.values()), 1.0)


def test_below_quorum_at_the_deadline_fails_cleanly_with_the_task_cleared(
    rig: Rig, fleet: Fleet
) -> None:
    rig.devices("pi-1", "pi-2", "pi-3")
    rid = rig.start(quorum="2")
    (u1,) = updates_for(rig, fleet, rid, ["pi-1"])
    rig.send(u1)
    rig.clock.now += 601
    rig.until_done(rid)
    r = rig.store.fed_round(rid)
    assert r is not None and (r.state, r.phase) == ("failed", "done")
    assert r.reason == (
        "below quorum: 1 accepted update(s), 2 needed (3 expected, 2 did not report, 0 rejected)"
    )
    assert rid not in rig.tasks.retained and ("clear", rid) in rig.tasks.log
    assert r.result_version is None and rig.store.rollouts() == []
    # The group is free for the next round.
    assert rig.engine.create(RoundSpec(group="lab", quorum="1")) != rid


def test_poisoned_updates_are_outvoted_by_the_median(rig: Rig, fleet: Fleet) -> None:
    devices = [f"pi-{i}" for i in range(5)]
    rig.devices(*devices)

    def poisoned_round(aggregator: str) -> str:
        rid = rig.start(aggregator=aggregator, quorum="5")
        honest = updates_for(rig, fleet, rid, devices[:3])
        task = rig.task(rid)
        delta, figures = fleet.delta(partitions(3)[0])
        # Sign-flipped and scaled x3: inside the 5x-median norm bound, so only the
        # aggregator can stand between these two devices and the fleet's heads.
        flipped = {k: -3.0 * v for k, v in delta.items()}
        bad = [fed_update(task, d, flipped, figures) for d in devices[3:]]
        rig.send(*honest, *bad)
        rig.until_done(rid)
        return rid

    robust = poisoned_round("median")
    r = rig.store.fed_round(robust)
    assert r is not None and r.state == "done", r.reason
    held = json.loads(r.figures_json or "{}")["holdout"]
    assert held["accuracy_after"] > held["accuracy_before"] + 0.05, held
    assert rig.statuses(robust) == {d: ("accepted", None) for d in devices}

    # The same updates through FedAvg pull the head the wrong way: the evaluation stops it.
    rig.tick()  # the rollout of the first round's bundle is under way; nothing else changes
    plain = poisoned_round("fedavg")
    r = rig.store.fed_round(plain)
    assert r is not None and r.state == "failed" and r.reason is not None
    assert r.reason.startswith("evaluation: held-out accuracy"), r.reason


def test_a_restarted_coordinator_goes_on_from_the_store(
    rig: Rig, fleet: Fleet, key: Ed25519PrivateKey
) -> None:
    rig.devices("pi-1", "pi-2", "pi-3")
    rid = rig.start()
    ups = updates_for(rig, fleet, rid, ["pi-1", "pi-2", "pi-3"])
    rig.send(*ups[:2])
    rig.tick()
    # The coordinator dies; a new process (a new engine, nothing in memory) takes over.
    rig.engine = rig.new_engine()
    rig.tasks.gen += 1  # and a new broker session: the retained task is published again
    rig.tick()
    assert rig.tasks.log == [("publish", rid), ("publish", rid)]
    rig.send(ups[2])
    rig.tick()
    assert rig.state(rid) == ("running", "aggregate")
    rig.tick()
    assert rig.state(rid) == ("running", "publish")
    r = rig.store.fed_round(rid)
    assert r is not None and r.result_path is not None
    written = verify_bundle(Path(r.result_path), [key.public_key()]).manifest_sha256
    # Killed again between aggregation and publishing, and the candidate is gone (another
    # coordinator aggregated, a lost disk): it is built again, byte for byte.
    shutil.rmtree(r.result_path)
    rig.engine = rig.new_engine()
    rig.tick()
    r = rig.store.fed_round(rid)
    assert r is not None and r.state == "done" and r.rollout_id is not None
    assert r.result_manifest_sha256 == written
    assert [x.rollout_id for x in rig.store.rollouts()] == [r.rollout_id]
    # A second coordinator stepping the same round finds nothing left to do.
    rig.new_engine().tick()
    assert [x.rollout_id for x in rig.store.rollouts()] == [r.rollout_id]


def test_without_a_signing_key_the_round_stops_at_aggregated_with_a_candidate(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    rig = Rig(tmp_path, key, signing=False, with_holdout=False)
    fleet = fleet_of(rig.bundle, key)
    rig.devices("pi-1", "pi-2")
    rid = rig.start()
    rig.send(*updates_for(rig, fleet, rid, ["pi-1", "pi-2"]))
    rig.until_done(rid)
    r = rig.store.fed_round(rid)
    assert r is not None and (r.state, r.phase, r.result_version) == ("aggregated", "done", 5)
    assert r.rollout_id is None and rig.store.rollouts() == []
    assert r.reason is not None
    assert "edgefleet fl sign" in r.reason and "edgefleet deploy" in r.reason
    # Judged by the devices' own validation figures (no held-out set here).
    figures = json.loads(r.figures_json or "{}")
    assert figures["holdout"] is None and figures["verdict"].startswith("devices' val accuracy")
    signed = sign_candidate(Path(r.result_path or ""), tmp_path / "signed", key)
    assert signed.version == 5
    verified = verify_bundle(tmp_path / "signed", [key.public_key()])
    assert verified.manifest.provenance.optimizer["fed_round"] == rid
    assert rig.archives.add(tmp_path / "signed").version == 5


def test_a_round_is_refused_when_it_cannot_run(rig: Rig, tmp_path: Path) -> None:
    with pytest.raises(RoundNotFound, match="group 'lab' has no devices"):
        rig.engine.create(RoundSpec(group="lab"))
    rig.devices("pi-1", "pi-2")
    rig.status("pi-3", bundle="f" * 64)
    with pytest.raises(RoundError, match="run 2 bundles"):
        rig.engine.create(RoundSpec(group="lab"))
    rig.status("pi-3", bundle="f" * 64, online=False)
    with pytest.raises(RoundSpecError, match=r"early exit 1 .* has no trainable head"):
        rig.engine.create(RoundSpec(group="lab", heads=[1]))
    with pytest.raises(RoundSpecError, match="quorum 3 needs 3 updates but only 2"):
        rig.engine.create(RoundSpec(group="lab", quorum="3"))
    with pytest.raises(RoundSpecError, match="krum with f=1 needs at least 5"):
        rig.engine.create(RoundSpec(group="lab", aggregator="krum"))
    rid = rig.engine.create(RoundSpec(group="lab"))
    with pytest.raises(FedRoundConflict, match=f"already has federated round {rid}"):
        rig.engine.create(RoundSpec(group="lab"))
    rig.status("cam-1", group="yard", bundle="f" * 64)
    with pytest.raises(RoundError, match="which this coordinator does not hold"):
        rig.engine.create(RoundSpec(group="yard"))


def test_abort_clears_the_task_and_frees_the_group(rig: Rig) -> None:
    rig.devices("pi-1", "pi-2")
    rid = rig.start()
    assert rid in rig.tasks.retained
    rig.engine.abort(rid)
    assert rig.state(rid) == ("aborted", "done") and rid not in rig.tasks.retained
    with pytest.raises(RoundError, match="it is aborted"):
        rig.engine.abort(rid)
    with pytest.raises(RoundNotFound):
        rig.engine.abort("f-nope")
    rig.tick()  # nothing left to do for it
    assert rig.state(rid) == ("aborted", "done")
    assert rig.engine.create(RoundSpec(group="lab")) != rid


def test_an_update_from_outside_the_group_is_rejected(rig: Rig, fleet: Fleet) -> None:
    rig.devices("pi-1", "pi-2")
    rig.status("cam-9", group="yard")
    rid = rig.start()
    u1, u2 = updates_for(rig, fleet, rid, ["pi-1", "cam-9"])
    rig.send(u1, u2)
    rig.tick()
    assert rig.statuses(rid)["cam-9"] == ("rejected", "not a device of group 'lab'")


def test_without_a_fixed_bound_a_huge_update_is_cut_by_the_rounds_median(
    rig: Rig, fleet: Fleet
) -> None:
    rig.devices("pi-1", "pi-2", "pi-3", "pi-4")
    rid = rig.start()
    honest = updates_for(rig, fleet, rid, ["pi-1", "pi-2", "pi-3"])
    delta, figures = fleet.delta(partitions(3)[1])
    scaled = fed_update(rig.task(rid), "pi-4", {k: 100 * v for k, v in delta.items()}, figures,
                        scheme="fp32")
    rig.send(*honest, scaled)
    rig.tick()
    assert rig.statuses(rid)["pi-4"] == ("accepted", None)  # no fixed bound to judge it by
    rig.until_done(rid)
    r = rig.store.fed_round(rid)
    assert r is not None and r.state == "done", r.reason
    figures_out = json.loads(r.figures_json or "{}")
    status, reason = rig.statuses(rid)["pi-4"]
    assert status == "rejected" and reason is not None
    assert f"above the round's bound {figures_out['norm_bound']:.6g}" in reason
    assert figures_out["devices"] == ["pi-1", "pi-2", "pi-3"]
    assert (r.received, r.rejected) == (4, 1)
