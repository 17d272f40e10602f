"""An update's arrays on the wire: names exit{k}.weight / exit{k}.bias, EncodedTensor messages.

The numerics work per head ({"weight", "bias"} of exit k); the protocol carries one flat list
of named tensors (agent/protocol/fed.py). These functions are the only place the two meet.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt

from edgefleet.agent.protocol.fed import EncodedTensor

from .compress import EncodedArray

_NAME = re.compile(r"^exit([0-9]{1,2})\.(weight|bias)$")


def tensor_name(head: int, part: str) -> str:
    """exit{head}.{part}."""
    return f"exit{head}.{part}"


def flatten_heads(deltas: Mapping[int, Mapping[str, npt.ArrayLike]]) -> dict[str, Any]:
    """{head: {"weight": w, "bias": b}} -> {"exit{head}.weight": w, "exit{head}.bias": b}."""
    return {tensor_name(k, part): v for k, parts in deltas.items() for part, v in parts.items()}


def split_heads(update: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The inverse of flatten_heads; a name outside the scheme is a ValueError naming it."""
    out: dict[int, dict[str, Any]] = {}
    for name, value in update.items():
        found = _NAME.match(name)
        if found is None:
            raise ValueError(f"tensor {name!r} is not exit<k>.weight or exit<k>.bias")
        out.setdefault(int(found.group(1)), {})[found.group(2)] = value
    return out


def to_tensors(encoded: Mapping[str, EncodedArray]) -> list[EncodedTensor]:
    """Encoded arrays -> the protocol's tensors (sorted by name, so a message is stable)."""
    return [
        EncodedTensor(
            name=name,
            shape=list(enc.shape),
            scheme=enc.scheme,
            scale=enc.scale,
            offset=enc.offset,
            data=base64.b64encode(enc.data).decode("ascii"),
        )
        for name, enc in sorted(encoded.items())
    ]


def from_tensors(tensors: Sequence[EncodedTensor]) -> dict[str, EncodedArray]:
    """The protocol's tensors -> encoded arrays (compress.decode_update turns them to floats)."""
    return {
        t.name: EncodedArray(t.scheme, tuple(t.shape), t.raw, t.scale, t.offset) for t in tensors
    }
