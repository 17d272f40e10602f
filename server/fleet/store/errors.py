"""What a store failure means for the data: wait and retry, or refuse these messages.

Each backend classifies its driver's exceptions once, where it runs a transaction (issue 12:
an integer SQLite could not bind was taken for an outage, and the batch holding it was
retried forever while every other device's telemetry waited behind it).
- StoreUnavailable: the store cannot work right now (connection lost, database locked or
  busy, disk full, serialization failure, a schema that needs an operator). Retrying the same
  data later can succeed, so nothing is dropped.
- StoreRefused: the store will never take this data (a value out of range, a constraint, a
  string the database cannot hold, a value the driver cannot bind). Retrying cannot help; the
  writer splits the batch to find the messages at fault and rejects only those.
Anything a backend does not recognise passes through unchanged and is treated as unavailable
by the writer: a retry loses nothing, a wrong refusal would.
"""

from __future__ import annotations


class StoreError(Exception):
    """A store operation failed; the transaction was rolled back."""


class StoreUnavailable(StoreError):
    """Transient: the same write may succeed later."""


class StoreRefused(StoreError):
    """Permanent: this data can never be written; retrying it would only block the rest."""


# Raised by drivers while converting a Python value of this batch into a column value, e.g.
# "Python int too large to convert to SQLite INTEGER" (OverflowError) or a lone surrogate in
# a string (UnicodeEncodeError, a ValueError).
DATA_CONVERSION_ERRORS: tuple[type[Exception], ...] = (OverflowError, ValueError, TypeError)


def refused(exc: BaseException) -> StoreRefused:
    """A StoreRefused naming the driver's error."""
    return StoreRefused(f"{type(exc).__name__}: {exc}".strip())


def unavailable(exc: BaseException) -> StoreUnavailable:
    """A StoreUnavailable naming the driver's error."""
    return StoreUnavailable(f"{type(exc).__name__}: {exc}".strip())


class RolloutConflict(StoreError):
    """A group already has a rollout running or paused; at most one may hold it at a time."""

    def __init__(self, group: str, holder: str) -> None:
        super().__init__(
            f"group {group!r} already has rollout {holder} running or paused; "
            "halt, abort or finish it first"
        )
        self.group = group
        self.holder = holder


class FedRoundConflict(StoreError):
    """A group already has a federated round running; one round per group at a time."""

    def __init__(self, group: str, holder: str) -> None:
        super().__init__(
            f"group {group!r} already has federated round {holder} running; "
            "abort it or wait for it to close"
        )
        self.group = group
        self.holder = holder


class JobConflict(StoreError):
    """A catalogue model already has a build job queued or running; one job per model."""

    def __init__(self, model: str, holder: str) -> None:
        super().__init__(
            f"model {model!r} already has build job {holder} queued or running; "
            "cancel it or wait for it to finish"
        )
        self.model = model
        self.holder = holder
