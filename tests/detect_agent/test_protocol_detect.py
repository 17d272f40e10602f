"""The detector fields of the protocol: bounds, consistency, and old payloads unchanged."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edgefleet.agent.protocol import SIZE_LIMITS, ProtocolError, decode, encode
from edgefleet.agent.protocol.messages import MAX_OBJECTS, DetectedObject, Event, Result, Telemetry
from tests import protocol_samples as samples

BOX = {"class_index": 0, "label": "a", "score": 0.5, "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}


def test_classifier_payloads_carry_no_detector_keys() -> None:
    # A coordinator that predates detectors forbids unknown keys: none may appear.
    for msg, keys in (
        (samples.result(), {"objects"}),
        (samples.telemetry(), {"object_counts", "frames_skipped", "objects_started"}),
    ):
        assert not keys & set(json.loads(encode(msg)))


def test_old_payloads_without_the_fields_still_decode() -> None:
    for msg in (samples.result(), samples.telemetry()):
        decoded = decode(type(msg), encode(msg))
        assert decoded == msg
        assert not isinstance(decoded, ProtocolError)


def test_detector_payloads_round_trip() -> None:
    for msg in (samples.detect_result(), samples.detect_telemetry(), samples.object_event()):
        assert decode(msg.KIND, encode(msg)) == msg


@pytest.mark.parametrize(
    "change",
    [
        {"x2": 0.5},  # x2 < x1
        {"y2": 1.0},  # y2 < y1
        {"score": 1.5},
        {"x1": -1.0},
        {"y2": 1e9},
        {"label": ""},
        {"label": "x" * 65},
        {"track_id": -1},
        {"track_id": 2**63},
        {"extra": 1},
    ],
)
def test_detected_object_bounds(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DetectedObject.model_validate({**BOX, **change})


def test_result_confidence_is_the_best_box() -> None:
    r = samples.detect_result()
    fields = r.model_dump()
    with pytest.raises(ValidationError, match="best score"):
        Result.model_validate({**fields, "confidence": 0.5})
    with pytest.raises(ValidationError, match="without objects"):
        Result.model_validate({**fields, "objects": []})
    empty = Result.model_validate({**fields, "objects": [], "confidence": 0.0, "label": ""})
    assert decode(Result, encode(empty)) == empty
    with pytest.raises(ValidationError):
        Result.model_validate({**fields, "objects": [fields["objects"][0]] * (MAX_OBJECTS + 1)})


def test_a_result_at_every_bound_fits_the_results_limit() -> None:
    big = DetectedObject(
        class_index=2**32 - 1,
        label="x" * 64,
        score=0.9999999999999999,
        x1=99999.99999999999,
        y1=99999.99999999999,
        x2=99999.99999999999,
        y2=99999.99999999999,
        track_id=2**53 - 1,
    )
    r = Result(
        device_id="d" * 64,
        ts=253_402_214_399.99998,
        frame_index=2**53 - 1,
        class_index=2**32 - 1,
        label="x" * 128,
        confidence=0.9999999999999999,
        exit_index=15,
        latency_ms=86_399_999.99999999,
        objects=[big] * MAX_OBJECTS,
    )
    assert len(encode(r)) <= SIZE_LIMITS["results"]


def test_telemetry_detector_fields_bounds() -> None:
    t = samples.detect_telemetry().model_dump()
    for change in (
        {"object_counts": {"": 1}},
        {"object_counts": {"a": -1}},
        {"object_counts": {f"c{i}": 1 for i in range(101)}},
        {"frames_skipped": -1},
        {"objects_started": 2**32},
    ):
        with pytest.raises(ValidationError):
            Telemetry.model_validate({**t, **change})


def test_object_events_are_event_kinds() -> None:
    e = samples.object_event().model_dump()
    for kind in ("object_start", "object_update", "object_end"):
        assert Event.model_validate({**e, "kind": kind}).kind == kind
