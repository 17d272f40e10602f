"""Bounds of every number on the wire: what both stores can hold and readers can format.

A number that validates must be storable by SQLite (INTEGER: signed 64-bit, REAL: finite
double) and PostgreSQL (bigint, double precision), and must stay so through the arithmetic
the coordinator does on it (max_seq - first_seq + 1, sums in the hourly rollups) and through
datetime formatting. Issue 12: a telemetry seq of 2**63 validated, then every store write of
its batch failed and ingestion stopped for the whole fleet.
"""

from __future__ import annotations

import math
from typing import Annotated, Final

from pydantic import AfterValidator, Field, JsonValue

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# Sequence numbers, lifetime counters and versions. 2**53 - 1 is the largest integer a
# double (and so JavaScript or any JSON reader using doubles) holds exactly; differences and
# sums of a few such numbers stay far inside int64. At one window a second that is 285
# million years of windows.
MAX_SEQ: Final = 2**53 - 1
# Per-window counts (frames, exit histogram entries): a day-long window at 10,000 fps is
# under 10**9; sums over the windows of an hourly rollup stay inside int64.
MAX_COUNT: Final = 2**32 - 1
# Unix seconds: 9999-12-31T00:00:00Z, so datetime.fromtimestamp and time.localtime work in
# every time zone (year 9999 is datetime's last).
MAX_TS: Final = 253_402_214_400.0
# A latency of a day is already meaningless; any finite bound keeps sums finite.
MAX_MS: Final = 86_400_000.0
MAX_FPS: Final = 1_000_000.0
# Energy of one frame in millijoules: 10 kW for a day per frame.
MAX_MJ: Final = 1e12

Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]
Version = Annotated[int, Field(ge=1, le=MAX_SEQ)]
WindowCount = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Timestamp = Annotated[float, Field(ge=0, le=MAX_TS)]
Millis = Annotated[float, Field(ge=0, le=MAX_MS)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def _check_json_numbers(value: JsonValue) -> JsonValue:
    """Refuse integers outside int64 and non-finite floats anywhere inside a JSON value."""
    stack: list[JsonValue] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"number {item} is not finite")
            continue
        if isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise ValueError(f"integer {item} is outside the signed 64-bit range")
        elif isinstance(item, dict):
            stack.extend(item.values())
        else:
            stack.extend(item)
    return value


# Free-form JSON (a reply's result), with the bounds above on every number inside it.
BoundedJson = Annotated[JsonValue, AfterValidator(_check_json_numbers)]
