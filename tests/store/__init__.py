"""The coordinator's store: one suite run against SQLite and a real PostgreSQL."""
