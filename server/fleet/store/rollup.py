"""Rollup arithmetic: raw windows summed per device and bucket, and back to means.

The backends aggregate in SQL; rollup_windows is the reference they are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.agent.protocol import Telemetry
from edgefleet.server.fleet.store.base import RollupRecord, TelemetryIn


def bucket_start(received_at: float, bucket_s: float) -> float:
    """The bucket a window falls into, by the coordinator's clock (never the device's)."""
    return math.floor(received_at / bucket_s) * bucket_s


@dataclass
class RollupSums:
    """The additive state of a rollup row: sums and maxima, so buckets merge by adding."""

    windows: int = 0
    frames_processed: int = 0
    fps_sum: float = 0.0
    p95_max: float = 0.0
    power_sum: float = 0.0
    power_n: int = 0
    energy_j: float = 0.0

    def add(self, t: Telemetry) -> None:
        """Fold one raw window in."""
        self.windows += 1
        self.frames_processed += t.frames_processed
        self.fps_sum += t.fps
        self.p95_max = max(self.p95_max, t.latency_ms.p95)
        if t.power_w is not None:
            self.power_sum += t.power_w
            self.power_n += 1
            self.energy_j += t.power_w * (t.window_end - t.window_start)

    def record(self, device_id: str, start: float) -> RollupRecord:
        return rollup_record(
            device_id,
            start,
            windows=self.windows,
            frames_processed=self.frames_processed,
            fps_sum=self.fps_sum,
            p95_max=self.p95_max,
            power_sum=self.power_sum,
            power_n=self.power_n,
            energy_j=self.energy_j,
        )


def rollup_record(
    device_id: str,
    start: float,
    *,
    windows: int,
    frames_processed: int,
    fps_sum: float,
    p95_max: float,
    power_sum: float,
    power_n: int,
    energy_j: float,
) -> RollupRecord:
    """Turn stored sums into means; power and energy are None when no window knew its power."""
    return RollupRecord(
        device_id=device_id,
        bucket_start=start,
        windows=windows,
        frames_processed=frames_processed,
        fps_mean=fps_sum / windows if windows else 0.0,
        p95_ms_max=p95_max,
        power_w_mean=power_sum / power_n if power_n else None,
        energy_j=energy_j if power_n else None,
    )


def rollup_windows(
    items: Iterable[TelemetryIn], bucket_s: float
) -> dict[tuple[str, float], RollupSums]:
    """Reference aggregation of raw windows by (device, bucket); the backends do it in SQL."""
    sums: dict[tuple[str, float], RollupSums] = {}
    for item in items:
        key = (item.telemetry.device_id, bucket_start(item.received_at, bucket_s))
        sums.setdefault(key, RollupSums()).add(item.telemetry)
    return sums
