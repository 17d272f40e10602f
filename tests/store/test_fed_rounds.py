"""Federated rounds and their updates in the store (schema v5), on every backend."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any
from unittest.mock import ANY

import pytest

from edgefleet.agent.protocol import FedUpdate
from edgefleet.server.fleet.store import (
    FedRoundConflict,
    FedRoundRecord,
    FedUpdateIn,
    IngestBatch,
    StatusIn,
    Store,
    open_store,
)
from edgefleet.server.fleet.store.isolate import ingest_isolating
from tests import protocol_samples as samples
from tests.store.backends import Backend
from tests.store.payloads import T0

BASE = samples.MANIFEST_SHA
OTHER = "c" * 64


def fed_round(round_id: str = "r-12", group: str = "lab-a", **changes: Any) -> FedRoundRecord:
    fields: dict[str, Any] = {
        "round_id": round_id,
        "group": group,
        "state": "running",
        "phase": "collect",
        "phase_started_at": T0,
        "spec_json": '{"group": "lab-a"}',
        "task_json": samples.fed_task().model_dump_json(),
        "model_id": "digits-ee",
        "base_manifest_sha256": BASE,
        "base_bundle_sha256": "d" * 64,
        "base_version": 4,
        "expected": ("pi-7", "pi-8", "pi-9"),
        "received": 0,
        "rejected": 0,
        "deadline_at": T0 + 600,
        "figures_json": None,
        "result_version": None,
        "result_path": None,
        "result_bundle_sha256": None,
        "result_manifest_sha256": None,
        "rollout_id": None,
        "reason": None,
        "created_at": T0,
        "updated_at": T0,
        "closed_at": None,
    }
    fields.update(changes)
    return FedRoundRecord(**fields)


def update(
    device: str = "pi-7", round_id: str = "r-12", base: str = BASE, samples_n: int = 412
) -> FedUpdate:
    return samples.fed_update().model_copy(
        update={
            "device_id": device,
            "round_id": round_id,
            "base_manifest_sha256": base,
            "samples": samples_n,
        }
    )


def ingest(store: Store, *updates: FedUpdate, at: float = T0 + 10) -> Any:
    return store.ingest(IngestBatch(fed_updates=[FedUpdateIn(at, u) for u in updates]))


def test_a_round_is_stored_listed_and_updated(store: Store) -> None:
    store.create_fed_round(fed_round())
    assert store.fed_round("r-12") == fed_round()
    assert store.fed_round("nope") is None
    store.create_fed_round(fed_round("r-13", "yard", created_at=T0 + 1, state="failed"))
    assert [r.round_id for r in store.fed_rounds()] == ["r-13", "r-12"]
    assert [r.round_id for r in store.fed_rounds(group="lab-a")] == ["r-12"]
    assert [r.round_id for r in store.fed_rounds(states=["running"])] == ["r-12"]
    assert store.fed_rounds(limit=1)[0].round_id == "r-13"

    got = store.update_fed_round(
        "r-12", phase="aggregate", closed_at=T0 + 600, figures_json='{"accepted": true}'
    )
    assert got is not None and (got.state, got.phase, got.closed_at) == (
        "running",
        "aggregate",
        T0 + 600,
    )
    assert got.figures_json == '{"accepted": true}' and got.updated_at > T0
    # Fields not given are kept; only_if guards a transition.
    done = store.update_fed_round(
        "r-12", only_if="running", state="done", phase="done", rollout_id="r-1", result_version=5
    )
    assert done is not None and (done.state, done.rollout_id, done.result_version) == (
        "done",
        "r-1",
        5,
    )
    assert done.figures_json == '{"accepted": true}'
    assert store.update_fed_round("r-12", only_if="running", state="aborted") is None
    assert store.update_fed_round("r-12", only_phase="collect", reason="x") is None
    assert store.update_fed_round("r-12", only_phase="done", reason="y") is not None
    assert store.fed_round("r-12") == replace(done, reason="y", updated_at=ANY)
    with pytest.raises(KeyError):
        store.update_fed_round("nope", state="failed")
    with pytest.raises(ValueError, match="unknown round state"):
        store.update_fed_round("r-12", state="finished")  # type: ignore[arg-type]
    assert store.fed_round_counts() == {
        "running": 0,
        "aggregated": 0,
        "done": 1,
        "failed": 1,
        "aborted": 0,
    }


def test_a_group_holds_one_running_round(store: Store) -> None:
    store.create_fed_round(fed_round("r-1"))
    with pytest.raises(FedRoundConflict) as err:
        store.create_fed_round(fed_round("r-2", created_at=T0 + 1))
    assert (err.value.group, err.value.holder) == ("lab-a", "r-1")
    assert store.fed_round("r-2") is None
    # Another group is free; a finished round frees its group.
    store.create_fed_round(fed_round("r-3", "yard"))
    store.update_fed_round("r-1", state="failed", phase="done")
    store.create_fed_round(fed_round("r-2", created_at=T0 + 2))
    assert [r.round_id for r in store.fed_rounds(states=["running"])] == ["r-2", "r-3"]


def test_updates_are_kept_once_and_stale_late_unknown_ones_are_ignored(store: Store) -> None:
    store.create_fed_round(fed_round())
    out = ingest(store, update("pi-7"), update("pi-8", samples_n=100))
    assert (out.fed_received, out.fed_ignored) == (2, ())
    # A QoS 1 redelivery, or a second training on the same base: the first one counts.
    again = ingest(store, update("pi-7", samples_n=999))
    assert again.fed_received == 0
    assert [(i.device_id, i.reason) for i in again.fed_ignored] == [("pi-7", "duplicate")]
    # Twice in one batch: stored once.
    twice = ingest(store, update("pi-9"), update("pi-9"))
    assert twice.fed_received == 1 and [i.reason for i in twice.fed_ignored] == ["duplicate"]
    stale = ingest(store, update("pi-10", base=OTHER))
    assert [(i.reason, i.detail) for i in stale.fed_ignored] == [
        ("stale", f"made on base {OTHER[:12]}, the round's is {BASE[:12]}")
    ]
    late = ingest(store, update("pi-11"), at=T0 + 601)
    assert [(i.reason, i.detail) for i in late.fed_ignored] == [
        ("late", "arrived 1.0 s after the deadline")
    ]
    unknown = ingest(store, update("pi-7", round_id="r-99"))
    assert [(i.round_id, i.reason) for i in unknown.fed_ignored] == [("r-99", "unknown_round")]

    rows = store.fed_updates("r-12")
    assert [(u.device_id, u.status, u.samples) for u in rows] == [
        ("pi-10", "stale", 412),
        ("pi-11", "late", 412),
        ("pi-7", "received", 412),
        ("pi-8", "received", 100),
        ("pi-9", "received", 412),
    ]
    assert all(u.payload is None for u in rows)
    kept = store.fed_updates("r-12", ["received"], with_payload=True)
    # What aggregation needs is in the store: the update as it was received.
    assert [FedUpdate.model_validate_json(u.payload or "") for u in kept] == [
        update("pi-7"),
        update("pi-8", samples_n=100),
        update("pi-9"),
    ]
    r = store.fed_round("r-12")
    assert r is not None and (r.received, r.rejected) == (3, 0)


def test_a_closed_round_takes_no_more_updates(store: Store) -> None:
    store.create_fed_round(fed_round())
    store.update_fed_round("r-12", phase="aggregate")
    out = ingest(store, update("pi-7"))
    assert [(i.reason, i.detail) for i in out.fed_ignored] == [
        ("late", "the round is closed (running, aggregate)")
    ]
    store.update_fed_round("r-12", state="failed", phase="done")
    out = ingest(store, update("pi-8"))
    assert [i.detail for i in out.fed_ignored] == ["the round is closed (failed, done)"]


def test_verdicts_are_recorded_and_counted(store: Store) -> None:
    store.create_fed_round(fed_round())
    ingest(store, update("pi-7"), update("pi-8"))
    got = store.judge_fed_update("r-12", "pi-7", BASE, status="accepted", norm=0.04)
    assert (got.status, got.norm, got.reason) == ("accepted", 0.04, None)
    store.judge_fed_update(
        "r-12", "pi-8", BASE, status="rejected", reason="exit0.weight: 1 non-finite values"
    )
    r = store.fed_round("r-12")
    assert r is not None and (r.received, r.rejected) == (2, 1)
    assert [(u.device_id, u.status, u.reason) for u in store.fed_updates("r-12", ["rejected"])] == [
        ("pi-8", "rejected", "exit0.weight: 1 non-finite values")
    ]
    with pytest.raises(KeyError):
        store.judge_fed_update("r-12", "pi-9", BASE, status="accepted")
    with pytest.raises(ValueError, match="unknown update status"):
        store.judge_fed_update("r-12", "pi-7", BASE, status="kept")  # type: ignore[arg-type]
    assert store.fed_update_counts() == {
        "received": 0,
        "accepted": 1,
        "rejected": 1,
        "stale": 0,
        "late": 0,
    }


def test_updates_go_through_the_isolating_writer_with_other_messages(store: Store) -> None:
    store.create_fed_round(fed_round())
    birth = samples.status("pi-7").model_copy(update={"ts": T0})
    items = [StatusIn(T0 + 1, birth), FedUpdateIn(T0 + 5, update("pi-7"))]
    done = ingest_isolating(store, items, registration_open=True)
    assert done.committed == 2 and done.outcome().fed_received == 1
    dev = store.device("pi-7")
    assert dev is not None and dev.online
    assert [u.status for u in store.fed_updates("r-12")] == ["received"]


def test_one_update_wins_when_two_coordinators_store_it_together(backend: Backend) -> None:
    stores = [open_store(backend.url) for _ in range(2)]
    try:
        stores[0].create_fed_round(fed_round())
        outcomes: list[Any] = []
        start = threading.Barrier(2)

        def write(s: Store) -> None:
            start.wait()
            outcomes.append(ingest(s, update("pi-7")))

        threads = [threading.Thread(target=write, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(o.fed_received for o in outcomes) == [0, 1]
        assert sorted(len(o.fed_ignored) for o in outcomes) == [0, 1]
        r = stores[1].fed_round("r-12")
        assert r is not None and r.received == 1
    finally:
        for s in stores:
            s.close()
