"""`fleet show` lists a detector's object events in a readable table."""

from __future__ import annotations

from edgefleet.server.cli.fleet import _show_text
from edgefleet.server.fleet.views import DeviceDetail, DeviceView, EventView, object_events
from tests import protocol_samples as samples


def _detail() -> DeviceDetail:
    end = samples.object_event()
    start = end.model_copy(update={"seq": 30, "kind": "object_start"})
    other = samples.event()
    events = [
        EventView(device_id="cam-3", seq=e.seq, received_at=e.ts, event=e)
        for e in (start, other, end)
    ]
    device = DeviceView(
        device_id="cam-3",
        group=None,
        online=True,
        model_id="cells-det",
        model_version=1,
        operating_point=0,
        agent_version="0.1.0",
        fps=10.0,
        p95_ms=5.0,
        power_w=None,
        power_source=None,
        energy_per_frame_mj=None,
        temperature_c=None,
        first_seen=0.0,
        last_seen=0.0,
        id_conflicts=0,
    )
    return DeviceDetail(device=device, sequence=None, windows=[], events=events)


def test_object_events_become_rows() -> None:
    rows = object_events(_detail().events)
    assert [r.kind for r in rows] == ["object_start", "object_end"]
    end = rows[1]
    assert (end.label, end.track_id, end.frames, end.zone) == ("7", 12, 48, "door")
    assert end.box == (180.0, 30.0, 236.0, 88.0) and end.duration_s == 3.2


def test_show_text_has_an_objects_section() -> None:
    text = _show_text(_detail())
    section = text.split("objects:\n", 1)[1].splitlines()
    assert section[0].split()[:4] == ["SEQ", "EVENT", "CLASS", "TRACK"]
    end = section[2].split()
    assert end[:4] == ["31", "end", "7", "12"]
    assert "3.2s" in end and "48" in end and "180,30,236,88" in end and "door" in end


def test_no_objects_section_without_object_events() -> None:
    d = _detail()
    plain = d.model_copy(update={"events": [d.events[1]]})
    assert "objects:" not in _show_text(plain)
