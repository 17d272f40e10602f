"""Reading back: events, commands with their replies, groups."""

from __future__ import annotations

import time

from edgefleet.server.fleet.store import (
    IngestBatch,
    Store,
)
from tests.store.payloads import (
    BOOT_A,
    BOOT_B,
    BOOT_C,
    T0,
    command,
    event,
    reply,
    status,
    telemetry,
)


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
