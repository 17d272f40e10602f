"""Write a batch; when the store refuses it for good, bisect to the messages at fault.

One message the store can never hold must not hold back the others (issue 12). A refused
batch is split in halves, each written on its own, down to single messages; a single message
the store still refuses becomes an 'unstorable' reject with the store's reason, and every
other message is stored. The halves are written in order, so what got committed is always a
prefix of the batch: statuses still apply in arrival order, and (device, seq) keys still make
a redelivered message a counted duplicate.

A transient error (StoreUnavailable, or anything unclassified) is raised as IsolationStopped
carrying the prefix already committed, so the caller acknowledges that much and retries only
the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgefleet.server.fleet.store.base import (
    EventIn,
    FedUpdateIn,
    IngestBatch,
    IngestOutcome,
    Reject,
    ReplyIn,
    StatusIn,
    Store,
    TelemetryIn,
)
from edgefleet.server.fleet.store.errors import StoreRefused

log = logging.getLogger(__name__)

# One received message as the store takes it: decoded, or already a reject.
Item = StatusIn | TelemetryIn | EventIn | ReplyIn | FedUpdateIn | Reject

_KIND = {StatusIn: "status", TelemetryIn: "telemetry", EventIn: "events", ReplyIn: "reply"}


def batch_of(items: Sequence[Item]) -> IngestBatch:
    """The IngestBatch holding items, in their order within each kind."""
    batch = IngestBatch()
    for item in items:
        if isinstance(item, StatusIn):
            batch.statuses.append(item)
        elif isinstance(item, TelemetryIn):
            batch.telemetry.append(item)
        elif isinstance(item, EventIn):
            batch.events.append(item)
        elif isinstance(item, ReplyIn):
            batch.replies.append(item)
        elif isinstance(item, FedUpdateIn):
            batch.fed_updates.append(item)
        else:
            batch.rejects.append(item)
    return batch


@dataclass
class Isolated:
    """What got committed: the outcomes, the items stored, and the items refused."""

    outcomes: list[IngestOutcome] = field(default_factory=list)
    stored: list[Item] = field(default_factory=list)
    refused: list[Reject] = field(default_factory=list)

    @property
    def committed(self) -> int:
        """How many items, from the start of the batch, are done (stored or refused)."""
        return len(self.stored) + len(self.refused)

    def outcome(self) -> IngestOutcome:
        """The outcomes of every committed part, added up."""
        o = self.outcomes
        return IngestOutcome(
            telemetry_inserted=sum(x.telemetry_inserted for x in o),
            telemetry_duplicates=sum(x.telemetry_duplicates for x in o),
            events_inserted=sum(x.events_inserted for x in o),
            events_duplicates=sum(x.events_duplicates for x in o),
            devices_registered=tuple(d for x in o for d in x.devices_registered),
            unregistered=sum(x.unregistered for x in o),
            id_conflicts=tuple(sorted({d for x in o for d in x.id_conflicts})),
            clock_skewed=sum(x.clock_skewed for x in o),
            fed_received=sum(x.fed_received for x in o),
            fed_ignored=tuple(i for x in o for i in x.fed_ignored),
        )


class IsolationStopped(Exception):
    """A transient store error in the middle of a batch; done holds what was committed."""

    def __init__(self, cause: BaseException, done: Isolated) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause
        self.done = done


def ingest_isolating(store: Store, items: Sequence[Item], *, registration_open: bool) -> Isolated:
    """Write items in one transaction, or bisect around what the store refuses for good."""
    done = Isolated()
    try:
        _write(store, list(items), registration_open, done)
    except Exception as exc:
        raise IsolationStopped(exc, done) from exc
    return done


def _write(store: Store, items: list[Item], registration_open: bool, done: Isolated) -> None:
    if not items:
        return
    try:
        done.outcomes.append(store.ingest(batch_of(items), registration_open=registration_open))
    except StoreRefused as exc:
        if len(items) > 1:
            mid = len(items) // 2
            _write(store, items[:mid], registration_open, done)
            _write(store, items[mid:], registration_open, done)
            return
        done.refused.append(_refuse(store, items[0], exc))
        return
    done.stored.extend(items)


def _refuse(store: Store, item: Item, exc: StoreRefused) -> Reject:
    """Record item as an 'unstorable' reject; its own record failing is logged, not raised."""
    reject = unstorable(item, str(exc))
    log.error(
        "store refused %s from %s for good, rejected: %s", reject.topic, reject.device_id, exc
    )
    try:
        store.ingest(IngestBatch(rejects=[reject]))
    except StoreRefused as again:
        # Only the log line and the ingestor's counter know of it; nothing else is blocked.
        log.error("store refused the reject of %s too: %s", reject.topic, again)
    return reject


def unstorable(item: Item, why: str) -> Reject:
    """The 'unstorable' reject of an item, with text any store can hold."""
    if isinstance(item, Reject):
        topic, device, what = item.topic, item.device_id, f"reject ({item.reason})"
    elif isinstance(item, FedUpdateIn):
        device, what = item.update.device_id, "fed_update"
        topic = f"fed/{item.update.round_id}/update/{device}"
    else:
        device = _device_of(item)
        kind = _KIND[type(item)]
        topic, what = f"dev/{device}/{kind}", kind
    return Reject(
        received_at=item.received_at,
        topic=_clean(topic),
        device_id=None if device is None else _clean(device),
        reason="unstorable",
        detail=_clean(f"{what} refused by the store: {why}")[:1000],
    )


def _device_of(item: StatusIn | TelemetryIn | EventIn | ReplyIn) -> str:
    if isinstance(item, StatusIn):
        return item.status.device_id
    if isinstance(item, TelemetryIn):
        return item.telemetry.device_id
    if isinstance(item, EventIn):
        return item.event.device_id
    return item.reply.device_id


def _clean(text: str) -> str:
    """text without NUL or lone surrogates, which a store's text column may refuse."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
