"""The coordinator's store: one suite run against SQLite and a real PostgreSQL."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edgefleet.agent.protocol import (
    Event,
    Hardware,
    Percentiles,
    Reply,
    Status,
    Telemetry,
    offline_will,
)
from edgefleet.server.fleet.store import (
    CommandRecord,
    EventIn,
    IngestBatch,
    PostgresStore,
    Reject,
    ReplyIn,
    RetentionPolicy,
    SqliteStore,
    StatusIn,
    Store,
    TelemetryIn,
    logic,
    open_store,
)
from edgefleet.server.fleet.store.schema import MIGRATIONS, latest_version, split_statements

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400.0
BOOT_A = "3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b"
BOOT_B = "5d2e3f4a-1b2c-4d3e-8f4a-5b6c7d8e9f00"
BOOT_C = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"


# -- payloads -------------------------------------------------------------------------------


def telemetry(
    device_id: str,
    seq: int,
    received_at: float,
    *,
    power_w: float | None = 6.4,
    overflow: int = 0,
    skew_s: float = 0.0,
    length_s: float = 10.0,
) -> TelemetryIn:
    """A valid window that ended one second before it was received (plus skew_s)."""
    end = received_at - 1.0 + skew_s
    frames = 200 + seq % 50
    return TelemetryIn(
        received_at=received_at,
        telemetry=Telemetry(
            device_id=device_id,
            seq=seq,
            window_start=end - length_s,
            window_end=end,
            frames_captured=frames + 3,
            frames_processed=frames,
            frames_dropped=3,
            fps=frames / length_s,
            latency_ms=Percentiles(p50=4.0, p95=8.0 + seq % 7, p99=20.0),
            stage_latency_ms=[Percentiles(p50=2.0, p95=2.4, p99=2.9)],
            exit_histogram=[frames - 40, 40],
            operating_point=1,
            cpu_percent=150.0,
            rss_mb=140.0,
            temperature_c=55.0,
            throttled=False,
            power_w=power_w,
            power_source="pmic" if power_w is not None else "none",
            energy_per_frame_mj=None,
            outbox_depth=0,
            outbox_overflow=overflow,
            model_id="digits-ee",
            model_version=3,
        ),
    )


def status(
    device_id: str,
    boot_id: str,
    ts: float,
    received_at: float,
    *,
    online: bool = True,
    group: str | None = "lab-a",
    operating_point: int = 1,
) -> StatusIn:
    """A birth (or with online=False, a Will) of one agent process."""
    birth = Status(
        device_id=device_id,
        online=True,
        ts=ts,
        agent_version="0.1.0",
        model_id="digits-ee",
        model_version=3,
        operating_point=operating_point,
        group=group,
        hardware=Hardware(machine="aarch64", system="Linux", cpu_count=4, ram_mb=8064.0),
        boot_id=boot_id,
    )
    return StatusIn(received_at=received_at, status=birth if online else offline_will(birth))


def event(device_id: str, seq: int, received_at: float) -> EventIn:
    return EventIn(
        received_at=received_at,
        event=Event(
            device_id=device_id,
            ts=received_at - 0.5,
            seq=seq,
            kind="operating_point_changed",
            message=f"operating point {seq % 3}",
            details={"to": seq % 3},
        ),
    )


def reply(command_id: str, device_id: str, received_at: float) -> ReplyIn:
    return ReplyIn(
        received_at=received_at,
        reply=Reply(id=command_id, device_id=device_id, ts=received_at - 0.1, ok=True),
    )


def command(command_id: str, sent_at: float, target: str = "group/lab-a") -> CommandRecord:
    return CommandRecord(
        command_id=command_id,
        target=target,
        name="ping",
        body_json=f'{{"id":"{command_id}","ts":{sent_at},"command":{{"name":"ping"}}}}',
        sent_at=sent_at,
        replies=(),
    )


def reject(received_at: float, reason: Any = "invalid_payload") -> Reject:
    return Reject(
        received_at=received_at,
        topic="edgefleet/v1/dev/pi-1/telemetry",
        device_id="pi-1",
        reason=reason,
        detail="field 'seq': Input should be greater than or equal to 0",
    )


# -- backends -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    url: str

    def raw(self) -> Store:
        """The store class itself, without migrate()."""
        if self.name == "sqlite":
            return SqliteStore(self.url[len("sqlite://") :])
        return PostgresStore(self.url)

    def count(self, table: str) -> int:
        """Rows of a table, read behind the store's back."""
        if self.name == "sqlite":
            with sqlite3.connect(self.url[len("sqlite://") :]) as conn:
                return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        with psycopg.connect(self.url) as pg:
            row = pg.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert row is not None
            return int(row[0])


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


# -- schema ---------------------------------------------------------------------------------


def test_migrate_twice_is_a_no_op_and_reports_the_version(backend: Backend) -> None:
    fresh = backend.raw()
    try:
        assert fresh.schema_version() == 0
        assert fresh.migrate() == latest_version() == 1
        fresh.ingest(IngestBatch(telemetry=[telemetry("pi-1", 0, T0)]))
        assert fresh.migrate() == 1
        assert fresh.schema_version() == 1
        # A second migrate kept the data and recorded no second row.
        assert fresh.telemetry_count() == 1
        assert backend.count("schema_version") == 1
    finally:
        fresh.close()
    reopened = open_store(backend.url)
    try:
        assert reopened.schema_version() == 1
        assert [d.device_id for d in reopened.devices()] == ["pi-1"]
    finally:
        reopened.close()


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
            assert s.schema_version() == 1
        finally:
            s.close()
        assert path.is_file(), url
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mysql://db/fleet")


# -- ingest ---------------------------------------------------------------------------------


def test_ingest_registers_devices_and_stores_telemetry(store: Store) -> None:
    batch = IngestBatch(
        telemetry=[telemetry("pi-2", s, T0 + 10 * s) for s in (0, 1, 2)]
        + [telemetry("pi-1", s, T0 + 10 * s, overflow=s) for s in (5, 7, 6)]
    )
    out = store.ingest(batch)
    assert out.devices_registered == ("pi-1", "pi-2")
    assert (out.telemetry_inserted, out.telemetry_duplicates, out.clock_skewed) == (6, 0, 0)
    assert store.telemetry_count() == 6

    pi1 = store.device("pi-1")
    assert pi1 is not None
    assert (pi1.first_seen, pi1.last_seen) == (T0 + 50, T0 + 70)
    assert pi1.status is None and not pi1.online and pi1.group is None
    # The newest window is the highest seq, not the last one to arrive.
    assert pi1.last_telemetry == batch.telemetry[4].telemetry
    assert [r.seq for r in store.telemetry("pi-1")] == [7, 6, 5]
    assert store.telemetry("pi-1", limit=1)[0].received_at == T0 + 70
    assert store.telemetry("pi-1")[0].telemetry == batch.telemetry[4].telemetry

    (rep,) = store.sequence_reports("pi-1")
    assert (rep.first_seq, rep.max_seq, rep.received, rep.missing) == (5, 7, 3, 0)
    assert rep.reported_overflow == 7
    assert [r.device_id for r in store.sequence_reports()] == ["pi-1", "pi-2"]
    assert store.device("nope") is None

    # A known device is not registered again.
    assert (
        store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 8, T0 + 80)])).devices_registered
        == ()
    )


def test_duplicates_are_counted_never_stored_twice(store: Store) -> None:
    first = [telemetry("pi-1", s, T0 + s) for s in range(10)]
    out = store.ingest(IngestBatch(telemetry=first, events=[event("pi-1", 3, T0)]))
    assert (out.telemetry_inserted, out.telemetry_duplicates) == (10, 0)
    assert (out.events_inserted, out.events_duplicates) == (1, 0)
    # A redelivery of half of them, a new window twice in the same batch, an event again.
    again = [telemetry("pi-1", s, T0 + 100 + s) for s in range(5)]
    twice = [telemetry("pi-1", 10, T0 + 200), telemetry("pi-1", 10, T0 + 201)]
    out = store.ingest(IngestBatch(telemetry=again + twice, events=[event("pi-1", 3, T0 + 5)] * 2))
    assert (out.telemetry_inserted, out.telemetry_duplicates) == (1, 6)
    assert (out.events_inserted, out.events_duplicates) == (0, 2)
    assert store.telemetry_count() == 11
    # The first copy stays: a redelivery does not rewrite when a window was received.
    assert {r.seq: r.received_at for r in store.telemetry("pi-1")}[2] == T0 + 2
    (rep,) = store.sequence_reports()
    assert (rep.received, rep.duplicates, rep.missing) == (11, 6, 0)
    assert len(store.events("pi-1")) == 1
    device = store.device("pi-1")
    assert device is not None and device.last_seen == T0 + 201


def test_closed_registration_rejects_unknown_devices(store: Store, backend: Backend) -> None:
    store.register("pi-1", group="lab-b")
    store.register("pi-1")  # again, without a group: keeps the group
    batch = IngestBatch(
        statuses=[status("pi-1", BOOT_A, T0, T0, group=None), status("pi-9", BOOT_B, T0, T0)],
        telemetry=[telemetry("pi-1", 0, T0 + 1), telemetry("pi-9", 0, T0 + 1)],
        events=[event("pi-9", 0, T0 + 2)],
        replies=[reply("c-1", "pi-9", T0 + 3)],
        rejects=[reject(T0, "oversized")],
    )
    out = store.ingest(batch, registration_open=False)
    assert out.unregistered == 4
    assert out.devices_registered == ()
    assert (out.telemetry_inserted, out.events_inserted) == (1, 0)
    assert [d.device_id for d in store.devices()] == ["pi-1"]
    pi1 = store.device("pi-1")
    assert pi1 is not None and pi1.group == "lab-b" and pi1.online
    counts = store.reject_counts()
    assert counts["unregistered"] == 4 and counts["oversized"] == 1
    assert counts["invalid_topic"] == 0
    assert backend.count("rejects") == 5

    # Open again: the same messages register the device.
    out = store.ingest(batch, registration_open=True)
    assert out.devices_registered == ("pi-9",) and out.unregistered == 0
    assert store.reject_counts()["unregistered"] == 4


def test_rejects_log_keeps_the_newest_rows_and_counts_all(store: Store, backend: Backend) -> None:
    n = logic.MAX_REJECT_ROWS + 25
    store.ingest(IngestBatch(rejects=[reject(T0 + i) for i in range(n)]))
    store.ingest(IngestBatch(rejects=[reject(T0 + n, "invalid_topic")]))
    assert backend.count("rejects") == logic.MAX_REJECT_ROWS
    counts = store.reject_counts()
    assert counts["invalid_payload"] == n and counts["invalid_topic"] == 1
    assert set(counts) == {
        "invalid_topic",
        "invalid_payload",
        "oversized",
        "device_mismatch",
        "unregistered",
    }


# -- statuses -------------------------------------------------------------------------------


def test_status_birth_then_will_then_late_will_of_an_earlier_session(store: Store) -> None:
    birth = status("pi-1", BOOT_A, T0, T0)
    will = status("pi-1", BOOT_A, T0, T0 + 60, online=False)
    store.ingest(IngestBatch(statuses=[birth]))
    d = store.device("pi-1")
    assert d is not None and d.online and d.group == "lab-a" and d.status == birth.status
    # Equal ts, same boot: arrival order decides, so the Will that came later wins.
    store.ingest(IngestBatch(statuses=[will]))
    d = store.device("pi-1")
    assert d is not None and not d.online and d.status == will.status
    # Same order inside one batch: birth, will, then a reconnect of the same process.
    reconnect = status("pi-1", BOOT_A, T0 + 100, T0 + 101, operating_point=2)
    old_will = status("pi-1", BOOT_A, T0, T0 + 102, online=False)
    store.ingest(IngestBatch(statuses=[reconnect, old_will]))
    d = store.device("pi-1")
    assert d is not None and d.online
    assert d.status is not None and d.status.operating_point == 2
    assert d.last_seen == T0 + 102
    # The old session's Will in a later batch is ignored too.
    store.ingest(IngestBatch(statuses=[old_will]))
    d = store.device("pi-1")
    assert d is not None and d.online and d.id_conflicts == 0


def test_status_group_only_when_the_status_carries_one(store: Store) -> None:
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0, T0, group=None)]))
    d = store.device("pi-1")
    assert d is not None and d.group is None
    store.set_group("pi-1", "ops")
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0 + 1, T0 + 1, group=None)]))
    d = store.device("pi-1")
    assert d is not None and d.group == "ops"
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0 + 2, T0 + 2, group="lab-c")]))
    d = store.device("pi-1")
    assert d is not None and d.group == "lab-c"
    store.set_group("pi-1", None)
    d = store.device("pi-1")
    assert d is not None and d.group is None
    with pytest.raises(KeyError):
        store.set_group("nope", "ops")


def test_id_conflict_is_a_birth_of_a_replaced_boot(store: Store) -> None:
    # A restart (A then B) is no conflict; A coming back while B was current is.
    out = store.ingest(
        IngestBatch(
            statuses=[
                status("pi-1", BOOT_A, T0, T0),
                status("pi-1", BOOT_A, T0, T0 + 5, online=False),
                status("pi-1", BOOT_B, T0 + 10, T0 + 10),
            ]
        )
    )
    assert out.id_conflicts == ()
    out = store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0 + 20, T0 + 20)]))
    assert out.id_conflicts == ("pi-1",)
    d = store.device("pi-1")
    assert d is not None and d.id_conflicts == 1
    # Still applied: it is what the device id says now.
    assert d.online and d.status is not None and d.status.boot_id == BOOT_A
    # Flapping: B again, in the same batch as a third, new agent C (no conflict for C).
    out = store.ingest(
        IngestBatch(
            statuses=[status("pi-1", BOOT_B, T0 + 30, T0 + 30), status("pi-1", BOOT_C, T0, T0 + 31)]
        )
    )
    assert out.id_conflicts == ("pi-1",)
    d = store.device("pi-1")
    assert d is not None and d.id_conflicts == 2
    assert d.status is not None and d.status.boot_id == BOOT_C


def test_late_will_of_a_replaced_boot_is_ignored(store: Store) -> None:
    store.ingest(
        IngestBatch(
            statuses=[
                status("pi-1", BOOT_A, T0, T0),
                status("pi-1", BOOT_B, T0 + 10, T0 + 10),
                # A's Will, delivered after B's birth (through another coordinator).
                status("pi-1", BOOT_A, T0, T0 + 11, online=False),
            ]
        )
    )
    d = store.device("pi-1")
    assert d is not None and d.online
    assert d.status is not None and d.status.boot_id == BOOT_B


# -- sequences and losses -------------------------------------------------------------------


def test_clock_skew_is_counted_and_still_stored(store: Store) -> None:
    out = store.ingest(
        IngestBatch(
            telemetry=[
                telemetry("pi-1", 0, T0),
                telemetry("pi-1", 1, T0, skew_s=Store.CLOCK_TOLERANCE_S + 5),
                telemetry("pi-1", 2, T0, skew_s=-(Store.CLOCK_TOLERANCE_S + 5)),
                telemetry("pi-1", 3, T0, skew_s=Store.CLOCK_TOLERANCE_S - 5),
            ]
        )
    )
    assert (out.clock_skewed, out.telemetry_inserted) == (2, 4)


def test_declare_losses_after_grace_and_un_lose_on_late_arrival(store: Store) -> None:
    # pi-1: 0..19 without 3, 4, 7; 21 came late (just above the gap 20) so 20 is still young.
    seqs = [s for s in range(20) if s not in (3, 4, 7)]
    batch = [telemetry("pi-1", s, T0 + s) for s in seqs]
    batch.append(telemetry("pi-1", 21, T0 + 900))
    batch += [telemetry("pi-2", s, T0 + s) for s in range(5)]  # no gaps
    store.ingest(IngestBatch(telemetry=batch))
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.first_seq, rep.max_seq, rep.received, rep.missing, rep.lost) == (0, 21, 18, 4, 0)

    assert store.declare_losses(now=T0 + 200, grace_s=300) == 0
    assert store.declare_losses(now=T0 + 1000, grace_s=300) == 3  # 3, 4 and 7; not 20
    assert store.declare_losses(now=T0 + 1000, grace_s=300) == 0
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.missing, rep.lost) == (4, 3)
    assert store.declare_losses(now=T0 + 1300, grace_s=300) == 1  # 20 grew old
    # 4 arrives after all: no longer lost, counted as received; 3 and 7 stay lost.
    out = store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 4, T0 + 1400)]))
    assert out.telemetry_inserted == 1
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.received, rep.missing, rep.lost) == (19, 3, 3)
    # The split range {3} and {7}, {20} are still recorded: nothing is declared twice.
    assert store.declare_losses(now=T0 + 5000, grace_s=300) == 0
    store.ingest(IngestBatch(telemetry=[telemetry("pi-1", s, T0 + 5001) for s in (3, 7, 20)]))
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.received, rep.missing, rep.lost) == (22, 0, 0)
    (rep2,) = store.sequence_reports("pi-2")
    assert (rep2.missing, rep2.lost) == (0, 0)


# -- events, replies, commands --------------------------------------------------------------


def test_events_newest_first(store: Store) -> None:
    store.ingest(
        IngestBatch(
            events=[event("pi-1", 0, T0), event("pi-1", 1, T0 + 10), event("pi-2", 0, T0 + 5)]
        )
    )
    # Replayed from the outbox: an old event of pi-1 that arrives last.
    store.ingest(IngestBatch(events=[event("pi-1", 5, T0 + 20), event("pi-1", 2, T0 + 30)]))
    assert [(e.device_id, e.seq) for e in store.events()] == [
        ("pi-1", 2),
        ("pi-1", 5),
        ("pi-1", 1),
        ("pi-2", 0),
        ("pi-1", 0),
    ]
    assert [e.seq for e in store.events("pi-1")] == [5, 2, 1, 0]
    assert [e.seq for e in store.events("pi-1", limit=2)] == [5, 2]
    first = store.events("pi-2")[0]
    assert first.received_at == T0 + 5 and first.event.details == {"to": 0}


def test_commands_with_replies_newest_first(store: Store) -> None:
    store.log_command(command("c-1", T0))
    store.log_command(command("c-2", T0 + 60, target="dev/pi-1"))
    store.log_command(command("c-1", T0 + 999))  # a retried log keeps the first
    store.ingest(
        IngestBatch(
            replies=[
                reply("c-1", "pi-2", T0 + 1),
                reply("c-1", "pi-1", T0 + 2),
                reply("c-1", "pi-1", T0 + 3),  # redelivered
                reply("c-9", "pi-1", T0 + 4),  # a command this coordinator did not log
            ]
        )
    )
    cmds = store.commands()
    assert [c.command_id for c in cmds] == ["c-2", "c-1"]
    c2, c1 = cmds
    assert c2.replies == () and c2.target == "dev/pi-1"
    assert c1.sent_at == T0 and c1.name == "ping" and c1.body_json == command("c-1", T0).body_json
    assert [(r.device_id, r.ts) for r in c1.replies] == [
        ("pi-1", (T0 + 2) - 0.1),
        ("pi-2", (T0 + 1) - 0.1),
    ]
    assert [c.command_id for c in store.commands(limit=1)] == ["c-2"]
    # The reply that came first is shown once its command is logged.
    store.log_command(command("c-9", T0 + 120))
    c9 = store.commands(limit=1)[0]
    assert c9.command_id == "c-9" and [r.device_id for r in c9.replies] == ["pi-1"]
    assert [d.device_id for d in store.devices()] == ["pi-1", "pi-2"]


def test_groups_and_devices_by_group(store: Store) -> None:
    store.ingest(
        IngestBatch(
            statuses=[
                status("pi-1", BOOT_A, T0, T0, group="lab-a"),
                status("pi-2", BOOT_B, T0, T0, group="lab-b"),
                status("pi-3", BOOT_C, T0, T0, group="lab-a"),
            ],
            telemetry=[telemetry("pi-4", 0, T0)],
        )
    )
    store.register("pi-5", group="lab-b")
    assert store.groups() == {"lab-a": 2, "lab-b": 2}
    assert [d.device_id for d in store.devices("lab-a")] == ["pi-1", "pi-3"]
    assert [d.device_id for d in store.devices()] == ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5"]
    assert store.devices("nope") == []
    pi5 = store.device("pi-5")
    # Never heard from: seen times are the registration time, and nothing else is known.
    assert pi5 is not None and pi5.status is None and pi5.last_telemetry is None
    assert pi5.first_seen == pi5.last_seen and abs(pi5.last_seen - time.time()) < 60
    assert store.sequence_reports("pi-5") == []


# -- retention ------------------------------------------------------------------------------


def test_retention_rolls_up_old_windows_and_deletes_them(store: Store, backend: Backend) -> None:
    # Two devices, one window every 10 minutes for 9 days; pi-2's every third has no power.
    step = 600.0
    n = int(9 * DAY / step)
    windows = [
        telemetry(
            device,
            i,
            T0 + i * step,
            power_w=None if device == "pi-2" and i % 3 == 0 else 4.0 + i % 5,
            length_s=9.0 + i % 2,
        )
        for device in ("pi-1", "pi-2")
        for i in range(n)
    ]
    for start in range(0, len(windows), 500):
        store.ingest(IngestBatch(telemetry=windows[start : start + 500]))
    store.ingest(IngestBatch(events=[event("pi-1", i, T0 + i * DAY) for i in range(9)]))
    assert store.telemetry_count() == 2 * n

    # The cutoff falls half way through an hour, so that hour is rolled up in two passes.
    now = T0 + 9 * DAY + 1800.0
    policy = RetentionPolicy(raw_days=7, rollup_days=366, bucket_s=3600, events_days=5)
    out = store.apply_retention(now, policy)
    cutoff = now - 7 * DAY
    old = [w for w in windows if w.received_at < cutoff]
    assert out.windows_rolled_up == out.windows_deleted == len(old) == 2 * (2 * 144 + 3)
    assert out.events_deleted == 5 and out.rollups_deleted == 0
    assert store.telemetry_count() == 2 * n - len(old)
    kept = store.telemetry("pi-1", limit=n)
    assert min(r.received_at for r in kept) >= cutoff
    assert len(store.events("pi-1")) == 4

    later = now + 1800.0
    out2 = store.apply_retention(later, policy)
    assert out2.windows_rolled_up == out2.windows_deleted == 2 * 3
    old = [w for w in windows if w.received_at < later - 7 * DAY]
    expected = logic.rollup_windows(old, 3600)
    for device in ("pi-1", "pi-2"):
        got = store.rollups(device)
        want = sorted((k[1], v) for k, v in expected.items() if k[0] == device)
        assert [r.bucket_start for r in got] == [b for b, _ in want]
        assert len(got) == 2 * 24 + 1
        for rec, (bucket, sums) in zip(got, want, strict=True):
            ref = sums.record(device, bucket)
            assert (rec.windows, rec.frames_processed) == (ref.windows, ref.frames_processed)
            assert rec.fps_mean == pytest.approx(ref.fps_mean)
            assert rec.p95_ms_max == ref.p95_ms_max
            assert rec.power_w_mean == pytest.approx(ref.power_w_mean)
            assert rec.energy_j == pytest.approx(ref.energy_j)
        assert sum(r.windows for r in got) == len(
            [w for w in old if w.telemetry.device_id == device]
        )
        assert store.rollups(device, since=T0 + DAY)[0].bucket_start == T0 + DAY
    # Sequence accounting is about what was received, not what is still kept raw.
    assert {r.received for r in store.sequence_reports()} == {n}
    pi2 = store.rollups("pi-2")[0]
    assert pi2.windows == 6 and pi2.power_w_mean == pytest.approx((5 + 6 + 8 + 4) / 4)

    # Past rollup_days the buckets go, and raw windows that old are not rolled up at all.
    out3 = store.apply_retention(later, RetentionPolicy(raw_days=1, rollup_days=6.5, bucket_s=3600))
    keep = later - 6.5 * DAY
    gone = [w for w in windows if later - 7 * DAY <= w.received_at < later - DAY]
    rolled = [w for w in gone if logic.bucket_start(w.received_at, 3600) >= keep]
    assert out3.windows_deleted == len(gone) == 2 * 864
    assert out3.windows_rolled_up == len(rolled) == 2 * 792
    assert out3.rollups_deleted == 2 * 49
    assert min(r.bucket_start for r in store.rollups("pi-1")) == keep
    assert backend.count("telemetry") == store.telemetry_count() == 2 * 138


def test_rollup_of_windows_without_power() -> None:
    sums = logic.RollupSums()
    for s in range(3):
        sums.add(telemetry("pi-1", s, T0 + s, power_w=None).telemetry)
    rec = sums.record("pi-1", 0.0)
    assert rec.windows == 3 and rec.power_w_mean is None and rec.energy_j is None
    assert rec.fps_mean == pytest.approx((20.0 + 20.1 + 20.2) / 3)
    assert logic.bucket_start(T0 + 3599.9, 3600) == T0
    assert logic.bucket_start(T0 + 3600, 3600) == T0 + 3600


# -- logic ----------------------------------------------------------------------------------


def test_status_rules() -> None:
    a = logic.StatusState(BOOT_A, T0)
    birth_a = status("pi-1", BOOT_A, T0, T0).status
    will_a_old = status("pi-1", BOOT_A, T0 - 1, T0, online=False).status
    birth_b_old = status("pi-1", BOOT_B, T0 - 100, T0).status
    will_b_old = status("pi-1", BOOT_B, T0 - 100, T0, online=False).status
    assert logic.status_applies(logic.StatusState(None, None), will_a_old)
    assert logic.status_applies(a, birth_a)  # equal ts
    assert not logic.status_applies(a, will_a_old)
    assert logic.status_applies(a, birth_b_old)  # another boot's birth: a restart
    assert not logic.status_applies(a, will_b_old)
    assert not logic.is_id_conflict(a, {BOOT_A}, birth_b_old)
    assert logic.is_id_conflict(a, {BOOT_A, BOOT_B}, birth_b_old)
    assert not logic.is_id_conflict(a, {BOOT_A, BOOT_B}, will_b_old)

    fold = logic.fold_statuses(
        logic.StatusState(None, None),
        set(),
        [
            status("pi-1", BOOT_A, T0, T0, group="g1"),
            status("pi-1", BOOT_B, T0 + 5, T0 + 2, group=None),
            status("pi-1", BOOT_A, T0 + 9, T0 + 3, group=None),
        ],
    )
    assert fold.conflicts == 1 and fold.group == "g1"
    assert fold.applied is not None and fold.applied.boot_id == BOOT_A
    assert fold.boots == {BOOT_A: (T0, T0 + 3), BOOT_B: (T0 + 2, T0 + 2)}


def test_seq_ranges() -> None:
    assert logic.uncovered((3, 10), []) == [(3, 10)]
    assert logic.uncovered((3, 10), [(3, 4), (7, 7)]) == [(5, 6), (8, 10)]
    assert logic.uncovered((3, 10), [(1, 20)]) == []
    assert logic.uncovered((3, 10), [(9, 12), (0, 3)]) == [(4, 8)]
    assert logic.remove_seqs([(3, 10)], [3, 5, 10, 11]) == ([(4, 4), (6, 9)], 3)
    assert logic.remove_seqs([(5, 5), (8, 9)], [5]) == ([(8, 9)], 1)
    tally = logic.tally_telemetry(
        [telemetry("pi-1", s, T0) for s in (4, 2, 4, 9)], {("pi-1", 4), ("pi-1", 2)}, 300
    )["pi-1"]
    assert (tally.inserted_seqs, tally.duplicates, tally.min_seq, tally.max_seq) == (
        [4, 2],
        2,
        2,
        4,
    )
    assert tally.newest is not None and tally.newest.seq == 4
    assert logic.lost_candidates(tally, lost=1, max_seq_before=3) == [2]
    assert logic.lost_candidates(tally, lost=0, max_seq_before=3) == []
    assert logic.missing(5, 14, 7) == 3


# -- performance and concurrency ------------------------------------------------------------


def test_ingest_of_a_500_message_batch_takes_well_under_a_millisecond_each(store: Store) -> None:
    per_message = []
    for b in range(6):
        batch = IngestBatch(
            telemetry=[
                telemetry(f"dev-{d:03d}", b * 9 + s, T0 + b * 100 + s)
                for d in range(50)
                for s in range(9)
            ],
            statuses=[status(f"dev-{d:03d}", BOOT_A, T0 + b, T0 + b) for d in range(25)],
            events=[event(f"dev-{d:03d}", b, T0 + b) for d in range(25)],
        )
        assert len(batch) == 500
        started = time.perf_counter()
        store.ingest(batch)
        per_message.append((time.perf_counter() - started) / len(batch))
    assert store.telemetry_count() == 6 * 450
    # Serialising the pydantic models alone costs ~10 us per message.
    assert statistics.median(per_message) < 0.001, per_message


def _ingest_worker(url: str, order: list[int], barrier: Any, results: Any) -> None:
    """One coordinator process: its own store object, batches of 4 devices x 25 seqs."""
    barrier.wait(30)
    store = open_store(url)  # both migrate the empty database at the same time
    try:
        inserted = duplicates = events = 0
        for first in order:
            seqs = range(first, first + 25)
            batch = IngestBatch(
                statuses=[status(f"pi-{d}", BOOT_A, T0, T0 + first) for d in range(4)],
                telemetry=[telemetry(f"pi-{d}", s, T0 + s) for d in range(4) for s in seqs],
                events=[event(f"pi-{d}", s, T0 + s) for d in (3, 2, 1, 0) for s in seqs],
            )
            out = store.ingest(batch)
            inserted += out.telemetry_inserted
            duplicates += out.telemetry_duplicates
            events += out.events_inserted
        results.put((inserted, duplicates, events))
    finally:
        store.close()


def test_two_processes_ingest_overlapping_batches_exactly_once(backend: Backend) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    # Both start on the shared range 100..199 at the same time, then go separate ways.
    orders = [[100, 125, 150, 175, 0, 25, 50, 75], [100, 125, 150, 175, 275, 250, 225, 200]]
    procs = [
        ctx.Process(target=_ingest_worker, args=(backend.url, order, barrier, results))
        for order in orders
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outs = [results.get(timeout=5) for _ in procs]
    assert sum(o[0] for o in outs) == 4 * 300
    assert sum(o[1] for o in outs) == 4 * 100
    assert sum(o[2] for o in outs) == 4 * 300

    store = open_store(backend.url)
    try:
        assert store.telemetry_count() == 4 * 300
        assert backend.count("events") == 4 * 300
        reports = store.sequence_reports()
        assert [r.device_id for r in reports] == ["pi-0", "pi-1", "pi-2", "pi-3"]
        for r in reports:
            assert (r.first_seq, r.max_seq, r.received, r.duplicates, r.missing) == (
                0,
                299,
                300,
                100,
                0,
            )
        d = store.device("pi-0")
        assert d is not None and d.online and d.id_conflicts == 0
        assert d.last_telemetry is not None and d.last_telemetry.seq == 299
    finally:
        store.close()
