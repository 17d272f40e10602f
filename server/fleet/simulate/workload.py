"""What a simulated device measures: its board, its operating points, one window's figures.

The operating points follow a bundle's `operating_points` (docs/bundle.md): ordered from
accurate (index 0) to fast (last). A faster point lets more frames leave at the early exit, so
it keeps up with more of the camera's frames at a lower latency, CPU load and power. The
simulated governor moves between them the way `agent/governor.py` does: one point faster under
pressure, one point back toward the default when calm, never more accurate than the default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from edgefleet.agent.protocol import Percentiles

SIM_MODEL_ID: Final = "simnet"
EXITS: Final = 3  # two early exits and the final head
CAMERA_FPS: Final = 30.0

# (machine, cpu count, RAM in MB, board, accelerators, device class as agent/hardware.py
# classify_device names it): device i runs on board i % 4.
BOARDS: Final = (
    ("aarch64", 4, 8_064.0, "Raspberry Pi 5 Model B Rev 1.0", (), "rpi5"),
    ("aarch64", 4, 3_796.0, "Raspberry Pi 4 Model B Rev 1.5", (), "rpi4"),
    (
        "aarch64",
        6,
        7_620.0,
        "NVIDIA Jetson Orin Nano Developer Kit",
        ("CUDAExecutionProvider",),
        "jetson-orin-nano",
    ),
    ("x86_64", 4, 15_842.0, "Intel N100 mini PC", ("OpenVINOExecutionProvider",), "x86-avx2"),
)
BOARD_CLASSES: Final = tuple(board[5] for board in BOARDS)


@dataclass(frozen=True)
class SimPoint:
    """One simulated operating point: what the device sustains there (before noise)."""

    name: str
    fps: float  # frames per second the model keeps up with (the camera gives CAMERA_FPS)
    p50_ms: float
    early_exit_share: float  # share of the processed frames that leave at the first exit
    cpu_percent: float


# Accurate to fast, as in a bundle's manifest.
POINTS: Final = (
    SimPoint("accurate", fps=18.0, p50_ms=30.0, early_exit_share=0.19, cpu_percent=100.0),
    SimPoint("balanced", fps=22.0, p50_ms=24.0, early_exit_share=0.31, cpu_percent=85.0),
    SimPoint("quick", fps=26.0, p50_ms=18.0, early_exit_share=0.43, cpu_percent=70.0),
    SimPoint("fast", fps=30.0, p50_ms=12.0, early_exit_share=0.55, cpu_percent=55.0),
)
FASTEST: Final = len(POINTS) - 1


def default_point(index: int) -> int:
    """The point device `index` starts at, as its bundle's default; never the fastest.

    An optimizer leaves a faster point above the default for the governor to escape to under
    pressure; the spread over 0..FASTEST-1 gives a fleet view with several points in use.
    """
    return index % FASTEST


@dataclass(frozen=True)
class Window:
    """The measured figures of one simulated telemetry window."""

    captured: int
    processed: int
    fps: float
    latency: Percentiles
    stages: list[Percentiles]
    exits: list[int]  # frames per exit, final head last
    cpu_percent: float
    rss_mb: float
    temperature_c: float
    power_w: float


def simulate_window(point: SimPoint, rng: random.Random, duration: float, cpu_count: int) -> Window:
    """Plausible figures for `duration` seconds at `point`, with noise from rng."""
    captured = round(CAMERA_FPS * duration)
    target_fps = max(1.0, point.fps * rng.uniform(0.9, 1.05))
    processed = min(captured, round(target_fps * duration))
    fps = processed / duration if duration > 0 else 0.0
    if processed:
        p50 = point.p50_ms * rng.uniform(0.9, 1.1)
        p95 = p50 * rng.uniform(1.2, 1.5)
        p99 = p95 * rng.uniform(1.05, 1.3)
    else:
        p50 = p95 = p99 = 0.0
    stages = [
        Percentiles(p50=p50 * share, p95=p95 * share, p99=p99 * share) for share in (0.6, 0.4)
    ]
    early = int(processed * point.early_exit_share)
    middle = int((processed - early) * 0.4)
    cpu = min(100.0 * cpu_count, point.cpu_percent * rng.uniform(0.85, 1.15))
    power = 2.4 + 0.012 * cpu + rng.uniform(-0.1, 0.1)
    temperature = 42.0 + 0.25 * cpu + rng.uniform(-1.0, 1.0)
    return Window(
        captured=captured,
        processed=processed,
        fps=fps,
        latency=Percentiles(p50=p50, p95=p95, p99=p99),
        stages=stages,
        exits=[early, middle, processed - early - middle],
        cpu_percent=cpu,
        rss_mb=180.0 + rng.uniform(0.0, 8.0),
        temperature_c=min(temperature, 200.0),
        power_w=power,
    )


def simulate_variant_window(
    p50_ms: float, early_exit_share: float, rng: random.Random, duration: float, cpu_count: int
) -> Window:
    """Figures for `duration` seconds of a model whose median latency is `p50_ms` (noise-free).

    Frames are processed one after the other, so the frame rate is what the latency allows, at
    most the camera's. The noise is modest (p50 +-5%, p95 ~1.3 x p50) so that a latency target
    can be judged from a few windows.
    """
    captured = round(CAMERA_FPS * duration)
    p50 = p50_ms * rng.uniform(0.95, 1.05)
    target_fps = min(CAMERA_FPS, 1000.0 / p50) * rng.uniform(0.97, 1.0)
    processed = min(captured, round(target_fps * duration))
    fps = processed / duration if duration > 0 else 0.0
    if processed:
        p95 = p50 * rng.uniform(1.27, 1.33)
        p99 = p95 * rng.uniform(1.05, 1.15)
    else:
        p50 = p95 = p99 = 0.0
    stages = [
        Percentiles(p50=p50 * share, p95=p95 * share, p99=p99 * share) for share in (0.6, 0.4)
    ]
    early = int(processed * early_exit_share)
    middle = int((processed - early) * 0.4)
    busy = fps * p50 / 1000.0  # share of the time one inference runs
    cpu = min(100.0 * cpu_count, 8.0 + 100.0 * busy * rng.uniform(0.9, 1.1))
    power = 2.4 + 0.012 * cpu + 0.02 * fps + rng.uniform(-0.1, 0.1)
    temperature = 42.0 + 0.25 * min(cpu, 100.0) + rng.uniform(-1.0, 1.0)
    return Window(
        captured=captured,
        processed=processed,
        fps=fps,
        latency=Percentiles(p50=p50, p95=p95, p99=p99),
        stages=stages,
        exits=[early, middle, processed - early - middle],
        cpu_percent=cpu,
        rss_mb=180.0 + rng.uniform(0.0, 8.0),
        temperature_c=min(temperature, 200.0),
        power_w=power,
    )


def governor_move(current: int, default: int, rng: random.Random) -> tuple[int, str]:
    """The simulated governor's next point and why: the moves `agent/governor.py` can make.

    One point faster (simulated pressure) unless at the fastest; one point back toward the
    default (simulated recovery) unless at or below it. Where both are possible rng chooses.
    """
    moves: list[tuple[int, str]] = []
    if current < FASTEST:
        moves.append((current + 1, "simulated pressure: one point faster"))
    if current > default:
        moves.append((current - 1, "simulated recovery: one point back toward the default"))
    if not moves:  # only when default is the fastest point, which default_point never picks
        raise ValueError(f"no governor move from point {current} with default {default}")
    return moves[0] if len(moves) == 1 else rng.choice(moves)
