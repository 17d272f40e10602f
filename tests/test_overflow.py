"""Outbox overflow reports: the first drop at once, later ones gathered, none left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.outbox import Outbox
from edgefleet.agent.overflow import OverflowReporter

TOPIC = "edgefleet/v1/dev/pi-1/telemetry"


def test_first_drop_at_once_then_at_most_one_report_per_period() -> None:
    rep = OverflowReporter(every_s=60.0)
    assert rep.check({}, 0.0) is None and rep.check({"telemetry": 0}, 1.0) is None
    first = rep.check({"telemetry": 1}, 2.0)
    assert first is not None and first.details["dropped"] == 1 and first.details["total"] == 1
    # Drops keep coming: gathered for a minute, then one report with their count.
    for t, n in ((3.0, 2), (30.0, 5), (61.9, 9)):
        assert rep.check({"telemetry": n}, t) is None
    second = rep.check({"telemetry": 9, "events": 1}, 62.0)
    assert second is not None
    assert second.details == {"dropped": 9, "total": 10, "total_events": 1, "total_telemetry": 9}
    assert "dropped 9 message(s), 10 in all (events 1, telemetry 9)" in second.message
    # Drops stop: the last ones are reported once the period is over, then nothing.
    assert rep.check({"telemetry": 12, "events": 1}, 100.0) is None
    last = rep.check({"telemetry": 12, "events": 1}, 122.0)
    assert last is not None and last.details["dropped"] == 3
    assert rep.check({"telemetry": 12, "events": 1}, 500.0) is None


def test_drops_reported_before_a_restart_are_not_reported_again() -> None:
    rep = OverflowReporter(reported_total=7)
    assert rep.check({"telemetry": 7}, 0.0) is None
    report = rep.check({"telemetry": 8}, 1.0)
    assert report is not None and report.details["dropped"] == 1


def test_every_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_s"):
        OverflowReporter(every_s=0)


def test_counters_persist_and_only_grow(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    with Outbox(db, max_messages=10) as box:
        assert box.counter("overflow_reported") == 0
        box.raise_counter("overflow_reported", 5)
        box.raise_counter("overflow_reported", 3)  # a lower value never takes a counter back
        for i in range(12):
            box.put(TOPIC, f"t{i}".encode())
    with Outbox(db, max_messages=10) as box:
        assert box.counter("overflow_reported") == 5
        assert box.overflow().by_kind == {"telemetry": 2}  # the counters are not overflow
