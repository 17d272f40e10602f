"""Build jobs on real parts: the optimizer as a process, a SQLite store, the archive store.

Real builds are few (each is ~10-15 s): one that succeeds (after a coordinator was killed
mid-build, which also shows the same build can run again), one cancelled at step 2, one
that fails at once on a corrupt model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.hardware import device_class
from edgefleet.server.catalogue.errors import InvalidInput, NotPossible, UnknownModel
from edgefleet.server.catalogue.jobs import STOPPED, submit
from edgefleet.server.catalogue.options import BuildOptions
from edgefleet.server.catalogue.variants import next_version, register_bundle
from edgefleet.server.fleet.store.errors import JobConflict
from edgefleet.server.local.waiting import wait_until
from tests.catalogue.rig import Rig, alive, pid_of, reference_npz, rig
from tests.rollout.fleet import reference_version

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_npz(tmp_path_factory.mktemp("data") / "mnist.npz")


def _step(r: Rig, job_id: str) -> int:
    job = r.store.job(job_id)
    assert job is not None
    return job.step


def test_a_killed_coordinator_leaves_no_variant_and_the_build_runs_again(
    tmp_path: Path, npz: Path
) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz)
        first = submit(r.store, "digits", BuildOptions(max_drop=0.02), "operator")
        # The runner in a process of its own, killed outright mid-build like a coordinator.
        runner_proc = subprocess.Popen(
            [sys.executable, "-m", "tests.catalogue.runner_proc", r.db, str(r.files.root),
             str(r.archives.directory), str(r.key_file)],
            cwd=REPO,
        )
        try:
            wait_until(lambda: _step(r, first.job_id) >= 2, 120, "the build at step 2")
            optimizer = pid_of(r.files, first.job_id)
            assert alive(optimizer)
            runner_proc.kill()
            runner_proc.wait(10)
            # The optimizer dies with the runner that started it (parent-death signal).
            wait_until(lambda: not alive(optimizer), 10, "the orphaned optimizer to die")
        finally:
            runner_proc.kill()
        stuck = r.store.job(first.job_id)
        assert stuck is not None and stuck.state == "running"
        assert r.files.work_dir(first.job_id).is_dir()

        runner = r.runner()
        assert runner.recover() == [first.job_id]
        failed = r.store.job(first.job_id)
        assert failed is not None and failed.state == "failed" and failed.reason == STOPPED
        assert failed.variant_id is None and r.store.variants() == []
        assert not r.files.work_dir(first.job_id).exists()
        assert not r.files.pid_file(first.job_id).exists()
        assert r.files.path(failed.log_path).is_file()  # the log stays, to read what happened

        # The same build again, to the end: its variant carries the report's figures.
        again = submit(r.store, "digits", BuildOptions(max_drop=0.02), "operator")
        done = runner.run_next()
        assert done is not None and done.job_id == again.job_id
        assert done.state == "succeeded", done.reason
        assert (done.step, done.steps) == (7, 7)
        [variant] = r.store.variants("digits")
        assert done.variant_id == variant.variant_id == "digits-v1"
        assert not r.files.work_dir(again.job_id).exists()
        report = r.report(again.job_id)
        exits = report["exits"]
        assert isinstance(exits, dict)
        points = json.loads(variant.points_json)
        assert [p["name"] for p in points] == [p["name"] for p in exits["operating_points"]]
        for got, want in zip(points, exits["operating_points"], strict=True):
            assert got["val_accuracy"] == want["val_accuracy"]
            assert got["expected_macs"] == want["expected_macs"]
            assert got["exit_rates"] == want["exit_rates"]
        assert variant.default_point == exits["default"]
        test = report["test"]
        assert isinstance(test, dict)
        assert points[variant.default_point]["test_accuracy"] == test["accuracy"]
        assert [p["test_accuracy"] for i, p in enumerate(points) if i != variant.default_point] \
            == [None] * (len(points) - 1)
        model = report["model"]
        assert isinstance(model, dict) and variant.macs == model["macs"]
        estimate = json.loads(variant.estimate_json)
        assert estimate["measured_on"] == device_class()
        assert estimate["latency_ms"] == report["latency_ms"]
        # The archive the variant names is stored, verifies, and is the bundle built.
        info = r.archives.get(variant.bundle_sha256)
        assert info is not None and info.size == variant.size_bytes
        assert info.manifest_sha256 == variant.manifest_sha256
        assert (info.model_id, info.version) == ("digits", 1)
        assert estimate["by_class"] == _health_latency(info.path, r)
        assert json.loads(variant.options_json) == {
            "max_drop": 0.02, "mean": [0.1307], "std": [0.3081],
        }


def _health_latency(archive: Path, r: Rig) -> dict[str, float]:
    from edgefleet.agent.bundle import unpack

    bundle = unpack(archive, r.root / "check")
    health = verify_bundle(bundle, [r.key.public]).manifest.health
    assert health is not None
    return dict(health.latency_ms)


def test_cancel_mid_build_kills_it_and_leaves_nothing(tmp_path: Path, npz: Path) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz)
        job = submit(r.store, "digits", BuildOptions(), "operator")
        runner = r.runner()
        ended: list[object] = []
        worker = threading.Thread(target=lambda: ended.append(runner.run_next()))
        worker.start()
        try:
            wait_until(lambda: _step(r, job.job_id) >= 2, 120, "the build at step 2")
            optimizer = pid_of(r.files, job.job_id)
            cancelled = runner.cancel(job.job_id)
            assert (cancelled.state, cancelled.reason) == ("cancelled", "cancelled by the operator")
            worker.join(60)
        finally:
            if worker.is_alive():
                runner.stop()
                worker.join(30)
        assert not worker.is_alive()
        final = r.store.job(job.job_id)
        assert final is not None and final.state == "cancelled" and final.variant_id is None
        assert r.store.variants() == [] and r.archives.all() == []
        assert not r.files.work_dir(job.job_id).exists()
        assert not alive(optimizer)
        with pytest.raises(NotPossible, match="already ended"):
            runner.cancel(job.job_id)
        # Cancelling a queued job needs no process.
        queued = submit(r.store, "digits", BuildOptions(), "operator")
        assert runner.cancel(queued.job_id).state == "cancelled"
        assert runner.run_next() is None


def test_a_failing_build_fails_with_the_optimizers_reason(tmp_path: Path, npz: Path) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz)
        # The stored source rots after it was checked: the build, not the add, finds out.
        model = r.store.model("digits")
        assert model is not None
        r.files.path(model.source_path).write_bytes(b"\x08\x01garbage, not a protobuf" * 10)
        job = submit(r.store, "digits", BuildOptions(), "operator")
        done = r.runner().run_next()
        assert done is not None and done.job_id == job.job_id
        assert done.state == "failed"
        assert done.reason is not None and "not an ONNX model" in done.reason, done.reason
        assert not done.reason.startswith("edgefleet")  # the optimizer's message alone
        assert done.variant_id is None and r.store.variants() == [] and r.archives.all() == []
        assert not r.files.work_dir(job.job_id).exists()
        log = r.files.path(done.log_path).read_text()
        assert "not an ONNX model" in log


def test_one_open_job_per_model_and_unknown_models(tmp_path: Path, npz: Path) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz)
        first = submit(r.store, "digits", BuildOptions(), "operator")
        with pytest.raises(JobConflict, match=first.job_id):
            submit(r.store, "digits", BuildOptions(prune=0.5), "loop")
        with pytest.raises(UnknownModel, match="no model 'nope'"):
            submit(r.store, "nope", BuildOptions(), "operator")


def test_without_a_signing_key_a_job_fails_saying_so(tmp_path: Path, npz: Path) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz)
        runner = type(r.runner())(r.store, r.files, r.archives, None)
        assert runner.build_refusal() is not None
        job = submit(r.store, "digits", BuildOptions(), "loop")
        done = runner.run_next()
        assert done is not None and done.job_id == job.job_id and done.state == "failed"
        assert done.reason is not None and "--signing-key" in done.reason


def test_versions_stay_above_every_variant_and_stored_archive(tmp_path: Path, npz: Path) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz, model_id="mnist-cnn")
        assert next_version(r.store, r.archives, "digits", "mnist-cnn") == 1
        # An archive of the model id that never became a variant still holds its number.
        r.archives.add(reference_version(tmp_path, r.key, 4))
        assert next_version(r.store, r.archives, "digits", "mnist-cnn") == 5
        # A bundle the fleet already runs, registered as it is.
        v6 = reference_version(tmp_path, r.key, 6)
        variant = register_bundle(r.store, r.archives, "digits", v6)
        assert (variant.variant_id, variant.version, variant.job_id) == ("digits-v6", 6, None)
        points = json.loads(variant.points_json)
        assert [p["name"] for p in points] == ["full"] and variant.default_point == 0
        assert variant.macs > 40_000_000  # counted from the stage file: the manifest has none
        assert points[0]["expected_macs"] == variant.macs
        assert next_version(r.store, r.archives, "digits", "mnist-cnn") == 7
        with pytest.raises(NotPossible, match="already registered"):
            again = reference_version(tmp_path / "b", r.key, 6)
            register_bundle(r.store, r.archives, "digits", again)
        r.add_reference("other", npz)
        with pytest.raises(InvalidInput, match="model id is 'mnist-cnn'"):
            v8 = reference_version(tmp_path / "c", r.key, 8)
            register_bundle(r.store, r.archives, "other", v8)


def test_jobs_and_variants_on_postgresql(tmp_path: Path, npz: Path, postgres_dsn: str) -> None:
    """The same rules on the other backend (no build: the runner has no key)."""
    with rig(tmp_path, postgres_dsn) as r:
        r.add_reference("digits", npz, model_id="mnist-cnn")
        first = submit(r.store, "digits", BuildOptions(), "operator")
        with pytest.raises(JobConflict):
            submit(r.store, "digits", BuildOptions(), "loop")
        keyless = type(r.runner())(r.store, r.files, r.archives, None)
        assert keyless.cancel(first.job_id).state == "cancelled"
        second = submit(r.store, "digits", BuildOptions(), "loop")
        done = keyless.run_next()
        assert done is not None and done.job_id == second.job_id and done.state == "failed"
        # A job a dead coordinator left running is failed by the next one's recover().
        third = submit(r.store, "digits", BuildOptions(), "operator")
        assert r.store.update_job(third.job_id, only_if=["queued"], state="running")
        r.files.fresh_work_dir(third.job_id)
        assert r.runner().recover() == [third.job_id]
        assert not r.files.work_dir(third.job_id).exists()
        v2 = reference_version(tmp_path, r.key, 2)
        variant = register_bundle(r.store, r.archives, "digits", v2)
        assert r.store.variant_by_manifest(variant.manifest_sha256) == variant
        assert next_version(r.store, r.archives, "digits", "mnist-cnn") == 3
