"""`edgefleet-agent bench BUNDLE`: the owner's report of what a bundle does on this device.

Latency per operating point (and with every exit off), frames per second and energy per frame,
measured on real frames from a video file or camera, one operating point after another.
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
from edgefleet.agent.power import PowerMeter, detect
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel

Say = Callable[[str], None]


@dataclass
class PointResult:
    """One operating point measured on this device."""

    name: str
    thresholds: list[float | None]
    median_ms: float
    p95_ms: float
    fps: float
    exit_histogram: list[int]
    power_w: float | None
    energy_per_frame_mj: float | None
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


def _sampler(meter: PowerMeter, reader: Any, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        meter.add(reader.sample())


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
    reports as latency.
    """
    model = StagedModel(verified, threads=threads, providers=providers)
    pre = Preprocessor(verified.manifest.preprocessing, dtype=verified.manifest.input.dtype)
    points = [(p.name, list(p.thresholds)) for p in verified.manifest.operating_points]
    points.append(("exits off", [None] * len(model.early_exits)))
    reader = detect()
    results = []
    for _ in range(20):  # warm-up: first runs allocate and page in
        model.predict_frame(frames[0], pre)
    for name, thresholds in points:
        model.set_thresholds(thresholds)
        meter = PowerMeter(reader.name)
        meter.add(reader.sample())
        stop = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(meter, reader, stop), daemon=True)
        sampler.start()
        times: list[float] = []
        exits = [0] * (len(model.early_exits) + 1)
        t_start = time.perf_counter()
        for _ in range(rounds):
            for frame in frames:
                t0 = time.perf_counter()
                pred = model.predict_frame(frame, pre)
                times.append((time.perf_counter() - t0) * 1000.0)
                exits[pred.exit_index] += 1
        elapsed = time.perf_counter() - t_start
        stop.set()
        sampler.join()
        meter.add(reader.sample())
        window = meter.close(len(times), elapsed)
        result = PointResult(
            name=name,
            thresholds=thresholds,
            median_ms=statistics.median(times),
            p95_ms=float(np.percentile(times, 95)),
            fps=len(times) / elapsed,
            exit_histogram=exits,
            power_w=window.power_w,
            energy_per_frame_mj=window.energy_per_frame_mj,
            power_source=window.source,
        )
        say(
            f"{name:<14} median {result.median_ms:7.3f} ms  p95 {result.p95_ms:7.3f} ms  "
            f"{result.fps:8.1f} fps  exits {exits}  "
            + (
                f"{result.energy_per_frame_mj:.1f} mJ/frame ({window.source})"
                if result.energy_per_frame_mj is not None
                else "energy n/a"
            )
        )
        results.append(result)
    return results


def as_json(results: list[PointResult]) -> list[dict[str, Any]]:
    """Plain dicts for --json."""
    return [asdict(r) for r in results]
