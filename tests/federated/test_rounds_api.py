"""Schemathesis against the /fed/rounds routes, in process: no input is a 500.

A real store and round engine over real archives (the digits bundle, which group 'lab' runs;
group 'lab-a' runs a bundle the coordinator lacks), a fake broker for the tasks. Generated
specs start rounds (201), are refused (400, 404, 409, 422) or abort them; every answer must
match the documented schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from edgefleet.agent.bundle import generate_private_key
from edgefleet.server.fleet.api import create_app
from tests.federated.rounds_rig import Rig

TOKEN = "schema-token"
EXAMPLES = int(os.environ.get("EDGEFLEET_SCHEMATHESIS_EXAMPLES", "30"))


@pytest.fixture
def api_schema(tmp_path: Path) -> Iterator[BaseSchema]:
    rig = Rig(tmp_path, generate_private_key(), with_holdout=False)
    rig.devices("pi-1", "pi-2", "pi-3")
    rig.status("cam-1", group="lab-a", bundle="f" * 64)
    app = create_app(rig.store, token=TOKEN, rounds=rig.engine)
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        rig.store.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_round_request_is_a_server_error(api_schema: BaseSchema, mode: GenerationMode) -> None:
    operations = [
        op
        for result in api_schema.get_all_operations()
        if (op := result.ok()).path.startswith("/fed/")
    ]
    assert sorted(op.label for op in operations) == [
        "GET /fed/rounds",
        "GET /fed/rounds/{round_id}",
        "POST /fed/rounds",
        "POST /fed/rounds/{round_id}/abort",
    ]
    for operation in operations:
        raw = operation.definition.raw
        if mode.is_negative and not (raw.get("parameters") or raw.get("requestBody")):
            continue
        _fuzz(operation.as_strategy(generation_mode=mode))


def _fuzz(cases: object) -> None:
    @given(case=cases)  # type: ignore[arg-type]
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Case) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {TOKEN}"},
            checks=[not_a_server_error, response_schema_conformance],
        )

    one()


def test_the_documented_answers(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    rig = Rig(tmp_path, generate_private_key(), with_holdout=False)
    rig.devices("pi-1", "pi-2", "pi-3")
    rig.status("cam-1", group="lab-a", bundle="f" * 64)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        http = TestClient(create_app(rig.store, token=TOKEN, rounds=rig.engine))
        created = http.post("/fed/rounds", json={"group": "lab", "quorum": "1"}, headers=auth)
        assert created.status_code == 201, created.text
        body = created.json()
        rid = body["round_id"]
        assert (body["state"], body["phase"], body["expected"]) == (
            "running",
            "announce",
            ["pi-1", "pi-2", "pi-3"],
        )
        assert body["spec"]["quorum"] == "1" and body["heads"] == [0]
        again = http.post("/fed/rounds", json={"group": "lab"}, headers=auth)
        assert again.status_code == 409 and rid in again.json()["detail"]
        assert http.post("/fed/rounds", json={"group": "lab"}).status_code == 401
        other = http.post("/fed/rounds", json={"group": "lab-a"}, headers=auth)
        assert other.status_code == 409 and "does not hold" in other.json()["detail"]
        assert http.post("/fed/rounds", json={"group": "x"}, headers=auth).status_code == 404
        bad = http.post("/fed/rounds", json={"group": "lab", "epochs": 3}, headers=auth)
        assert bad.status_code == 422
        listed = http.get("/fed/rounds", params={"group": "lab"}).json()
        assert [r["round_id"] for r in listed] == [rid] and listed[0]["updates"] is None
        shown = http.get(f"/fed/rounds/{rid}").json()
        assert shown["updates"] == [] and shown["counts"] == {}
        assert http.get("/fed/rounds/f-nope").status_code == 404
        aborted = http.post(f"/fed/rounds/{rid}/abort", headers=auth)
        assert aborted.status_code == 200 and aborted.json()["state"] == "aborted"
        assert http.post(f"/fed/rounds/{rid}/abort", headers=auth).status_code == 409
        assert http.post("/fed/rounds/f-nope/abort", headers=auth).status_code == 404
        heads = http.post("/fed/rounds", json={"group": "lab", "heads": [3]}, headers=auth)
        assert heads.status_code == 400 and "early exit 3" in heads.json()["detail"]
    finally:
        rig.store.close()
