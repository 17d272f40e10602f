"""The store backends every store test runs against."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import psycopg

from edgefleet.server.fleet.store import (
    PostgresStore,
    SqliteStore,
    Store,
)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str

    def raw(self) -> Store:
        """The store class itself, without migrate()."""
        if self.name == "sqlite":
            return SqliteStore(self.url[len("sqlite://") :])
        return PostgresStore(self.url)

    def execute(self, statement: str) -> None:
        """Run one statement behind the store's back (to build an old database)."""
        if self.name == "sqlite":
            with sqlite3.connect(self.url[len("sqlite://") :]) as conn:
                conn.execute(statement)
            return
        with psycopg.connect(self.url) as pg:
            pg.execute(statement)

    def count(self, table: str) -> int:
        """Rows of a table, read behind the store's back."""
        if self.name == "sqlite":
            with sqlite3.connect(self.url[len("sqlite://") :]) as conn:
                return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        with psycopg.connect(self.url) as pg:
            row = pg.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert row is not None
            return int(row[0])
