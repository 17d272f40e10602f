"""Errors of the protocol package: raised ones and the value decode returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal["too_large", "not_utf8", "not_json", "invalid", "unknown_version", "unknown_topic"]
TopicErrorReason = Literal["invalid_id", "unknown_topic"]


class ProtocolException(Exception):
    """Base of every exception this package raises."""


class TopicError(ProtocolException, ValueError):
    """A topic or an id inside a topic is not part of the tree."""

    def __init__(self, message: str, *, reason: TopicErrorReason = "unknown_topic") -> None:
        super().__init__(message)
        self.reason: TopicErrorReason = reason


class PayloadTooLargeError(ProtocolException, ValueError):
    """An encoded payload exceeds the size limit of its kind."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class ProtocolError:
    """Why a received payload was rejected; returned by decode, never raised."""

    reason: Reason
    message: str
    kind: str | None = None
    topic: str | None = None

    def __str__(self) -> str:
        return self.message
