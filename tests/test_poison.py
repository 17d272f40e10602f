"""`fleet show` on extreme stored values (issue 12): it crashed with OverflowError on 1e308."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from edgefleet.agent.protocol import Event, Status, Telemetry
from edgefleet.server.cli.fleet import _show_text
from edgefleet.server.fleet.api import create_app
from edgefleet.server.fleet.store import IngestBatch, open_store
from edgefleet.server.fleet.store.base import EventIn, StatusIn, TelemetryIn
from edgefleet.server.fleet.views import DeviceDetail, DeviceView, EventView, WindowView
from tests import protocol_samples as samples

TOKEN = "t0ken-for-tests"


def test_fleet_show_prints_times_no_calendar_holds() -> None:
    # Built behind validation: what an older coordinator stored, or another client sends.
    window = Telemetry.model_construct(**{**dict(samples.telemetry()), "window_end": 1e308})
    event = Event.model_construct(**{**dict(samples.event()), "ts": 1e308})
    view = DeviceView(
        device_id="pi-7",
        group=None,
        online=True,
        model_id=None,
        model_version=None,
        operating_point=None,
        agent_version=None,
        fps=None,
        p95_ms=None,
        power_w=None,
        power_source=None,
        energy_per_frame_mj=None,
        temperature_c=None,
        first_seen=1e308,
        last_seen=1e308,
        id_conflicts=0,
    )
    detail = DeviceDetail(
        device=view,
        sequence=None,
        windows=[WindowView(seq=42, received_at=time.time(), telemetry=window)],
        events=[EventView(device_id="pi-7", seq=17, received_at=time.time(), event=event)],
    )
    text = _show_text(detail)
    assert "t=1e+308" in text and "#17" in text, text


def test_rows_stored_before_the_bounds_do_not_break_fleet_show(tmp_path: Path) -> None:
    """An old coordinator stored 1e308 timestamps; reading the device must still work."""
    store = open_store(str(tmp_path / "fleet.db"))
    now = time.time()
    good = samples.telemetry("pi-7", 1).model_copy(
        update={"window_start": now - 10, "window_end": now}
    )
    far = {"window_start": 0.0, "window_end": 1e308}
    old = Telemetry.model_construct(**{**dict(good), "seq": 2, **far})
    old_status = Status.model_construct(**{**dict(samples.status("pi-7")), "ts": 1e308})
    old_event = Event.model_construct(**{**dict(samples.event()), "ts": 1e308})
    try:
        store.ingest(
            IngestBatch(
                statuses=[StatusIn(now, old_status)],
                telemetry=[TelemetryIn(now, good), TelemetryIn(now, old)],
                events=[EventIn(now, old_event)],
            )
        )
        client = TestClient(create_app(store, token=TOKEN))
        answer = client.get("/devices/pi-7?windows=10&events=10")
        assert answer.status_code == 200, answer.text
        detail = DeviceDetail.model_validate(answer.json())
        # The rows today's protocol refuses are left out; everything else is shown.
        assert [w.seq for w in detail.windows] == [1]
        assert detail.events == [] and detail.sequence is not None
        assert detail.sequence.received == 2
        assert "pi-7" in _show_text(detail)
    finally:
        store.close()
