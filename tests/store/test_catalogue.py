"""The model catalogue, group targets, latency per device class and the loop's decisions in the
store (schema v6), on every backend."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, get_args

import pytest

from edgefleet.server.fleet.store import (
    BuildJobRecord,
    DecisionAction,
    GroupTarget,
    IngestBatch,
    JobConflict,
    LatencyRecord,
    ModelRecord,
    Store,
    VariantRecord,
    open_store,
    schema,
)
from edgefleet.server.fleet.store.schema import MIGRATIONS, latest_version
from tests.store.backends import Backend
from tests.store.payloads import T0, telemetry
from tests.store.test_rollouts import bundle, rollout

M1 = "a" * 64
M2 = "b" * 64
M3 = "c" * 64


def model(name: str = "digits", **changes: Any) -> ModelRecord:
    fields: dict[str, Any] = {
        "name": name,
        "source_sha256": "1" * 64,
        "source_path": f"/var/lib/edgefleet/catalogue/{name}/source.onnx",
        "source_bytes": 1_204_311,
        "data_sha256": "2" * 64,
        "data_path": f"/var/lib/edgefleet/catalogue/{name}/data.npz",
        "data_bytes": 8_388_608,
        "options_json": '{"normalize": true}',
        "added_at": T0,
    }
    fields.update(changes)
    return ModelRecord(**fields)


def variant(variant_id: str = "digits-v1", manifest: str = M1, **changes: Any) -> VariantRecord:
    name, _, version = variant_id.rpartition("-v")
    fields: dict[str, Any] = {
        "variant_id": variant_id,
        "model": name,
        "version": int(version),
        "model_id": f"{name}-ee",
        "bundle_sha256": "d" * 64,
        "manifest_sha256": manifest,
        "job_id": "j-1",
        "options_json": '{"max_drop": 0.01}',
        "size_bytes": 412_004,
        "macs": 18_400_000,
        "points_json": '[{"name": "accurate", "val_accuracy": 0.981, "test_accuracy": null, '
        '"expected_macs": 18400000, "exit_rates": [0.0]}]',
        "default_point": 0,
        "estimate_json": '{"measured_on": "x86-avx512", "latency_ms": {"fp32": 2.5}, '
        '"by_class": {"x86-avx512": 2.1}}',
        "created_at": T0,
        "retired_at": None,
    }
    fields.update(changes)
    return VariantRecord(**fields)


def job(job_id: str = "j-1", name: str = "digits", **changes: Any) -> BuildJobRecord:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "model": name,
        "origin": "operator",
        "options_json": '{"max_drop": 0.01}',
        "state": "queued",
        "step": 0,
        "steps": 0,
        "progress": "",
        "log_path": f"/var/lib/edgefleet/catalogue/{name}/jobs/{job_id}.log",
        "variant_id": None,
        "reason": None,
        "created_at": T0,
        "started_at": None,
        "finished_at": None,
        "updated_at": T0,
    }
    fields.update(changes)
    return BuildJobRecord(**fields)


def latency(
    manifest: str = M1, device_class: str = "rpi5", point: int = 0, **changes: Any
) -> LatencyRecord:
    fields: dict[str, Any] = {
        "manifest_sha256": manifest,
        "device_class": device_class,
        "operating_point": point,
        "windows": 12,
        "devices": 3,
        "p95_ms": 31.5,
        "p50_ms": 22.25,
        "power_w": 4.5,
        "predicted_p95_ms": 28.0,
        "updated_at": T0,
    }
    fields.update(changes)
    return LatencyRecord(**fields)


# -- models and variants -----------------------------------------------------------------------


def test_models_are_stored_once_and_listed_by_name(store: Store) -> None:
    assert store.model("digits") is None and store.models() == []
    store.add_model(model("digits"))
    store.add_model(model("audio", options_json="{}", added_at=T0 + 5))
    assert store.model("digits") == model("digits")
    assert [m.name for m in store.models()] == ["audio", "digits"]
    with pytest.raises(ValueError, match="model 'digits' is already in the catalogue"):
        store.add_model(model("digits", source_sha256="9" * 64))
    assert store.model("digits") == model("digits")  # the first one stays
    with pytest.raises(ValueError, match="invalid model name"):
        store.add_model(model("../etc"))
    assert len(store.models()) == 2


def test_variants_round_trip_and_their_ids_and_manifests_are_unique(store: Store) -> None:
    store.add_variant(variant("digits-v1", M1))
    store.add_variant(variant("audio-v1", M2, job_id=None, created_at=T0 + 1))
    store.add_variant(variant("digits-v2", M3, created_at=T0 + 2, retired_at=T0 + 3))
    assert store.variant("digits-v1") == variant("digits-v1", M1)
    assert store.variant("digits-v2") == variant(
        "digits-v2", M3, created_at=T0 + 2, retired_at=T0 + 3
    )
    assert store.variant("digits-v9") is None
    assert [v.variant_id for v in store.variants()] == ["digits-v1", "audio-v1", "digits-v2"]
    assert [v.variant_id for v in store.variants("digits")] == ["digits-v1", "digits-v2"]
    assert store.variants("none") == []
    found = store.variant_by_manifest(M2)
    assert found == variant("audio-v1", M2, job_id=None, created_at=T0 + 1)
    assert store.variant_by_manifest("e" * 64) is None

    with pytest.raises(ValueError, match="variant 'digits-v1' is already registered"):
        store.add_variant(variant("digits-v1", "e" * 64))
    with pytest.raises(
        ValueError, match=f"manifest {M2} is already registered as variant 'audio-v1'"
    ):
        store.add_variant(variant("digits-v3", M2))
    assert len(store.variants()) == 3
    assert store.variant("digits-v3") is None and store.variant_by_manifest("e" * 64) is None


def test_a_variant_is_retired_and_put_back(store: Store) -> None:
    store.add_variant(variant())
    store.retire_variant("digits-v1", T0 + 60)
    retired = store.variant("digits-v1")
    assert retired is not None and retired.retired_at == T0 + 60
    store.retire_variant("digits-v1", None)
    assert store.variant("digits-v1") == variant()
    with pytest.raises(KeyError, match="digits-v7"):
        store.retire_variant("digits-v7", T0)


# -- build jobs --------------------------------------------------------------------------------


def test_a_job_round_trips_and_jobs_are_listed_newest_first(store: Store) -> None:
    store.create_job(job("j-1", created_at=T0, updated_at=T0))
    store.create_job(job("j-2", "audio", origin="loop", created_at=T0 + 2, updated_at=T0 + 2))
    done = job(
        "j-0",
        state="succeeded",
        step=7,
        steps=7,
        progress="[7/7] signed",
        variant_id="digits-v1",
        created_at=T0 - 100,
        started_at=T0 - 99,
        finished_at=T0 - 50,
        updated_at=T0 - 50,
    )
    store.create_job(done)  # a finished job does not hold its model
    assert store.job("j-0") == done
    assert store.job("j-1") == job("j-1")
    assert store.job("j-9") is None
    assert [j.job_id for j in store.jobs()] == ["j-2", "j-1", "j-0"]
    assert [j.job_id for j in store.jobs(model="digits")] == ["j-1", "j-0"]
    assert [j.job_id for j in store.jobs(states=["queued", "running"])] == ["j-2", "j-1"]
    assert [j.job_id for j in store.jobs("digits", ["succeeded"])] == ["j-0"]
    assert [j.job_id for j in store.jobs(limit=1)] == ["j-2"]
    assert store.jobs(states=[]) == []
    with pytest.raises(ValueError, match="unknown build job state 'done'"):
        store.jobs(states=["done"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown build job origin"):
        store.create_job(job("j-3", "other", origin="cron"))


@pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled"])
def test_a_model_holds_one_open_job_until_it_ends(store: Store, end: str) -> None:
    store.create_job(job("j-1"))
    with pytest.raises(JobConflict) as queued:
        store.create_job(job("j-2", created_at=T0 + 1))
    assert (queued.value.model, queued.value.holder) == ("digits", "j-1")
    assert str(queued.value) == (
        "model 'digits' already has build job j-1 queued or running; "
        "cancel it or wait for it to finish"
    )
    store.create_job(job("j-3", "audio"))  # another model is not held
    store.update_job("j-1", state="running", started_at=T0 + 2)
    with pytest.raises(JobConflict, match="build job j-1"):
        store.create_job(job("j-2", created_at=T0 + 3))
    assert store.job("j-2") is None

    store.update_job("j-1", state=end, finished_at=T0 + 4)  # type: ignore[arg-type]
    store.create_job(job("j-2", created_at=T0 + 5))
    assert [(j.job_id, j.state) for j in store.jobs("digits")] == [("j-2", "queued"), ("j-1", end)]


def test_update_job_changes_only_what_is_given_and_only_if_in_state(store: Store) -> None:
    store.create_job(job("j-1"))
    before = time.time()
    running = store.update_job(
        "j-1", only_if=["queued"], state="running", started_at=T0 + 1, steps=7, progress="start"
    )
    after = time.time()
    assert running is not None
    assert running == replace(
        job("j-1"),
        state="running",
        started_at=T0 + 1,
        steps=7,
        progress="start",
        updated_at=running.updated_at,
    )
    assert before <= running.updated_at <= after
    assert store.job("j-1") == running

    # Not queued any more: nothing changes.
    assert store.update_job("j-1", only_if=["queued"], state="cancelled", reason="x") is None
    assert store.job("j-1") == running
    assert store.update_job("j-1", only_if=[], step=3) is None
    assert store.job("j-1") == running

    stepped = store.update_job("j-1", only_if=["queued", "running"], step=3, progress="[3/7] qat")
    assert stepped is not None
    assert (stepped.state, stepped.step, stepped.steps, stepped.progress) == (
        "running",
        3,
        7,
        "[3/7] qat",
    )
    assert stepped.started_at == T0 + 1  # None: kept
    done = store.update_job(
        "j-1", state="succeeded", variant_id="digits-v1", finished_at=T0 + 9, step=7
    )
    assert done is not None and store.job("j-1") == done
    assert (done.state, done.variant_id, done.finished_at, done.reason) == (
        "succeeded",
        "digits-v1",
        T0 + 9,
        None,
    )

    with pytest.raises(KeyError, match="j-9"):
        store.update_job("j-9", state="failed")
    with pytest.raises(KeyError, match="j-9"):
        store.update_job("j-9", only_if=["running"], state="failed")
    with pytest.raises(ValueError, match="unknown build job state 'paused'"):
        store.update_job("j-1", state="paused")  # type: ignore[arg-type]
    assert store.job("j-1") == done


def test_coordinators_racing_for_one_model_create_exactly_one_job(backend: Backend) -> None:
    stores = [open_store(backend.url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    won: list[str] = []
    lost: list[JobConflict] = []
    lock = threading.Lock()

    def attempt(i: int, s: Store) -> None:
        barrier.wait()
        try:
            s.create_job(job(f"j-{i}", created_at=T0 + i))
        except JobConflict as exc:
            with lock:
                lost.append(exc)
        else:
            with lock:
                won.append(f"j-{i}")

    threads = [threading.Thread(target=attempt, args=(i, s)) for i, s in enumerate(stores)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(lost) == len(stores) - 1
        assert all(c.holder == won[0] for c in lost)
        assert [j.job_id for j in stores[0].jobs()] == won
    finally:
        for s in stores:
            s.close()


# -- targets and latency -----------------------------------------------------------------------


def test_targets_are_created_replaced_and_listed_by_group(store: Store) -> None:
    assert store.target("lab") is None and store.targets() == []
    lab = GroupTarget("lab", 25.0, 0.97, None, True, None, T0)
    store.set_target(lab)
    store.set_target(GroupTarget("field", 40.0, None, 6.0, False, "digits-v2", T0 + 1))
    assert store.target("lab") == lab
    replaced = GroupTarget("lab", 18.5, None, 5.5, False, "digits-v1", T0 + 9)
    store.set_target(replaced)
    assert store.target("lab") == replaced
    assert store.targets() == [
        GroupTarget("field", 40.0, None, 6.0, False, "digits-v2", T0 + 1),
        replaced,
    ]
    store.set_target(replace(replaced, loop=True, pinned_variant=None, min_accuracy=0.9))
    back = store.target("lab")
    assert back is not None and (back.loop, back.pinned_variant, back.min_accuracy) == (
        True,
        None,
        0.9,
    )


def test_latency_rows_are_upserted_per_manifest_class_and_point(store: Store) -> None:
    store.put_latency(latency(M2, "rpi5", 0))
    store.put_latency(latency(M1, "rpi5", 1, power_w=None, predicted_p95_ms=None))
    store.put_latency(latency(M1, "orin-nano", 0))
    store.put_latency(latency(M1, "rpi5", 0))
    keys = [(r.manifest_sha256, r.device_class, r.operating_point) for r in store.latencies()]
    assert keys == [(M1, "orin-nano", 0), (M1, "rpi5", 0), (M1, "rpi5", 1), (M2, "rpi5", 0)]
    assert store.latencies(M1)[2] == latency(M1, "rpi5", 1, power_w=None, predicted_p95_ms=None)
    assert store.latencies(M3) == []

    newer = latency(
        M1,
        "rpi5",
        0,
        windows=40,
        devices=5,
        p95_ms=27.0,
        p50_ms=20.0,
        power_w=None,
        updated_at=T0 + 30,
    )
    store.put_latency(newer)
    assert store.latencies(M1) == [
        latency(M1, "orin-nano", 0),
        newer,
        latency(M1, "rpi5", 1, power_w=None, predicted_p95_ms=None),
    ]
    assert len(store.latencies()) == 4


# -- decisions ---------------------------------------------------------------------------------


def test_decisions_are_appended_listed_newest_first_and_counted(store: Store) -> None:
    actions = get_args(DecisionAction)
    assert store.decision_counts() == dict.fromkeys(actions, 0)
    assert store.decisions() == []
    first = store.add_decision(
        "lab", T0, "hold", ["pi-1", "pi-2"], "out of target, cool-down", '{"windows": [4, 5]}'
    )
    assert (first.group, first.ts, first.action, first.devices) == (
        "lab",
        T0,
        "hold",
        ("pi-1", "pi-2"),
    )
    made = [
        first,
        store.add_decision(
            "field", T0 + 1, "build", [], "asked for a faster variant", "{}", job_id="j-4"
        ),
        store.add_decision(
            "lab", T0 + 2, "rollout", ("pi-1",), "faster variant", "{}", rollout_id="r-3"
        ),
        store.add_decision("lab", T0 + 3, "rollout", ["pi-2"], "again", "{}", "r-4", "j-4"),
    ]
    ids = [d.decision_id for d in made]
    assert ids == sorted(ids) and len(set(ids)) == 4

    assert store.decisions() == made[::-1]
    assert store.decisions(group="lab") == [made[3], made[2], made[0]]
    assert store.decisions(group="field") == [made[1]]
    assert store.decisions(group="none") == []
    assert store.decisions(since_id=ids[1]) == [made[3], made[2]]
    assert store.decisions(group="lab", since_id=ids[0], limit=1) == [made[3]]
    assert store.decisions(since_id=ids[3]) == []
    assert store.decisions(limit=2) == [made[3], made[2]]

    assert store.decision_counts() == {
        **dict.fromkeys(actions, 0),
        "hold": 1,
        "build": 1,
        "rollout": 2,
    }
    assert list(store.decision_counts()) == list(actions)
    with pytest.raises(ValueError, match="unknown decision action 'panic'"):
        store.add_decision("lab", T0, "panic", [], "x", "{}")  # type: ignore[arg-type]
    assert len(store.decisions()) == 4


# -- the migration -----------------------------------------------------------------------------


def test_v6_migrates_a_v5_database_and_keeps_its_data(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = backend.raw()
    try:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", MIGRATIONS[:5])
            assert old.migrate() == 5
        old.ingest(IngestBatch(telemetry=[telemetry("pi-1", 0, T0)]))
        old.add_bundle(bundle())
        old.create_rollout(rollout(), [["pi-1"]])
        assert old.migrate() == latest_version() >= 6
        assert backend.count("schema_version") == latest_version()
        assert old.telemetry_count() == 1
        assert old.rollout("r-1") == rollout()
        old.add_model(model())
        old.create_job(job())
        old.add_variant(variant())
        old.set_target(GroupTarget("lab", 25.0, 0.97, None, True, None, T0))
        old.put_latency(latency())
        decision = old.add_decision("lab", T0, "hold", ["pi-1"], "x", "{}")
        assert old.decisions() == [decision]
        for table in (
            "catalogue_models",
            "build_jobs",
            "variants",
            "group_targets",
            "class_latency",
            "loop_decisions",
        ):
            assert backend.count(table) == 1, table
    finally:
        old.close()
