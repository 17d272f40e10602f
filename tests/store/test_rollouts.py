"""Bundles and rollouts in the store (schema v4), on every backend."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from edgefleet.server.fleet.store import (
    BundleRecord,
    IngestBatch,
    RolloutConflict,
    RolloutRecord,
    Store,
    open_store,
    schema,
)
from edgefleet.server.fleet.store.errors import StoreError
from edgefleet.server.fleet.store.schema import MIGRATIONS, latest_version
from edgefleet.server.local.waiting import wait_until
from tests.store.backends import Backend
from tests.store.payloads import T0, telemetry

SHA = "a" * 64
MANIFEST = "b" * 64


def bundle(sha: str = SHA, **changes: Any) -> BundleRecord:
    fields: dict[str, Any] = {
        "sha256": sha,
        "kind": "full",
        "manifest_sha256": MANIFEST,
        "base_manifest_sha256": None,
        "model_id": "tiny-cnn",
        "version": 3,
        "size": 123_456,
        "chunk_size": 65_536,
        "path": f"/var/lib/edgefleet/bundles/{sha}.tar.gz",
        "added_at": T0,
    }
    fields.update(changes)
    return BundleRecord(**fields)


def rollout(rollout_id: str = "r-1", group: str = "lab", **changes: Any) -> RolloutRecord:
    fields: dict[str, Any] = {
        "rollout_id": rollout_id,
        "group": group,
        "bundle_sha256": SHA,
        "manifest_sha256": MANIFEST,
        "model_id": "tiny-cnn",
        "version": 3,
        "spec_json": '{"canary": "10%", "soak_s": 300, "halt_if": ["p95_ms>40"]}',
        "state": "running",
        "phase": "canary",
        "phase_started_at": T0,
        "reason": None,
        "created_at": T0,
        "updated_at": T0,
    }
    fields.update(changes)
    return RolloutRecord(**fields)


def test_bundles_are_added_once_listed_and_marked(store: Store) -> None:
    assert store.add_bundle(bundle()) is True
    assert store.add_bundle(bundle(size=1)) is False  # the first record stays
    delta = bundle("c" * 64, kind="delta", base_manifest_sha256="d" * 64, added_at=T0 + 1)
    store.add_bundle(delta)
    assert store.bundle(SHA) == bundle()
    assert store.bundle("e" * 64) is None
    assert [b.sha256 for b in store.bundles()] == ["c" * 64, SHA]
    assert store.bundles()[0] == delta

    store.mark_bundle_published(SHA, T0 + 10, 123_456)
    got = store.bundle(SHA)
    assert got is not None and (got.published_at, got.published_bytes, got.cleared_at) == (
        T0 + 10,
        123_456,
        None,
    )
    store.mark_bundle_cleared(SHA, T0 + 20)
    got = store.bundle(SHA)
    assert got is not None and got.cleared_at == T0 + 20
    # Published again: no longer cleared.
    store.mark_bundle_published(SHA, T0 + 30, 123_456)
    got = store.bundle(SHA)
    assert got is not None and got.cleared_at is None and got.published_at == T0 + 30
    with pytest.raises(KeyError):
        store.mark_bundle_published("e" * 64, T0, 1)
    with pytest.raises(KeyError):
        store.mark_bundle_cleared("e" * 64, T0)


def test_a_rollout_and_its_devices_by_wave(store: Store) -> None:
    store.create_rollout(rollout(), [["pi-3"], ["pi-1", "pi-2"], ["pi-0"]])
    assert store.rollout("r-1") == rollout()
    assert store.rollout("nope") is None
    devices = store.rollout_devices("r-1")
    assert [(d.device_id, d.wave, d.state, d.have, d.total) for d in devices] == [
        ("pi-3", 0, "pending", 0, None),
        ("pi-1", 1, "pending", 0, None),
        ("pi-2", 1, "pending", 0, None),
        ("pi-0", 2, "pending", 0, None),
    ]
    assert all(d.updated_at == T0 and d.sent_at is None for d in devices)

    sent = store.update_rollout_device(
        "r-1",
        "pi-3",
        state="sent",
        sent_at=T0 + 1,
        deadline_at=T0 + 1801,
        previous_manifest_sha256="f" * 64,
    )
    assert (sent.state, sent.sent_at, sent.deadline_at) == ("sent", T0 + 1, T0 + 1801)
    got = store.update_rollout_device("r-1", "pi-3", state="downloading", have=4, total=9)
    # Fields not given are kept.
    assert (got.state, got.have, got.total, got.sent_at) == ("downloading", 4, 9, T0 + 1)
    assert got.previous_manifest_sha256 == "f" * 64 and got.updated_at > T0
    assert store.rollout_devices("r-1")[0] == got
    with pytest.raises(KeyError, match="pi-9"):
        store.update_rollout_device("r-1", "pi-9", state="sent")
    with pytest.raises(ValueError, match="unknown rollout device state 'done'"):
        store.update_rollout_device("r-1", "pi-3", state="done")  # type: ignore[arg-type]

    soak = store.update_rollout("r-1", phase="soak", phase_started_at=T0 + 60)
    assert (soak.state, soak.phase, soak.phase_started_at) == ("running", "soak", T0 + 60)
    halted = store.update_rollout("r-1", state="halted", reason="p95_ms 52.3 > 40")
    assert (halted.state, halted.phase, halted.reason) == ("halted", "soak", "p95_ms 52.3 > 40")
    assert store.rollout("r-1") == halted
    with pytest.raises(KeyError):
        store.update_rollout("nope", state="aborted")
    with pytest.raises(ValueError, match="unknown rollout state"):
        store.update_rollout("r-1", state="finished")  # type: ignore[arg-type]


def test_a_group_holds_one_running_or_paused_rollout(store: Store) -> None:
    store.create_rollout(rollout("r-1", "lab"), [["pi-1"]])
    with pytest.raises(RolloutConflict) as err:
        store.create_rollout(rollout("r-2", "lab", created_at=T0 + 1), [["pi-2"]])
    assert (err.value.group, err.value.holder) == ("lab", "r-1")
    assert "group 'lab' already has rollout r-1 running or paused" in str(err.value)
    # Nothing of the refused rollout was written.
    assert store.rollout("r-2") is None and store.rollout_devices("r-2") == []
    # Another group is free; a paused rollout still holds its group.
    store.create_rollout(rollout("r-3", "yard", created_at=T0 + 2), [["cam-1"]])
    store.update_rollout("r-1", state="paused")
    with pytest.raises(RolloutConflict):
        store.create_rollout(rollout("r-2", "lab", created_at=T0 + 3), [["pi-2"]])
    # Once halted, the group is free again; the old rollout stays listed.
    store.update_rollout("r-1", state="halted")
    store.create_rollout(rollout("r-2", "lab", created_at=T0 + 4), [["pi-2"]])
    # A second running rollout of a group cannot come back through an update either.
    with pytest.raises(StoreError):
        store.update_rollout("r-1", state="running")

    assert [r.rollout_id for r in store.rollouts()] == ["r-2", "r-3", "r-1"]
    assert [r.rollout_id for r in store.rollouts(group="lab")] == ["r-2", "r-1"]
    assert [r.rollout_id for r in store.rollouts(states=["running", "paused"])] == ["r-2", "r-3"]
    assert [r.rollout_id for r in store.rollouts("lab", ["halted"])] == ["r-1"]
    assert [r.rollout_id for r in store.rollouts(limit=1)] == ["r-2"]
    assert store.rollouts(states=[]) == []


def test_v4_migrates_a_v3_database_and_keeps_its_data(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = backend.raw()
    try:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", MIGRATIONS[:3])
            assert old.migrate() == 3
        old.ingest(IngestBatch(telemetry=[telemetry("pi-1", 0, T0)]))
        assert old.migrate() == latest_version() >= 4
        assert old.telemetry_count() == 1
        old.add_bundle(bundle())
        old.create_rollout(rollout(), [["pi-1"]])
        assert old.rollout("r-1") == rollout()
        assert backend.count("rollout_devices") == 1
    finally:
        old.close()


def test_two_coordinators_racing_for_one_group_exactly_one_wins(postgres_dsn: str) -> None:
    stores = [open_store(postgres_dsn) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    won: list[str] = []
    lost: list[RolloutConflict] = []
    lock = threading.Lock()

    def attempt(i: int, s: Store) -> None:
        barrier.wait()
        try:
            s.create_rollout(rollout(f"r-{i}", "lab", created_at=T0 + i), [[f"pi-{i}"]])
        except RolloutConflict as exc:
            with lock:
                lost.append(exc)
        else:
            with lock:
                won.append(f"r-{i}")

    threads = [threading.Thread(target=attempt, args=(i, s)) for i, s in enumerate(stores)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1 and len(lost) == len(stores) - 1
        assert all(c.holder == won[0] for c in lost)
        assert [r.rollout_id for r in stores[0].rollouts(group="lab")] == won
    finally:
        for s in stores:
            s.close()


def test_a_rollout_created_meanwhile_elsewhere_is_waited_for_then_named(
    postgres_dsn: str,
) -> None:
    # Another coordinator inserted a running rollout of "lab" and has not committed: this
    # create waits on the unique index, then names the other rollout once it commits.
    store = open_store(postgres_dsn)
    result: dict[str, BaseException | None] = {}

    def create() -> None:
        try:
            store.create_rollout(rollout("mine", "lab"), [["pi-1"]])
            result["error"] = None
        except BaseException as exc:  # the test inspects it
            result["error"] = exc

    try:
        with psycopg.connect(postgres_dsn) as other, psycopg.connect(postgres_dsn) as watch:
            with other.transaction():
                r = rollout("theirs", "lab")
                other.execute(
                    "INSERT INTO rollouts (rollout_id, device_group, bundle_sha256, "
                    "manifest_sha256, model_id, version, spec_json, state, phase, "
                    "phase_started_at, created_at, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, 'running', 'canary', %s, %s, %s)",
                    (
                        r.rollout_id,
                        r.group,
                        r.bundle_sha256,
                        r.manifest_sha256,
                        r.model_id,
                        r.version,
                        r.spec_json,
                        T0,
                        T0,
                        T0,
                    ),
                )
                writer = threading.Thread(target=create)
                writer.start()
                wait_until(
                    lambda: _waiting_on_locks(watch) > 0, 10, "the create to wait for the insert"
                )
            writer.join(10)
        error = result["error"]
        assert isinstance(error, RolloutConflict) and error.holder == "theirs"
        assert store.rollout("mine") is None
    finally:
        store.close()


def _waiting_on_locks(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    assert row is not None
    return int(row[0])
