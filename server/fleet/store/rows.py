"""Rows as every backend selects them, and the records they make.

The column lists are shared so that both backends select the same columns in the same order;
a row from either is a plain sequence of Python values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from edgefleet.agent.protocol import Reply, Status, Telemetry
from edgefleet.server.fleet.store.base import (
    CommandRecord,
    DeviceRecord,
    RollupRecord,
    SequenceReport,
)
from edgefleet.server.fleet.store.logic import missing
from edgefleet.server.fleet.store.rollup import rollup_record

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)


def stored(model: type[_M], text: object, where: str) -> _M | None:
    """A stored payload validated again, or None when today's protocol refuses it.

    Rows written before the protocol bounded a field (issue 12: a window_end of 1e308) must
    not make every read of the device fail; such a row is left out of what is shown.
    """
    try:
        return model.model_validate_json(str(text))
    except ValidationError as exc:
        log.warning(
            "stored %s of %s no longer validates, left out: %s",
            model.__name__,
            where,
            exc.errors(include_url=False, include_input=False)[:1],
        )
        return None


# Column order of device rows as both backends select them for device_record().
DEVICE_COLUMNS = (
    "device_id, device_group, online, registered_at, first_seen, last_seen, status_json, "
    "last_telemetry_json, id_conflicts"
)


def device_record(row: Sequence[object]) -> DeviceRecord:
    """A DeviceRecord from a row selected with DEVICE_COLUMNS.

    A pre-registered device that never spoke reports its registration time as first and
    last seen: the record has no "never", and that is when the coordinator learnt of it.
    """
    (
        device_id,
        group,
        online,
        registered_at,
        first_seen,
        last_seen,
        status_json,
        telemetry_json,
        conflicts,
    ) = row
    registered = _float(registered_at)
    return DeviceRecord(
        device_id=str(device_id),
        group=None if group is None else str(group),
        online=bool(online),
        first_seen=registered if first_seen is None else _float(first_seen),
        last_seen=registered if last_seen is None else _float(last_seen),
        status=None if status_json is None else stored(Status, status_json, str(device_id)),
        last_telemetry=(
            None if telemetry_json is None else stored(Telemetry, telemetry_json, str(device_id))
        ),
        id_conflicts=_int(conflicts),
    )


SEQUENCE_COLUMNS = (
    "device_id, first_seq, max_seq, received, duplicates, lost, dropped, reported_overflow"
)


def sequence_report(row: Sequence[object]) -> SequenceReport:
    """A SequenceReport from a row selected with SEQUENCE_COLUMNS."""
    device_id, first_seq, max_seq, received, duplicates, lost, dropped, overflow = row
    first, top, got = _int(first_seq), _int(max_seq), _int(received)
    return SequenceReport(
        device_id=str(device_id),
        first_seq=first,
        max_seq=top,
        received=got,
        duplicates=_int(duplicates),
        missing=missing(first, top, got),
        lost=_int(lost),
        dropped=_int(dropped),
        reported_overflow=_int(overflow),
    )


ROLLUP_COLUMNS = (
    "device_id, bucket_start, windows, frames_processed, fps_sum, p95_max, power_sum, "
    "power_n, energy_j"
)


def rollup_from_row(row: Sequence[object]) -> RollupRecord:
    """A RollupRecord from a row selected with ROLLUP_COLUMNS."""
    device_id, start, windows, frames, fps_sum, p95_max, power_sum, power_n, energy = row
    return rollup_record(
        str(device_id),
        _float(start),
        windows=_int(windows),
        frames_processed=_int(frames),
        fps_sum=_float(fps_sum),
        p95_max=_float(p95_max),
        power_sum=_float(power_sum),
        power_n=_int(power_n),
        energy_j=_float(energy),
    )


def command_record(row: Sequence[object], replies: Sequence[Reply]) -> CommandRecord:
    """A CommandRecord from (command_id, target, name, body_json, sent_at) and its replies."""
    command_id, target, name, body_json, sent_at = row
    return CommandRecord(
        command_id=str(command_id),
        target=str(target),
        name=str(name),
        body_json=str(body_json),
        sent_at=_float(sent_at),
        replies=tuple(replies),
    )


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer column, got {value!r}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number column, got {value!r}")
    return float(value)
