"""Identifier rules shared by topics and payloads."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

from edgefleet.agent.protocol.errors import TopicError

# One MQTT topic level: no '/', and no '+', '#' or '$' that would turn a publish into a
# wildcard or a system topic. 64 characters keeps topics short on constrained links.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

# fullmatch, because Python's '$' also matches before a trailing newline.
_ID_RE = re.compile(ID_PATTERN[1:-1])
_SHA256_RE = re.compile(SHA256_PATTERN[1:-1])

DeviceId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
GroupName = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]


def is_valid_id(value: str) -> bool:
    """Tell whether value may be a device id, group name or round id."""
    return _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str = "device id") -> str:
    """Return value unchanged, or raise TopicError naming the bad id."""
    if not isinstance(value, str) or not is_valid_id(value):
        raise TopicError(
            f"invalid {what} {value!r}: must match {ID_PATTERN} "
            "(letters, digits, '_', '.', '-'; no '/', '+', '#'; 1-64 characters)",
            reason="invalid_id",
        )
    return value


def check_sha256(value: str) -> str:
    """Return value unchanged, or raise TopicError naming the bad digest."""
    if not isinstance(value, str) or _SHA256_RE.fullmatch(value) is None:
        raise TopicError(
            f"invalid sha256 {value!r}: must be 64 lowercase hex digits", reason="invalid_id"
        )
    return value
