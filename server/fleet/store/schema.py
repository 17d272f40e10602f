"""Versioned schema of the coordinator's store, one SQL text per backend and version.

Migrations are applied in order, each in its own transaction together with its row in
schema_version, so a crash leaves the database at a whole version. To change the schema,
append Migration(2, ...) with both dialects; never edit a migration that has shipped.

Disk arithmetic behind the layout: a year of 10 s windows from 1,000 devices is
1,000 * 8,640/day * 365 = ~3.2e9 raw rows (several TB of JSON). Keeping raw windows for
7 days (~60 M rows) and hourly rollups for a year (1,000 * 8,760 = ~8.8 M small rows) keeps
the store bounded whatever the fleet's age; apply_retention() moves rows from the first to
the second.

Notes on the layout:
- Payloads are stored as the JSON their pydantic model writes and re-validated on reading.
  Telemetry also keeps the few numbers the rollups aggregate in columns, so retention is one
  GROUP BY in SQL instead of parsing millions of JSON documents.
- No foreign keys: every writer creates the device row earlier in the same transaction, and
  devices are never deleted; a key check per telemetry row would only cost ingest time.
- Timestamps are Unix seconds as doubles, by the coordinator's clock unless named ts.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple


class Migration(NamedTuple):
    """One schema step: the SQL that brings version - 1 to version, per dialect."""

    version: int
    description: str
    sqlite_sql: str
    postgres_sql: str


_V1_SQLITE = """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    device_group TEXT,
    registered_at REAL NOT NULL,
    first_seen REAL,
    last_seen REAL,
    online INTEGER NOT NULL DEFAULT 0,
    status_json TEXT,
    status_ts REAL,
    boot_id TEXT,
    last_telemetry_json TEXT,
    last_telemetry_seq INTEGER,
    id_conflicts INTEGER NOT NULL DEFAULT 0,
    first_seq INTEGER,
    max_seq INTEGER,
    received INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    reported_overflow INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX devices_group ON devices (device_group);

CREATE TABLE boot_ids (
    device_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (device_id, boot_id)
);

CREATE TABLE telemetry (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_at REAL NOT NULL,
    window_start REAL NOT NULL,
    window_end REAL NOT NULL,
    frames_processed INTEGER NOT NULL,
    fps REAL NOT NULL,
    p95_ms REAL NOT NULL,
    power_w REAL,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_received_at ON telemetry (received_at);

CREATE TABLE lost_ranges (
    device_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    declared_at REAL NOT NULL,
    PRIMARY KEY (device_id, first_seq)
);

CREATE TABLE events (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX events_received_at ON events (received_at);

CREATE TABLE rollups (
    device_id TEXT NOT NULL,
    bucket_start REAL NOT NULL,
    windows INTEGER NOT NULL,
    frames_processed INTEGER NOT NULL,
    fps_sum REAL NOT NULL,
    p95_max REAL NOT NULL,
    power_sum REAL NOT NULL,
    power_n INTEGER NOT NULL,
    energy_j REAL NOT NULL,
    PRIMARY KEY (device_id, bucket_start)
);
CREATE INDEX rollups_bucket_start ON rollups (bucket_start);

CREATE TABLE commands (
    command_id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    name TEXT NOT NULL,
    body_json TEXT NOT NULL,
    sent_at REAL NOT NULL
);
CREATE INDEX commands_sent_at ON commands (sent_at);

CREATE TABLE replies (
    command_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (command_id, device_id)
);

CREATE TABLE rejects (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    device_id TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE TABLE reject_counts (
    reason TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
"""

_V1_POSTGRES = """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    device_group TEXT,
    registered_at DOUBLE PRECISION NOT NULL,
    first_seen DOUBLE PRECISION,
    last_seen DOUBLE PRECISION,
    online BOOLEAN NOT NULL DEFAULT FALSE,
    status_json TEXT,
    status_ts DOUBLE PRECISION,
    boot_id TEXT,
    last_telemetry_json TEXT,
    last_telemetry_seq BIGINT,
    id_conflicts BIGINT NOT NULL DEFAULT 0,
    first_seq BIGINT,
    max_seq BIGINT,
    received BIGINT NOT NULL DEFAULT 0,
    duplicates BIGINT NOT NULL DEFAULT 0,
    lost BIGINT NOT NULL DEFAULT 0,
    reported_overflow BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_group ON devices (device_group);

CREATE TABLE boot_ids (
    device_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, boot_id)
);

CREATE TABLE telemetry (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    window_start DOUBLE PRECISION NOT NULL,
    window_end DOUBLE PRECISION NOT NULL,
    frames_processed BIGINT NOT NULL,
    fps DOUBLE PRECISION NOT NULL,
    p95_ms DOUBLE PRECISION NOT NULL,
    power_w DOUBLE PRECISION,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_received_at ON telemetry (received_at);

CREATE TABLE lost_ranges (
    device_id TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    declared_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, first_seq)
);

CREATE TABLE events (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX events_received_at ON events (received_at);

CREATE TABLE rollups (
    device_id TEXT NOT NULL,
    bucket_start DOUBLE PRECISION NOT NULL,
    windows BIGINT NOT NULL,
    frames_processed BIGINT NOT NULL,
    fps_sum DOUBLE PRECISION NOT NULL,
    p95_max DOUBLE PRECISION NOT NULL,
    power_sum DOUBLE PRECISION NOT NULL,
    power_n BIGINT NOT NULL,
    energy_j DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, bucket_start)
);
CREATE INDEX rollups_bucket_start ON rollups (bucket_start);

CREATE TABLE commands (
    command_id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    name TEXT NOT NULL,
    body_json TEXT NOT NULL,
    sent_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX commands_sent_at ON commands (sent_at);

CREATE TABLE replies (
    command_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (command_id, device_id)
);

CREATE TABLE rejects (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL,
    device_id TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE TABLE reject_counts (
    reason TEXT PRIMARY KEY,
    n BIGINT NOT NULL
);
"""

# v2: windows the device reported dropped (outbox_overflow) are accounted apart from lost
# ones. A range of lost_ranges is either lost or dropped; devices.dropped is the total size of
# the dropped ranges, as devices.lost is of the lost ones. Existing ranges stay lost.
_V2_SQLITE = """
ALTER TABLE devices ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0;
ALTER TABLE lost_ranges ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0;
"""
_V2_POSTGRES = """
ALTER TABLE devices ADD COLUMN dropped BIGINT NOT NULL DEFAULT 0;
ALTER TABLE lost_ranges ADD COLUMN dropped BOOLEAN NOT NULL DEFAULT FALSE;
"""

# v3: statuses are ordered by boot and by when the coordinator received them, not by the
# client-supplied ts (kept in status_ts, informational). NULL for a status stored before: the
# next status of the same boot applies, as it came later.
_V3_SQLITE = """
ALTER TABLE devices ADD COLUMN status_received_at REAL;
"""
_V3_POSTGRES = """
ALTER TABLE devices ADD COLUMN status_received_at DOUBLE PRECISION;
"""

# v4: rollouts. bundles: the archives the coordinator published as retained chunks. rollouts:
# one row per rollout, its spec as JSON; the partial unique index lets a group have at most one
# rollout running or paused, enforced by the database across coordinators. rollout_devices:
# each device's wave and install progress.
_V4_COMMON = """
CREATE TABLE bundles (
    sha256 TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('full', 'delta')),
    manifest_sha256 TEXT NOT NULL,
    base_manifest_sha256 TEXT,
    model_id TEXT NOT NULL,
    version {int} NOT NULL,
    size {int} NOT NULL,
    chunk_size {int} NOT NULL,
    path TEXT NOT NULL,
    added_at {real} NOT NULL,
    published_at {real},
    cleared_at {real},
    published_bytes {int} NOT NULL DEFAULT 0
);
CREATE INDEX bundles_manifest ON bundles (manifest_sha256);

CREATE TABLE rollouts (
    rollout_id TEXT PRIMARY KEY,
    device_group TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    model_id TEXT NOT NULL,
    version {int} NOT NULL,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('running', 'paused', 'halted', 'completed', 'aborted')),
    phase TEXT NOT NULL,
    phase_started_at {real} NOT NULL,
    reason TEXT,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL
);
CREATE INDEX rollouts_created_at ON rollouts (created_at);
CREATE UNIQUE INDEX rollouts_one_active ON rollouts (device_group)
    WHERE state IN ('running', 'paused');

CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave {int} NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'downloading', 'verifying',
        'health_checking', 'active', 'failed', 'rolled_back', 'refused', 'timed_out')),
    have {int} NOT NULL DEFAULT 0,
    total {int},
    reason TEXT,
    previous_manifest_sha256 TEXT,
    sent_at {real},
    deadline_at {real},
    updated_at {real} NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_device ON rollout_devices (device_id);
"""
_V4_SQLITE = _V4_COMMON.format(int="INTEGER", real="REAL")
_V4_POSTGRES = _V4_COMMON.format(int="BIGINT", real="DOUBLE PRECISION")

# v5: federated rounds. fed_rounds: one row per round, its spec and the task it published as
# JSON, the base it started from, the devices expected, its figures and outcome; the partial
# unique index lets a group have at most one round running, across coordinators. fed_updates:
# every update that named a known round, keyed by (round, device, base manifest) so a QoS 1
# redelivery or a second training of the same device is a duplicate, never a second vote;
# payload keeps the update as received (its deltas), so a restarted coordinator aggregates
# from the store alone.
_V5_COMMON = """
CREATE TABLE fed_rounds (
    round_id TEXT PRIMARY KEY,
    device_group TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'aggregated', 'done', 'failed', 'aborted')),
    phase TEXT NOT NULL,
    phase_started_at {real} NOT NULL,
    spec_json TEXT NOT NULL,
    task_json TEXT NOT NULL,
    model_id TEXT NOT NULL,
    base_manifest_sha256 TEXT NOT NULL,
    base_bundle_sha256 TEXT NOT NULL,
    base_version {int} NOT NULL,
    expected_json TEXT NOT NULL,
    received {int} NOT NULL DEFAULT 0,
    rejected {int} NOT NULL DEFAULT 0,
    deadline_at {real} NOT NULL,
    figures_json TEXT,
    result_version {int},
    result_path TEXT,
    result_bundle_sha256 TEXT,
    result_manifest_sha256 TEXT,
    rollout_id TEXT,
    reason TEXT,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    closed_at {real}
);
CREATE INDEX fed_rounds_created_at ON fed_rounds (created_at);
CREATE UNIQUE INDEX fed_rounds_one_running ON fed_rounds (device_group)
    WHERE state = 'running';

CREATE TABLE fed_updates (
    round_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    base_manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('received', 'accepted', 'rejected', 'stale', 'late')),
    reason TEXT,
    samples {int} NOT NULL,
    norm {real},
    received_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    payload TEXT,
    PRIMARY KEY (round_id, device_id, base_manifest_sha256)
);
"""
_V5_SQLITE = _V5_COMMON.format(int="INTEGER", real="REAL")
_V5_POSTGRES = _V5_COMMON.format(int="BIGINT", real="DOUBLE PRECISION")

# v6: the model catalogue and the closed loop. catalogue_models: source models and their data
# (the files live beside the store). build_jobs: the coordinator's optimize runs; the partial
# unique index lets a model have at most one job queued or running, across coordinators.
# variants: the bundles built from a model, keyed by id and by manifest (what devices report).
# group_targets: the operator's target per group. class_latency: how fast a variant runs at one
# operating point on one device class, as measured by the fleet. loop_decisions: the loop's
# decisions in order (devices as a JSON list). Actions are checked in code, not by a CHECK:
# a new action must not need a table rebuild in SQLite.
_V6_COMMON = """
CREATE TABLE catalogue_models (
    name TEXT PRIMARY KEY,
    source_sha256 TEXT NOT NULL,
    source_path TEXT NOT NULL,
    source_bytes {int} NOT NULL,
    data_sha256 TEXT NOT NULL,
    data_path TEXT NOT NULL,
    data_bytes {int} NOT NULL,
    options_json TEXT NOT NULL,
    added_at {real} NOT NULL
);

CREATE TABLE build_jobs (
    job_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    origin TEXT NOT NULL,
    options_json TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    step {int} NOT NULL,
    steps {int} NOT NULL,
    progress TEXT NOT NULL,
    log_path TEXT NOT NULL,
    variant_id TEXT,
    reason TEXT,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    updated_at {real} NOT NULL
);
CREATE INDEX build_jobs_created_at ON build_jobs (created_at);
CREATE UNIQUE INDEX build_jobs_one_open ON build_jobs (model)
    WHERE state IN ('queued', 'running');

CREATE TABLE variants (
    variant_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version {int} NOT NULL,
    model_id TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL UNIQUE,
    job_id TEXT,
    options_json TEXT NOT NULL,
    size_bytes {int} NOT NULL,
    macs {int} NOT NULL,
    points_json TEXT NOT NULL,
    default_point {int} NOT NULL,
    estimate_json TEXT NOT NULL,
    created_at {real} NOT NULL,
    retired_at {real}
);
CREATE INDEX variants_model ON variants (model, created_at);

CREATE TABLE group_targets (
    device_group TEXT PRIMARY KEY,
    p95_ms {real} NOT NULL,
    min_accuracy {real},
    max_power_w {real},
    loop {bool} NOT NULL,
    pinned_variant TEXT,
    updated_at {real} NOT NULL
);

CREATE TABLE class_latency (
    manifest_sha256 TEXT NOT NULL,
    device_class TEXT NOT NULL,
    operating_point {int} NOT NULL,
    windows {int} NOT NULL,
    devices {int} NOT NULL,
    p95_ms {real} NOT NULL,
    p50_ms {real} NOT NULL,
    power_w {real},
    predicted_p95_ms {real},
    updated_at {real} NOT NULL,
    PRIMARY KEY (manifest_sha256, device_class, operating_point)
);

CREATE TABLE loop_decisions (
    decision_id {serial},
    device_group TEXT NOT NULL,
    ts {real} NOT NULL,
    action TEXT NOT NULL,
    devices_json TEXT NOT NULL,
    message TEXT NOT NULL,
    details_json TEXT NOT NULL,
    rollout_id TEXT,
    job_id TEXT
);
CREATE INDEX loop_decisions_group ON loop_decisions (device_group, decision_id);
"""
_V6_SQLITE = _V6_COMMON.format(
    int="INTEGER", real="REAL", bool="INTEGER", serial="INTEGER PRIMARY KEY AUTOINCREMENT"
)
_V6_POSTGRES = _V6_COMMON.format(
    int="BIGINT",
    real="DOUBLE PRECISION",
    bool="BOOLEAN",
    serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
)

MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema", _V1_SQLITE, _V1_POSTGRES),
    Migration(2, "reported drops apart from losses", _V2_SQLITE, _V2_POSTGRES),
    Migration(3, "statuses ordered by receive time", _V3_SQLITE, _V3_POSTGRES),
    Migration(4, "bundles and rollouts", _V4_SQLITE, _V4_POSTGRES),
    Migration(5, "federated rounds and their updates", _V5_SQLITE, _V5_POSTGRES),
    Migration(6, "model catalogue, targets and the closed loop", _V6_SQLITE, _V6_POSTGRES),
]

# Created outside the versions: it is how a database says which versions it has.
VERSION_TABLE_SQLITE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at REAL NOT NULL
)
"""
VERSION_TABLE_POSTGRES = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)
"""


def latest_version() -> int:
    """The version this code brings a database to."""
    return MIGRATIONS[-1].version


def pending(current: int) -> list[Migration]:
    """Migrations after version current, in order.

    A database newer than this code is refused rather than used: old code writing a newer
    schema could silently drop what the new columns mean.
    """
    if current > latest_version():
        raise RuntimeError(
            f"the store's schema is at version {current}, newer than this coordinator's "
            f"{latest_version()}: upgrade the coordinator"
        )
    return [m for m in MIGRATIONS if m.version > current]


def check_migrations(migrations: list[Migration]) -> None:
    """Versions must count 1, 2, 3...: a gap or a reorder would skip or repeat a step."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n in order, got {versions}")


def split_statements(sql: str) -> list[str]:
    """The statements of a SQLite script, for running them inside one open transaction.

    executescript() would commit the open transaction first, which would break applying a
    version and recording it atomically. sqlite3.complete_statement knows string literals
    and trigger bodies, so a ';' inside them does not split.
    """
    statements: list[str] = []
    current = ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement at the end of a migration: {current!r}")
    return statements


check_migrations(MIGRATIONS)
