"""Retention: raw windows rolled up into buckets, old rows deleted."""

from __future__ import annotations

import pytest

from edgefleet.server.fleet.store import (
    IngestBatch,
    RetentionPolicy,
    Store,
    rollup,
)
from tests.store.backends import Backend
from tests.store.payloads import (
    DAY,
    T0,
    event,
    telemetry,
)


def test_retention_rolls_up_old_windows_and_deletes_them(store: Store, backend: Backend) -> None:
    # Two devices, one window every 10 minutes for 9 days; pi-2's every third has no power.
    step = 600.0
    n = int(9 * DAY / step)
    windows = [
        telemetry(
            device,
            i,
            T0 + i * step,
            power_w=None if device == "pi-2" and i % 3 == 0 else 4.0 + i % 5,
            length_s=9.0 + i % 2,
        )
        for device in ("pi-1", "pi-2")
        for i in range(n)
    ]
    for start in range(0, len(windows), 500):
        store.ingest(IngestBatch(telemetry=windows[start : start + 500]))
    store.ingest(IngestBatch(events=[event("pi-1", i, T0 + i * DAY) for i in range(9)]))
    assert store.telemetry_count() == 2 * n

    # The cutoff falls half way through an hour, so that hour is rolled up in two passes.
    now = T0 + 9 * DAY + 1800.0
    policy = RetentionPolicy(raw_days=7, rollup_days=366, bucket_s=3600, events_days=5)
    out = store.apply_retention(now, policy)
    cutoff = now - 7 * DAY
    old = [w for w in windows if w.received_at < cutoff]
    assert out.windows_rolled_up == out.windows_deleted == len(old) == 2 * (2 * 144 + 3)
    assert out.events_deleted == 5 and out.rollups_deleted == 0
    assert store.telemetry_count() == 2 * n - len(old)
    kept = store.telemetry("pi-1", limit=n)
    assert min(r.received_at for r in kept) >= cutoff
    assert len(store.events("pi-1")) == 4

    later = now + 1800.0
    out2 = store.apply_retention(later, policy)
    assert out2.windows_rolled_up == out2.windows_deleted == 2 * 3
    old = [w for w in windows if w.received_at < later - 7 * DAY]
    expected = rollup.rollup_windows(old, 3600)
    for device in ("pi-1", "pi-2"):
        got = store.rollups(device)
        want = sorted((k[1], v) for k, v in expected.items() if k[0] == device)
        assert [r.bucket_start for r in got] == [b for b, _ in want]
        assert len(got) == 2 * 24 + 1
        for rec, (bucket, sums) in zip(got, want, strict=True):
            ref = sums.record(device, bucket)
            assert (rec.windows, rec.frames_processed) == (ref.windows, ref.frames_processed)
            assert rec.fps_mean == pytest.approx(ref.fps_mean)
            assert rec.p95_ms_max == ref.p95_ms_max
            assert rec.power_w_mean == pytest.approx(ref.power_w_mean)
            assert rec.energy_j == pytest.approx(ref.energy_j)
        assert sum(r.windows for r in got) == len(
            [w for w in old if w.telemetry.device_id == device]
        )
        assert store.rollups(device, since=T0 + DAY)[0].bucket_start == T0 + DAY
    # Sequence accounting is about what was received, not what is still kept raw.
    assert {r.received for r in store.sequence_reports()} == {n}
    pi2 = store.rollups("pi-2")[0]
    assert pi2.windows == 6 and pi2.power_w_mean == pytest.approx((5 + 6 + 8 + 4) / 4)

    # Past rollup_days the buckets go, and raw windows that old are not rolled up at all.
    out3 = store.apply_retention(later, RetentionPolicy(raw_days=1, rollup_days=6.5, bucket_s=3600))
    keep = later - 6.5 * DAY
    gone = [w for w in windows if later - 7 * DAY <= w.received_at < later - DAY]
    rolled = [w for w in gone if rollup.bucket_start(w.received_at, 3600) >= keep]
    assert out3.windows_deleted == len(gone) == 2 * 864
    assert out3.windows_rolled_up == len(rolled) == 2 * 792
    assert out3.rollups_deleted == 2 * 49
    assert min(r.bucket_start for r in store.rollups("pi-1")) == keep
    assert backend.count("telemetry") == store.telemetry_count() == 2 * 138


def test_rollup_of_windows_without_power() -> None:
    sums = rollup.RollupSums()
    for s in range(3):
        sums.add(telemetry("pi-1", s, T0 + s, power_w=None).telemetry)
    rec = sums.record("pi-1", 0.0)
    assert rec.windows == 3 and rec.power_w_mean is None and rec.energy_j is None
    assert rec.fps_mean == pytest.approx((20.0 + 20.1 + 20.2) / 3)
    assert rollup.bucket_start(T0 + 3599.9, 3600) == T0
    assert rollup.bucket_start(T0 + 3600, 3600) == T0 + 3600
