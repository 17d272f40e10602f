"""Schemathesis against the coordinator's own /openapi.json, in process: no input is a 500.

Every operation gets valid and invalid requests generated from its schema (with the token,
so actions get past the front door), over a real SQLite store and a real commander on a real
mosquitto. Deterministic (derandomize) and bounded (EXAMPLES per operation and mode).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.strategies import SearchStrategy
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from edgefleet.server.fleet.api import RolloutParts, create_app
from edgefleet.server.fleet.commander import Commander
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import IngestBatch, StatusIn, Store, TelemetryIn
from edgefleet.server.keystore import init_key
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.rollout.archives import ArchiveStore
from edgefleet.server.rollout.engine import RolloutEngine
from edgefleet.server.rollout.mqtt import MqttPublisher, MqttSender
from tests import protocol_samples as samples
from tests.fleet_helpers import start_ingestor

TOKEN = "schema-token"
EXAMPLES = int(os.environ.get("EDGEFLEET_SCHEMATHESIS_EXAMPLES", "30"))
# Small enough that a generated body can pass it, so the 413 path is part of the run too.
MAX_BODY = 4096

@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(str(tmp_path / "fleet.db"))
    now = time.time()
    batch = IngestBatch()
    # Offline devices: a command that hits one by chance is not waited for long, and
    # every read operation has rows to render (so response schemas are exercised).
    for dev in ("pi-1", "jet-1"):
        st = samples.status(dev, online=False).model_copy(update={"group": "lab-a", "ts": now})
        batch.statuses.append(StatusIn(now, st))
        batch.telemetry.append(TelemetryIn(now, samples.telemetry(dev, 0)))
    s.ingest(batch)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def api_schema(
    store: Store, mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> Iterator[BaseSchema]:
    ingestor = start_ingestor(mqtt_broker, topic_prefix, store)
    try:
        key, _ = init_key(tmp_path / "keys")
        archives = ArchiveStore(tmp_path / "archives", [key.public])
        engine = RolloutEngine(store, archives, MqttSender(ingestor), MqttPublisher(ingestor))
        app = create_app(
            store,
            token=TOKEN,
            commander=Commander(ingestor),
            max_body_bytes=MAX_BODY,
            rollouts=RolloutParts(engine, archives, upload_max_bytes=MAX_BODY),
        )
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        ingestor.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_is_a_server_error(api_schema: BaseSchema, mode: GenerationMode) -> None:
    # Schemathesis' lazy pytest fixture (schemathesis.pytest.from_fixture) does not run on
    # pytest 9 (it sets Function._nodeid), so each operation gets its own Hypothesis run here.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 17, [op.label for op in operations]
    for operation in operations:
        raw = operation.definition.raw
        if mode.is_negative and not (raw.get("parameters") or raw.get("requestBody")):
            continue  # nothing to get wrong: no parameters, no body
        _fuzz(operation.as_strategy(generation_mode=mode))


def _fuzz(cases: SearchStrategy[Case]) -> None:
    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Case) -> None:
        # A command to a device registered earlier in the run (POST /devices) would wait its
        # timeout_s (default 5 s) for a reply that never comes: make it 0. A negative one
        # stays negative, so invalid bodies stay invalid.
        if isinstance(case.body, dict) and "command" in case.body:
            wait = case.body.get("timeout_s", 5.0)
            if isinstance(wait, (int, float)) and not isinstance(wait, bool):
                case.body["timeout_s"] = min(wait, 0)
        case.call_and_validate(
            headers={"Authorization": f"Bearer {TOKEN}"},
            checks=[not_a_server_error, response_schema_conformance],
        )

    one()
