"""The coordinator's HTTP API over a real SQLite store: views, auth, metrics, OpenAPI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefleet.server.fleet.api import create_app
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import IngestBatch, StatusIn, Store, TelemetryIn
from tests import protocol_samples as samples

TOKEN = "s3cret-token"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(str(tmp_path / "fleet.db"))
    now = time.time()
    batch = IngestBatch()
    for dev, group in (("pi-1", "lab-a"), ("pi-2", "lab-a"), ("jet-1", None)):
        st = samples.status(dev).model_copy(update={"group": group, "ts": now})
        batch.statuses.append(StatusIn(now, st))
        for seq in range(3):
            tm = samples.telemetry(dev, seq).model_copy(
                update={"window_start": now - 10, "window_end": now}
            )
            batch.telemetry.append(TelemetryIn(now, tm))
    batch.statuses.append(StatusIn(now, samples.status("jet-1", online=False)
                                   .model_copy(update={"group": None, "ts": now})))
    s.ingest(batch)
    try:
        yield s
    finally:
        s.close()


def test_devices_groups_and_detail(store: Store) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    devices = client.get("/devices").json()
    assert [d["device_id"] for d in devices] == ["jet-1", "pi-1", "pi-2"]
    by_id = {d["device_id"]: d for d in devices}
    assert by_id["pi-1"]["online"] and not by_id["jet-1"]["online"]
    assert by_id["pi-1"]["p95_ms"] == 9.8 and by_id["pi-1"]["model_id"] == "digits-ee"
    assert [d["device_id"] for d in client.get("/devices?group=lab-a").json()] == ["pi-1", "pi-2"]
    assert client.get("/groups").json() == [{"group": "lab-a", "devices": 2}]

    detail = client.get("/devices/pi-1?windows=2").json()
    assert [w["seq"] for w in detail["windows"]] == [2, 1]
    assert detail["sequence"]["received"] == 3 and detail["sequence"]["missing"] == 0
    assert client.get("/devices/nope").status_code == 404
    assert client.get("/devices/bad+id").status_code == 422


def test_actions_need_the_token(store: Store) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    body = {"group": "lab-b"}
    assert client.put("/devices/pi-1/group", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.put("/devices/pi-1/group", json=body, headers=wrong).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ok = client.put("/devices/pi-1/group", json=body, headers=auth)
    assert ok.status_code == 200 and ok.json()["group"] == "lab-b"
    assert store.device("pi-1").group == "lab-b"  # type: ignore[union-attr]
    bad = client.put("/devices/pi-1/group", json={"group": "a/b"},
                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 422
    extra = client.put("/devices/pi-1/group", json={"group": "x", "oops": 1},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert extra.status_code == 422

    # Pre-registration (for closed registration): a new device with its group.
    reg = client.post("/devices", json={"device_id": "cam-9", "group": "lab-a"}, headers=auth)
    assert reg.status_code == 201 and reg.json()["group"] == "lab-a"
    assert not reg.json()["online"] and store.device("cam-9") is not None
    assert client.post("/devices", json={"device_id": "cam-10"}).status_code == 401
    bad_id = client.post("/devices", json={"device_id": "a b"}, headers=auth)
    assert bad_id.status_code == 422

    # No token configured: actions are refused outright, never open.
    closed = TestClient(create_app(store, token=None))
    assert closed.put("/devices/pi-1/group", json=body).status_code == 403
    # Commands without a broker connection: a clear 503, after auth.
    cmd = {"command": {"name": "ping"}}
    r = client.post("/devices/pi-1/commands", json=cmd, headers=auth)
    assert r.status_code == 503
    r = client.post("/devices/pi-1/commands", json={"command": {"name": "reboot"}},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422


def test_metrics_and_openapi(store: Store) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    text = client.get("/metrics").text
    assert 'edgefleet_devices{group="lab-a"} 2.0' in text
    assert 'edgefleet_devices_online{group="none"} 0.0' in text
    assert 'edgefleet_latency_p95_ms{group="lab-a"} 9.8' in text
    assert 'edgefleet_power_watts{group="lab-a"} 12.8' in text
    assert "edgefleet_telemetry_lost_total 0.0" in text
    assert "edgefleet_telemetry_dropped_total 0.0" in text
    assert "edgefleet_telemetry_windows_total 9.0" in text
    spec = client.get("/openapi.json").json()
    assert {"/devices", "/devices/{device_id}", "/groups", "/events", "/metrics",
            "/devices/{device_id}/commands", "/groups/{group}/commands"} <= set(spec["paths"])
