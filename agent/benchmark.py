"""`edgefleet-agent bench BUNDLE`: the owner's report of what a bundle does on this device.

Time per frame of every operating point (and with every exit off), frames per second and
energy per frame, measured on real frames from a video file or camera.

The points are compared fairly: every stage and exit branch is warmed up, then each point runs
a few frames of its own untimed; each round times every point over all the frames, a few frames
at a time, the points taking turns in an order that rotates from chunk to chunk and round to
round. A clock that ramps up (turbo, the Pi's governor) or down (heat) over the run, or a noisy
neighbour's burst, then weighs on all points alike instead of on the ones timed first or last.
Timed one after another, `fast` of the reference bundle came out slower than `balanced-5`: they
differ in 9 of 200 frames, about 0.003 ms (4%) of mean time, less than the measured effect of a
point's place in the sequence (about 10%). Figures are medians over rounds. With early exits
the *mean* time per frame is what a faster point saves: the median is the time of the exit
most frames take, which several points share.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.power import PowerMeter, PowerReader, detect
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel

Say = Callable[[str], None]

# Untimed frames each point runs before the first round: its own stages and exit branches,
# with its own thresholds, get their first (allocating) runs out of the way.
POINT_WARMUP_FRAMES = 10
# Frames a point runs before the next point takes its turn: short turns spread a burst of
# noise over all points (the same rule as server/optimize/latency.py's `interleaved`).
CHUNK_FRAMES = 10
# Seconds between power samples (one is also taken at the start and the end).
SAMPLE_EVERY_S = 0.2


@dataclass
class PointResult:
    """One operating point measured on this device."""

    name: str
    thresholds: list[float | None]
    frames: int  # distinct frames; exit_histogram sums to this
    rounds: int  # passes over the frames: frames * rounds timed runs
    mean_ms: float  # mean time per frame of a pass, median over the passes
    median_ms: float  # of single frames, over every timed run
    p95_ms: float
    fps: float  # 1000 / mean_ms: one stream, frames back to back
    exit_histogram: list[int]  # frames per exit in one pass: early exits in order, final last
    power_w: float | None  # the device's average over the whole timed run (points interleave)
    energy_per_frame_mj: float | None  # power_w x mean_ms
    power_source: str


def read_frames(source: str | int, count: int) -> list[npt.NDArray[Any]]:
    """Up to count frames from a video file or camera (looping a short file)."""
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise ValueError(f"{source}: OpenCV cannot open it")
    frames: list[npt.NDArray[Any]] = []
    try:
        while len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                if not frames:
                    raise ValueError(f"{source}: no frames")
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = cap.read()
                if not ok:
                    break
            frames.append(frame)
    finally:
        cap.release()
    return frames


def _sample_power(meter: PowerMeter, reader: PowerReader, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_EVERY_S):
        meter.add(reader.sample())


@dataclass
class _Point:
    """What is gathered for one operating point across the rounds."""

    name: str
    thresholds: list[float | None]
    times_ms: list[float]
    round_ms: list[float]  # total time of its frames, one value per round
    exits: list[int]

    def result(self, frames: int, power_w: float | None, source: str) -> PointResult:
        mean_ms = statistics.median(self.round_ms) / frames
        return PointResult(
            name=self.name,
            thresholds=self.thresholds,
            frames=frames,
            rounds=len(self.round_ms),
            mean_ms=mean_ms,
            median_ms=statistics.median(self.times_ms),
            p95_ms=float(np.percentile(self.times_ms, 95)),
            fps=1000.0 / mean_ms,
            exit_histogram=self.exits,
            power_w=power_w,
            energy_per_frame_mj=None if power_w is None else power_w * mean_ms,  # W x ms = mJ
            power_source=source,
        )


def turn_order(count: int, shift: int) -> list[int]:
    """Point indices in the order one chunk times them: 0..count-1 rotated by shift."""
    shift %= count
    return [*range(shift, count), *range(shift)]


def bench_bundle(
    verified: VerifiedBundle,
    frames: list[npt.NDArray[Any]],
    *,
    threads: int = 1,
    providers: Sequence[str] | None = None,
    rounds: int = 3,
    say: Say = lambda _m: None,
) -> list[PointResult]:
    """Measure every operating point, plus all exits off, on the same decoded frames.

    Each time is frame to prediction, preprocessing included: what the agent's telemetry
    reports as latency. The points take turns within every round (module docstring).
    """
    if not frames or rounds < 1:
        raise ValueError(f"bench needs frames and rounds >= 1 (got {len(frames)}, {rounds})")
    model = StagedModel(verified, threads=threads, providers=providers)
    pre = Preprocessor(verified.manifest.preprocessing, dtype=verified.manifest.input.dtype)
    n_exits = len(model.early_exits) + 1
    points = [
        _Point(p.name, list(p.thresholds), [], [], [0] * n_exits)
        for p in verified.manifest.operating_points
    ]
    points.append(_Point("exits off", [None] * len(model.early_exits), [], [], [0] * n_exits))
    # Every stage and exit branch once, whatever the thresholds: a point timed first must not
    # pay for sessions that only it reaches.
    model.warm_up()
    for point in points:
        model.set_thresholds(point.thresholds)
        for frame in frames[:POINT_WARMUP_FRAMES]:
            model.predict_frame(frame, pre)
    reader = detect()
    meter = PowerMeter(reader.name)
    meter.add(reader.sample())
    stop = threading.Event()
    sampler = threading.Thread(
        target=_sample_power, args=(meter, reader, stop), name="bench-power", daemon=True
    )
    sampler.start()
    clock = time.perf_counter
    t_start = clock()
    try:
        for r in range(rounds):
            totals = [0.0] * len(points)
            for c, start in enumerate(range(0, len(frames), CHUNK_FRAMES)):
                chunk = frames[start : start + CHUNK_FRAMES]
                for i in turn_order(len(points), r + c):
                    point = points[i]
                    model.set_thresholds(point.thresholds)
                    for frame in chunk:
                        t0 = clock()
                        pred = model.predict_frame(frame, pre)
                        ms = (clock() - t0) * 1000.0
                        point.times_ms.append(ms)
                        totals[i] += ms
                        if r == 0:  # the same frames take the same exits in every round
                            point.exits[pred.exit_index] += 1
            for point, total in zip(points, totals, strict=True):
                point.round_ms.append(total)
            say(f"round {r + 1}/{rounds}: {len(points)} points x {len(frames)} frames timed")
    finally:
        stop.set()
        sampler.join()
    meter.add(reader.sample())
    window = meter.close(rounds * len(points) * len(frames), clock() - t_start)
    return [p.result(len(frames), window.power_w, reader.name) for p in points]


def report(results: list[PointResult]) -> str:
    """The table `edgefleet-agent bench` prints, with what each figure is."""
    if not results:
        return "no operating points"
    first = results[0]
    rows = [["POINT", "MEAN ms", "FPS", "MEDIAN ms", "P95 ms", "EXITS", "mJ/FRAME"]]
    for r in results:
        energy = "-" if r.energy_per_frame_mj is None else f"{r.energy_per_frame_mj:.2f}"
        rows.append([
            r.name, f"{r.mean_ms:.3f}", f"{r.fps:.1f}", f"{r.median_ms:.3f}", f"{r.p95_ms:.3f}",
            "/".join(map(str, r.exit_histogram)), energy,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    source = first.power_source
    estimate = " (an estimate from CPU load, not a meter)" if source == "estimate" else ""
    legend = [
        f"Each point timed over the same {first.frames} frames in {first.rounds} round(s), "
        f"the points taking turns every {CHUNK_FRAMES} frames in a rotating order, each warmed "
        "up first; frame to prediction, preprocessing included.",
        "MEAN: time per frame averaged over the frames (median over rounds): what early exits "
        "save. FPS = 1000 / MEAN, one stream, frames back to back.",
        "MEDIAN, P95: of single frames over all rounds; the median is the time of the exit "
        "most frames take, so points that send most frames out at the same exit share it.",
        f"EXITS: how many of the {first.frames} frames left at each exit in one pass, "
        "early exits in order, final head last.",
        f"mJ/FRAME: the device's average power over the whole run x MEAN (the points take "
        f"turns too fast to meter each alone); power source {source}{estimate}.",
    ]
    return "\n".join([*table, "", *legend])


def as_json(results: list[PointResult]) -> list[dict[str, Any]]:
    """Plain dicts for --json."""
    return [asdict(r) for r in results]
