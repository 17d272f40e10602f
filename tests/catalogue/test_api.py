"""The catalogue's HTTP routes: refusals on the app alone, and one real coordinator driven by
`edgefleet models add|import|build --watch|show|ls|jobs|job` (one real build)."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefleet.server.catalogue.api import CatalogueParts
from edgefleet.server.catalogue.options import ModelOptions
from edgefleet.server.catalogue.upload import pack_model
from edgefleet.server.cli.app import main
from edgefleet.server.fleet.api import create_app
from edgefleet.server.fleet.store.catalogue_base import LatencyRecord
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.reference import MODEL_PATH
from tests.catalogue.rig import REFERENCE_OPTIONS, Rig, reference_npz, rig
from tests.rollout.fleet import TOKEN, local_fleet, reference_version, start_coordinator_with

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_npz(tmp_path_factory.mktemp("data") / "mnist.npz")


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[tuple[Rig, TestClient]]:
    with rig(tmp_path) as r:
        parts = CatalogueParts(r.files, r.runner(), r.archives, upload_max_bytes=20 << 20)
        yield r, TestClient(create_app(r.store, token=TOKEN, catalogue=parts))


def _upload(source: Path, data: Path, options: ModelOptions = REFERENCE_OPTIONS) -> bytes:
    return pack_model(source, data, options)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _detail(resp: object) -> str:
    return str(resp.json()["detail"])  # type: ignore[attr-defined]


def test_adding_models_and_what_is_refused(
    catalogue: tuple[Rig, TestClient], npz: Path, tmp_path: Path
) -> None:
    r, client = catalogue
    body = _upload(MODEL_PATH, npz)
    assert client.post("/models?name=digits", content=body).status_code == 401
    added = client.post("/models?name=digits", content=body, headers=AUTH)
    assert added.status_code == 201, added.text
    view = added.json()
    assert (view["name"], view["model_id"], view["variants"]) == ("digits", "digits", 0)
    assert view["options"] == {"mean": [0.1307], "std": [0.3081]}
    stored = r.store.model("digits")
    assert stored is not None
    assert r.files.path(stored.source_path).read_bytes() == MODEL_PATH.read_bytes()

    again = client.post("/models?name=digits", content=body, headers=AUTH)
    assert again.status_code == 409 and "already in the catalogue" in _detail(again)
    same_id = _upload(MODEL_PATH, npz, REFERENCE_OPTIONS.model_copy(update={"model_id": "digits"}))
    clash = client.post("/models?name=other", content=same_id, headers=AUTH)
    assert clash.status_code == 409 and "model id 'digits'" in _detail(clash)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    rgb = REFERENCE_OPTIONS.model_copy(update={"color": "RGB"})
    refused = {
        "not-onnx": (_upload(npz, npz), "not an ONNX model"),
        "bad-data": (_upload(MODEL_PATH, garbage), "the data cannot be used: not a readable .npz"),
        "bad-fit": (_upload(MODEL_PATH, npz, rgb), "1 channel(s) but --color RGB"),
        "bad-opts": (
            _tar({"source.onnx": b"x", "data.npz": b"y", "options.json": b'{"prune": 2}'}),
            "options.json: prune",
        ),
        "bad-tar": (_tar({"source.onnx": b"x", "data.npz": b"y", "extra.sh": b"z"}), "extra.sh"),
        "empty": (b"", "empty body"),
    }
    for name, (upload, says) in refused.items():
        resp = client.post(f"/models?name={name}", content=upload, headers=AUTH)
        assert resp.status_code == 422, (name, resp.text)
        assert says in _detail(resp), (name, resp.text)
    assert client.post("/models?name=-bad", content=body, headers=AUTH).status_code == 422
    assert [m.name for m in r.store.models()] == ["digits"]
    # Nothing of a refused upload is left in the catalogue directory.
    assert sorted(p.name for p in r.files.models_dir.iterdir()) == ["digits"]
    assert list((r.files.root / ".uploads").iterdir()) == []

    small = TestClient(
        create_app(
            r.store, token=TOKEN,
            catalogue=CatalogueParts(r.files, r.runner(), r.archives, upload_max_bytes=1000),
        )
    )
    too_big = small.post("/models?name=big", content=body, headers=AUTH)
    assert too_big.status_code == 413


def test_builds_jobs_variants_and_refusals(
    catalogue: tuple[Rig, TestClient], npz: Path, tmp_path: Path
) -> None:
    r, client = catalogue
    r.add_reference("digits", npz, model_id="mnist-cnn")
    assert client.post("/models/digits/builds", json={}).status_code == 401
    bad = client.post("/models/digits/builds", json={"colour": "RGB"}, headers=AUTH)
    assert bad.status_code == 422
    assert client.post("/models/nope/builds", json={}, headers=AUTH).status_code == 404
    job = client.post("/models/digits/builds", json={"prune": 0.25}, headers=AUTH)
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    assert job.json()["state"] == "queued"
    assert job.json()["options"] == {"mean": [0.1307], "prune": 0.25, "std": [0.3081]}
    busy = client.post("/models/digits/builds", json={}, headers=AUTH)
    assert busy.status_code == 409 and job_id in _detail(busy)
    listed = client.get("/jobs?model=digits").json()
    assert [j["job_id"] for j in listed] == [job_id]
    assert client.get("/models").json()[0]["open_job"] == job_id
    shown = client.get(f"/jobs/{job_id}").json()
    assert shown["log_tail"] == []  # not started: no log yet
    assert client.get("/jobs/job-nope").status_code == 404
    cancelled = client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.post(f"/jobs/{job_id}/cancel", headers=AUTH).status_code == 409
    assert client.get("/jobs?state=cancelled").json()[0]["job_id"] == job_id

    # A bundle the coordinator holds, registered as a variant.
    info = r.archives.add(reference_version(tmp_path, r.key, 3))
    unknown = client.post(
        "/models/digits/variants", json={"bundle_sha256": "0" * 64}, headers=AUTH
    )
    assert unknown.status_code == 404
    sha = {"bundle_sha256": info.sha256}
    reg = client.post("/models/digits/variants", json=sha, headers=AUTH)
    assert reg.status_code == 201, reg.text
    variant = reg.json()
    assert (variant["variant_id"], variant["version"], variant["job_id"]) == ("digits-v3", 3, None)
    assert variant["points"][0]["name"] == "full" and variant["fleet"] == []
    twice = client.post("/models/digits/variants", json=sha, headers=AUTH)
    assert twice.status_code == 409
    retired = client.post("/variants/digits-v3/retire", headers=AUTH).json()
    assert retired["retired_at"] is not None
    assert client.post("/variants/digits-v3/restore", headers=AUTH).json()["retired_at"] is None
    assert client.post("/variants/nope-v1/retire", headers=AUTH).status_code == 404
    detail = client.get("/models/digits").json()
    assert [v["variant_id"] for v in detail["variants"]] == ["digits-v3"]
    assert [j["job_id"] for j in detail["jobs"]] == [job_id]


def test_without_a_signing_key_builds_are_refused(tmp_path: Path, npz: Path) -> None:
    with rig(tmp_path) as r:
        r.add_reference("digits", npz)
        runner = type(r.runner())(r.store, r.files, r.archives, None)
        client = TestClient(
            create_app(r.store, token=TOKEN, catalogue=CatalogueParts(r.files, runner, r.archives))
        )
        resp = client.post("/models/digits/builds", json={}, headers=AUTH)
        assert resp.status_code == 409 and "--signing-key" in _detail(resp)
        assert r.store.jobs() == []


def _cli(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str]:
    code = main(["models", *args, "--url", url, "--token", TOKEN])
    out, err = capsys.readouterr()
    return code, out + err


def test_the_operator_cli_against_a_real_coordinator(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    tmp_path: Path,
    npz: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with local_fleet(tmp_path, mqtt_broker, f"{topic_prefix}/edgefleet/v1") as fleet:
        start_coordinator_with(fleet, signing_key=fleet.key.directory / "fleet.key")
        assert fleet.coordinator is not None
        url = fleet.coordinator.url
        code, out = _cli(
            capsys, url, "add", str(MODEL_PATH), "--data", str(npz), "--name", "digits",
            "--model-id", "mnist-cnn", "--mean", "0.1307", "--std", "0.3081",
        )
        assert code == 0, out
        assert "added model digits (model id mnist-cnn)" in out
        # The bundle the fleet runs today comes first, as it is.
        code, out = _cli(
            capsys, url, "import", str(reference_version(tmp_path, fleet.key, 1)),
            "--model", "digits",
        )
        assert code == 0 and "as variant digits-v1" in out, out

        code, out = _cli(capsys, url, "build", "digits", "--max-drop", "0.02", "--watch")
        assert code == 0, out
        # Progress as --watch saw it (polling: which steps it caught depends on the machine).
        assert re.search(r"^\[[1-7]/7\] ", out, re.MULTILINE), out
        assert "succeeded: variant digits-v2" in out, out
        job_id = out.split("build job ", 1)[1].split()[0]

        store = fleet.coordinator.store
        v2 = store.variant("digits-v2")
        assert v2 is not None and v2.job_id == job_id and v2.model_id == "mnist-cnn"
        info = fleet.coordinator.archives.get(v2.bundle_sha256)
        assert info is not None and info.version == 2  # above the imported v1
        # What the loop will fill: the fleet's p95 per device class.
        store.put_latency(
            LatencyRecord(v2.manifest_sha256, "rpi5", v2.default_point, 12, 3, 7.25, 5.0, None,
                          None, time.time())
        )
        code, out = _cli(capsys, url, "show", "digits")
        assert code == 0, out
        rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("digits-v")}
        assert set(rows) == {"digits-v1", "digits-v2"}
        points = json.loads(v2.points_json)
        default = points[v2.default_point]
        assert f"{default['val_accuracy']:.2%}" in rows["digits-v2"]
        assert f"{default['test_accuracy']:.2%}" in rows["digits-v2"]
        assert "rpi5 7.25 ms" in rows["digits-v2"]
        assert json.loads(v2.estimate_json)["measured_on"] in rows["digits-v2"]
        assert f"{v2.macs / 1e6:.1f}M" in rows["digits-v2"]

        code, out = _cli(capsys, url, "ls")
        assert code == 0 and "digits" in out and "mnist-cnn" in out
        code, out = _cli(capsys, url, "jobs", "--model", "digits")
        assert code == 0 and job_id in out and "succeeded" in out and "digits-v2" in out
        code, out = _cli(capsys, url, "job", job_id, "--log-lines", "5")
        assert code == 0 and "step 7/7" in out and "| " in out, out
        code, out = _cli(capsys, url, "cancel", job_id)
        assert code == 1 and "already ended (succeeded)" in out
        code, out = _cli(capsys, url, "build", "nope")
        assert code == 1 and "no model 'nope'" in out
