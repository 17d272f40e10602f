"""The coordinator's MQTT client id: unguessable per installation, the same across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree, encode
from edgefleet.server.fleet.client_id import (
    ID_FILE,
    PREFIX,
    coordinator_client_id,
    state_dir_for,
)
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests import protocol_samples as samples
from tests.fleet_helpers import RawPublisher


def test_each_installation_gets_its_own_id_and_keeps_it(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    first = coordinator_client_id(one)
    assert first.startswith(PREFIX) and len(first) >= len(PREFIX) + 16
    assert coordinator_client_id(one) == first  # a restart reads it back
    assert (one / ID_FILE).read_text().strip() == first
    assert coordinator_client_id(two) != first
    # The secure profile: the broker takes the username as the client id anyway.
    assert coordinator_client_id(one, "coord-a") == "coord-a"


def test_the_state_dir_is_beside_a_sqlite_store_else_the_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert state_dir_for(f"sqlite://{tmp_path}/db/fleet.db") == tmp_path / "db"
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert state_dir_for("postgresql://edgefleet@db/edgefleet") == Path("/var/lib/edgefleet")
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/unit:/elsewhere")
    assert state_dir_for("host=db dbname=edgefleet") == tmp_path / "unit"


def test_a_damaged_id_file_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / ID_FILE).write_text("\n")
    with pytest.raises(ValueError, match=ID_FILE):
        coordinator_client_id(tmp_path)
    assert (tmp_path / ID_FILE).read_text() == "\n"


def test_the_default_id_is_per_installation_and_the_session_survives_a_restart(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> None:
    def config(home: Path) -> CoordinatorConfig:
        return CoordinatorConfig(
            store=f"sqlite://{home}/fleet.db",
            mqtt=IngestConfig(host=mqtt_broker.host, port=mqtt_broker.port, root=topic_prefix),
            http_port=0,
        )

    def start(home: Path) -> Coordinator:
        c = Coordinator(config(home))
        c.start()
        assert c.ingestor.wait_connected(10)
        return c

    topic = TopicTree(topic_prefix).device("pi-7", "telemetry")
    pub = RawPublisher(mqtt_broker)
    home = tmp_path / "site-a"
    coordinator = start(home)
    try:
        first_id = coordinator.ingestor.cfg.client_id
        assert first_id is not None and first_id.startswith(PREFIX)
        pub.publish(topic, encode(samples.telemetry("pi-7", seq=0)))
        wait_until(lambda: coordinator.store.telemetry_count() == 1, 20, "window 0 stored")
        coordinator.stop()
        # While it is down the broker queues for its session, which only the same id gets back.
        for seq in (1, 2, 3):
            pub.publish(topic, encode(samples.telemetry("pi-7", seq=seq)))
        coordinator = start(home)
        assert coordinator.ingestor.cfg.client_id == first_id
        wait_until(lambda: coordinator.store.telemetry_count() == 4, 20, "the queued windows 1..3")
        # Another installation (its own state dir) does not share, or take over, the id.
        other = start(tmp_path / "site-b")
        try:
            assert other.ingestor.cfg.client_id not in (None, first_id)
        finally:
            other.stop()
    finally:
        coordinator.stop()
        pub.close()
