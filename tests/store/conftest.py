"""The abstract store suite: every test taking `store` or `backend` runs once per backend.

As in Flower's linkstate tests, one suite states the Store contract and each backend (a SQLite
file, a real PostgreSQL database) must pass all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.fleet.store import (
    Store,
    open_store,
)
from tests.store.backends import Backend


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite://{tmp_path}/fleet.db")
    return Backend("postgres", request.getfixturevalue("postgres_dsn"))


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = open_store(backend.url)
    try:
        yield s
    finally:
        s.close()
