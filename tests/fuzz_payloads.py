"""Malformed and extreme payloads for every device -> coordinator topic (issue 12).

Shared by the property-based store tests (Hypothesis strategies) and the fuzz run against a
real mosquitto (a fixed corpus made from the same mutations with a seeded random).
"""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import strategies as st

from edgefleet.agent.protocol import Payload, encode
from edgefleet.agent.protocol.topics import DeviceKind
from tests import protocol_samples as samples

# Every kind a device publishes; the coordinator subscribes to all but results.
DEVICE_KINDS: tuple[DeviceKind, ...] = ("status", "telemetry", "results", "events", "reply")

# Stand-ins for numbers json.dumps cannot write; put into the text by to_bytes().
_BIG_EXP = "\x01BIG_EXP\x01"  # 1e999: parses to infinity
_NEG_BIG_EXP = "\x01NEG_BIG_EXP\x01"
_TOKENS = {
    json.dumps(_BIG_EXP): "1e999",
    json.dumps(_NEG_BIG_EXP): "-1e999",
}

EXTREMES: list[object] = [
    2**63,
    2**63 - 1,
    2**64 + 1,
    2**53,
    -(2**63) - 1,
    -1,
    10**30,
    1e308,
    -1e308,
    5e-324,
    float("inf"),  # json.dumps writes Infinity, which is not JSON
    float("-inf"),
    float("nan"),
    _BIG_EXP,
    _NEG_BIG_EXP,
    253_402_300_800.0,  # year 10000
    0,
    "",
    "x" * 5000,
    "\u0000\u0001\u001f",
    "\ud800",  # a lone surrogate: no UTF-8 text can hold it
    "\U0001f600" * 300,
    "42",
    True,
    None,
    [],
    {},
    [[[[[]]]]],
    {"v": 1},
]


def valid(kind: str, device_id: str, seq: int) -> dict[str, Any]:
    """A valid message of kind from device_id, as a JSON object (seq where the kind has one)."""
    msg: Payload
    if kind == "status":
        msg = samples.status(device_id)
    elif kind == "telemetry":
        msg = samples.telemetry(device_id, seq)
    elif kind == "results":
        msg = samples.result().model_copy(update={"device_id": device_id})
    elif kind == "events":
        msg = samples.event().model_copy(update={"device_id": device_id, "seq": seq})
    else:
        msg = samples.reply().model_copy(update={"device_id": device_id, "id": f"c-{seq}"})
    obj: dict[str, Any] = json.loads(encode(msg))
    return obj


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into obj (dict keys and list indices), obj itself first."""
    found = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += paths(value, (*prefix, i))
    return found


def replaced(obj: Any, path: tuple[Any, ...], value: object) -> Any:
    """A deep copy of obj with the value at path replaced (or removed when value is DELETE)."""
    if not path:
        return value
    copy = json.loads(json.dumps(obj))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


DELETE = object()


def to_bytes(obj: Any) -> bytes:
    """JSON text of obj, with the stand-ins written as the numbers they stand for."""
    text = json.dumps(obj)
    for token, number in _TOKENS.items():
        text = text.replace(token, number)
    return text.encode("utf-8", "surrogatepass")


def mutate(obj: dict[str, Any], rng: random.Random) -> bytes:
    """One mutation of a valid message: an extreme value somewhere, a key gone or added."""
    choice = rng.random()
    path = rng.choice(paths(obj)[1:])
    if choice < 0.8:
        return to_bytes(replaced(obj, path, rng.choice(EXTREMES)))
    if choice < 0.9:
        return to_bytes(replaced(obj, path, DELETE))
    return to_bytes({**obj, "extra": rng.choice(EXTREMES)})


@st.composite
def fuzzed(draw: st.DrawFn, kind: str, device_id: str, seq: int) -> bytes:
    """A message of kind with extreme values at one to three places (often still valid)."""
    obj: Any = valid(kind, device_id, seq)
    for _ in range(draw(st.integers(1, 3))):
        options = paths(obj)[1:] if isinstance(obj, (dict, list)) else []
        if not options:
            break
        path = draw(st.sampled_from(options))
        value = draw(
            st.one_of(
                st.sampled_from(EXTREMES),
                st.integers(min_value=-(2**70), max_value=2**70),
                st.floats(allow_nan=False, allow_infinity=False),
                st.text(max_size=50),
                st.booleans(),
            )
        )
        obj = replaced(obj, path, value)
    return to_bytes(obj)


def corpus(rng: random.Random, device_id: str, per_kind: int) -> list[tuple[DeviceKind, bytes]]:
    """(kind, payload) pairs: per_kind mutations of each kind, plus raw garbage."""
    out: list[tuple[DeviceKind, bytes]] = []
    for kind in DEVICE_KINDS:
        # Every number of the message at the values that broke the stores, one at a time.
        base = valid(kind, device_id, 0)
        for path in paths(base)[1:]:
            if _is_number(_at(base, path)):
                for extreme in (2**63, 1e308, -1, _BIG_EXP):
                    out.append((kind, to_bytes(replaced(base, path, extreme))))
        for i in range(per_kind):
            out.append((kind, mutate(valid(kind, device_id, i), rng)))
        out += [
            (kind, b""),
            (kind, b"\xff\xfe\x00"),
            (kind, b"[" * 5000),
            (kind, b"{" + b" " * (2 << 20) + b"}"),
            (kind, b'{"v":1,"device_id":"' + device_id.encode() + b'","seq":1e999}'),
        ]
    return out


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
