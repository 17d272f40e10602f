"""Property-based: whatever a device sends, decode refuses it or the store holds it (issue 12).

Hypothesis generates payloads for every device -> coordinator topic, valid ones and ones with
extreme values, and each runs against both store backends through the writer the ingestor
uses. Examples are few and derandomized, so the suite stays fast and CI stable.
"""

from __future__ import annotations

import itertools
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.protocol import Event, Telemetry, TopicTree, encode
from edgefleet.agent.protocol.topics import DeviceKind
from edgefleet.server.fleet.store import Store
from edgefleet.server.fleet.store.base import EventIn, TelemetryIn
from edgefleet.server.fleet.store.isolate import Item, ingest_isolating
from edgefleet.server.fleet.writer import Decoder, RawMessage, write_batch
from tests import protocol_samples as samples
from tests.fuzz_payloads import DEVICE_KINDS, fuzzed
from tests.store.payloads import telemetry

ROOT = "edgefleet/v1"
TREE = TopicTree(ROOT)
# Hypothesis reruns a test body with the same function-scoped store: unique ids keep the
# examples apart.
_ids = itertools.count()

PROPERTY = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _good_window(device_id: str, seq: int) -> RawMessage:
    now = time.time()
    msg = samples.telemetry(device_id, seq).model_copy(
        update={"window_start": now - 10, "window_end": now}
    )
    return (TREE.device(device_id, "telemetry"), encode(msg), now)


@PROPERTY
@given(data=st.data(), kind=st.sampled_from(DEVICE_KINDS))
def test_decode_refuses_it_or_the_store_holds_it(
    store: Store, data: st.DataObject, kind: DeviceKind
) -> None:
    n = next(_ids)
    fuzz_dev, good_dev = f"fz-{n}", f"ok-{n}"
    payload = data.draw(fuzzed(kind, fuzz_dev, n))
    fuzz = (TREE.device(fuzz_dev, kind), payload, time.time())
    raws = [_good_window(good_dev, 0), fuzz, _good_window(good_dev, 1)]

    written = write_batch(Decoder(ROOT), store, raws, registration_open=True)

    # Nothing raised, every message is accounted for, and nothing valid was refused by the
    # store: the protocol's bounds are inside what both stores hold.
    assert written.size == 3
    assert "unstorable" not in written.rejects, written.rejects
    assert {t.seq for t in store.telemetry(good_dev)} == {0, 1}
    if not written.rejects and kind == "telemetry":
        assert len(store.telemetry(fuzz_dev)) == 1


def _poison(device_id: str, data: st.DataObject) -> Item:
    """A message that skipped validation with a value no store can hold."""
    good = telemetry(device_id, 0, time.time())
    which = data.draw(st.sampled_from(["seq", "outbox_overflow", "frames_processed", "event_seq"]))
    # Only a maximum reaches a column for outbox_overflow, so a hugely negative one is harmless.
    small = st.integers(-(2**80), -(2**63) - 1) if which != "outbox_overflow" else st.nothing()
    big = data.draw(st.one_of(st.integers(2**63, 2**80), small))
    if which == "event_seq":
        fields = {**dict(samples.event()), "device_id": device_id, "seq": big}
        return EventIn(good.received_at, Event.model_construct(**fields))
    fields = {**dict(good.telemetry), which: big}
    return TelemetryIn(good.received_at, Telemetry.model_construct(**fields))


@PROPERTY
@given(data=st.data(), size=st.integers(1, 30), poisons=st.integers(1, 3))
def test_a_poisoned_message_leaves_every_other_one_stored(
    store: Store, data: st.DataObject, size: int, poisons: int
) -> None:
    n = next(_ids)
    now = time.time()
    items: list[Item] = [telemetry(f"ok-{n}-{i % 4}", i, now) for i in range(size)]
    for p in range(poisons):
        at = data.draw(st.integers(0, len(items)))
        items.insert(at, _poison(f"bad-{n}-{p}", data))

    done = ingest_isolating(store, items, registration_open=True)

    assert done.committed == len(items)
    assert len(done.refused) == poisons and {r.reason for r in done.refused} == {"unstorable"}
    stored = sum(len(store.telemetry(f"ok-{n}-{d}", 100)) for d in range(4))
    assert stored == size
