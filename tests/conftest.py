"""Shared fixtures: a real mosquitto per test, per-test topic prefixes, PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.local.broker import MosquittoBroker, MosquittoNotFound
from tests.harness.postgres import postgres_server, scratch_database


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private mosquitto on a free loopback port; tests may stop/restart it."""
    try:
        broker = MosquittoBroker(tmp_path / "mosquitto")
    except MosquittoNotFound as exc:
        # A missing broker is a failure with instructions, never a skip.
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix so tests sharing a broker never see each other's messages."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    """An admin DSN to a PostgreSQL server (local, or a throwaway cluster)."""
    try:
        with postgres_server() as dsn:
            yield dsn
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def postgres_dsn(postgres_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    with scratch_database(postgres_admin_dsn) as dsn:
        yield dsn
