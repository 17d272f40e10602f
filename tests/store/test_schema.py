"""Schema versions and store URLs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgefleet.server.fleet.store import (
    IngestBatch,
    SqliteStore,
    open_store,
    schema,
)
from edgefleet.server.fleet.store.schema import MIGRATIONS, latest_version, split_statements
from tests.store.backends import Backend
from tests.store.payloads import (
    T0,
    telemetry,
)


def test_migrate_twice_is_a_no_op_and_reports_the_version(backend: Backend) -> None:
    fresh = backend.raw()
    try:
        assert fresh.schema_version() == 0
        assert fresh.migrate() == latest_version() == len(MIGRATIONS)
        fresh.ingest(IngestBatch(telemetry=[telemetry("pi-1", 0, T0)]))
        assert fresh.migrate() == latest_version()
        assert fresh.schema_version() == latest_version()
        # A second migrate kept the data and recorded no second row.
        assert fresh.telemetry_count() == 1
        assert backend.count("schema_version") == latest_version()
    finally:
        fresh.close()
    reopened = open_store(backend.url)
    try:
        assert reopened.schema_version() == latest_version()
        assert [d.device_id for d in reopened.devices()] == ["pi-1"]
    finally:
        reopened.close()


def test_v2_keeps_what_v1_declared_lost_and_starts_dropped_at_zero(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = backend.raw()
    try:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", MIGRATIONS[:1])
            assert old.migrate() == 1
        backend.execute(
            "INSERT INTO devices (device_id, registered_at, first_seq, max_seq, received, lost)"
            " VALUES ('pi-1', 1.0, 0, 9, 7, 3)"
        )
        backend.execute("INSERT INTO lost_ranges VALUES ('pi-1', 2, 4, 2.0)")
        assert old.migrate() == latest_version()
        (rep,) = old.sequence_reports("pi-1")
        assert (rep.missing, rep.lost, rep.dropped) == (3, 3, 0)
        # The old range is a lost one: a late arrival takes it out of lost.
        old.ingest(IngestBatch(telemetry=[telemetry("pi-1", 3, T0)]))
        (rep,) = old.sequence_reports("pi-1")
        assert (rep.missing, rep.lost, rep.dropped) == (2, 2, 0)
    finally:
        old.close()


def test_migrations_are_numbered_and_split() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    statements = split_statements(MIGRATIONS[0].sqlite_sql)
    assert statements[0].startswith("CREATE TABLE devices")
    assert all(";" not in s[:-1] for s in statements)
    assert sum(s.startswith("CREATE TABLE") for s in statements) == 10
    # Both dialects create the same tables and indexes.
    for m in MIGRATIONS:
        names = [re.findall(r"CREATE (?:TABLE|INDEX) (\w+)", sql) for sql in m[2:]]
        assert names[0] == names[1]


def test_open_store_reads_urls_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, path in [
        ("relative.db", tmp_path / "relative.db"),
        ("sqlite://sub/rel.db", tmp_path / "sub" / "rel.db"),
        (f"sqlite://{tmp_path}/abs.db", tmp_path / "abs.db"),
        (str(tmp_path / "plain.db"), tmp_path / "plain.db"),
    ]:
        s = open_store(url)
        try:
            assert isinstance(s, SqliteStore)
            assert s.schema_version() == latest_version()
        finally:
            s.close()
        assert path.is_file(), url
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mysql://db/fleet")
