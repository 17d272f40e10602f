"""How fast a variant runs at an operating point on a device class: measured, else predicted.

Pure numerics (no store, no clock), tested on their own.

* A **measurement** folds telemetry windows in: each device keeps a running estimate of its
  windows' p95 (`RunningP95`), and a class's figure is the median over its devices, so one
  device slowed by a neighbour process does not move its whole class.
* A **cost** is what a configuration costs on the machine that built it: the optimizer's
  median latency with every exit disabled (manifest `health.latency_ms`), scaled by the share of
  the full model's MACs the operating point is expected to run (`expected_macs / macs`).
* A **prediction** for a configuration nobody of a class has run yet is its cost times the
  class's speed ratio (measured latency / cost), taken from the other configurations measured on
  that class, else from the nearest class that has measurements (same family: rpi*, jetson*,
  x86*; else all classes), else 1 (the build machine's own speed). So a variant's MACs set the
  shape, and what the fleet measured sets the scale.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

# A running estimate moves by at least this share of each new window once it has history:
# quick to follow a device that slowed down, steady against one noisy window.
MIN_ALPHA = 0.2


@dataclass(frozen=True)
class Config:
    """What a device runs: a variant (by manifest sha256) at an operating point."""

    manifest: str
    point: int


@dataclass
class RunningP95:
    """Exponentially weighted mean of window p95s; the plain mean for the first windows."""

    windows: int = 0
    value: float = 0.0

    def add(self, p95_ms: float) -> float:
        self.windows += 1
        alpha = max(1.0 / self.windows, MIN_ALPHA)
        self.value += alpha * (p95_ms - self.value)
        return self.value


def class_figure(per_device: Iterable[float]) -> float | None:
    """A class's latency from its devices' estimates: the median, robust to one slow device."""
    values = sorted(per_device)
    return statistics.median(values) if values else None


def cost(no_exit_ms: float, expected_macs: float, total_macs: float) -> float:
    """Build-machine milliseconds of one operating point (see the module docstring)."""
    if total_macs <= 0:
        return no_exit_ms
    return no_exit_ms * max(expected_macs, 0.0) / total_macs


def family(device_class: str) -> str:
    """rpi5 -> rpi, jetson-orin-nano -> jetson, x86-avx512 -> x86."""
    for known in ("rpi", "jetson", "x86"):
        if device_class.startswith(known):
            return known
    return device_class.split("-", 1)[0]


Basis = Literal["measured", "class_ratio", "nearest_class", "fleet_ratio", "optimizer"]


@dataclass(frozen=True)
class Prediction:
    """A latency figure and where it comes from (shown with every decision)."""

    p95_ms: float
    basis: Basis
    detail: str


def speed_ratio(measured: Mapping[Config, float], costs: Mapping[Config, float]) -> float | None:
    """Median of measured / cost over the configurations measured on one class."""
    ratios = [ms / costs[c] for c, ms in measured.items() if c in costs and costs[c] > 0]
    return statistics.median(ratios) if ratios else None


def predict(
    config: Config,
    device_class: str,
    measured: Mapping[str, Mapping[Config, float]],
    costs: Mapping[Config, float],
) -> Prediction | None:
    """The p95 of config on device_class; measured maps class -> config -> measured p95.

    None when the configuration has no cost (an unknown variant) and was never measured.
    """
    own = measured.get(device_class, {})
    if config in own:
        return Prediction(own[config], "measured", f"measured on {device_class}")
    c = costs.get(config)
    if c is None:
        return None
    ratio = speed_ratio(own, costs)
    if ratio is not None:
        return Prediction(
            c * ratio, "class_ratio", f"cost {c:.3f} ms x {ratio:.2f} measured on {device_class}"
        )
    fam = family(device_class)
    kin = {k: v for k, v in measured.items() if family(k) == fam and k != device_class}
    ratios = {k: r for k, v in kin.items() if (r := speed_ratio(v, costs)) is not None}
    if ratios:
        nearest = sorted(ratios)[0]
        return Prediction(
            c * ratios[nearest],
            "nearest_class",
            f"cost {c:.3f} ms x {ratios[nearest]:.2f} measured on nearest class {nearest}",
        )
    fleet = [r for k, v in measured.items() if (r := speed_ratio(v, costs)) is not None]
    if fleet:
        ratio = statistics.median(fleet)
        return Prediction(
            c * ratio, "fleet_ratio", f"cost {c:.3f} ms x {ratio:.2f} (median of the fleet)"
        )
    return Prediction(c, "optimizer", f"the optimizer's {c:.3f} ms on its build machine")


def prediction_error(predicted: float, measured: float) -> float:
    """Signed relative error of a prediction: +0.25 means the device was 25% slower."""
    return measured / predicted - 1.0 if predicted > 0 else float("inf")
