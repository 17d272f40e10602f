"""Options of `edgefleet optimize`, validated once (a typo is an error, not a default)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.runtime.confidence import Rule

from .quantize import Method


class OptimizeOptions(BaseModel):
    """Everything the optimizer may be told; defaults are the documented behaviour."""

    model_config = ConfigDict(extra="forbid")

    max_drop: float = Field(0.01, ge=0, le=1, description="accepted validation accuracy drop")
    confidence: float | None = Field(
        0.9,
        gt=0,
        lt=1,
        description="the budget must hold with this confidence (an upper bound of the drop, "
        "risk.py); None = the measured validation drop only",
    )
    quantization: Literal["static", "dynamic", "fp16", "none"] = "static"
    calibration: Method = "minmax"
    reduce_range: Literal["auto", "on", "off"] = Field(
        "auto", description="7-bit weights; auto = on for x86 CPUs without VNNI"
    )
    speed_control: Literal["on", "off"] = Field(
        "on",
        description="on: nodes whose INT8 form is slower on this machine stay fp32 "
        "(node_timing.py), kept only if the whole model gets faster",
    )
    head_precision: Literal["float", "int8"] = Field(
        "float", description="float: pooling and a small final linear layer stay fp32"
    )
    exits: Literal["auto", "none"] | list[str] = "auto"
    exit_fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    exit_rule: Rule = "max_softmax"
    exit_grid: int = Field(2, ge=1, le=8, description="exit features pooled to grid x grid")
    stage_layout: Literal["auto", "nchw", "nhwc"] = Field(
        "auto", description="layout of 4-D uint8 tensors between stages; auto = nhwc for QDQ"
    )
    prune: float = Field(0.0, ge=0, lt=1, description="fraction of conv channels to prune")
    low_rank: float | None = Field(None, gt=0, le=1, description="SVD energy kept")
    share: int | None = Field(None, ge=2, le=256, description="k-means clusters per channel")
    threads: int = Field(1, ge=1, le=64)
    latency_samples: int = Field(200, ge=10)
    model_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(1, ge=1)
    labels: list[str] | None = None
    color_given: bool = Field(
        False, description="--color was given: a model/data channel mismatch is converted"
    )


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where u8 x s8 dot products cannot saturate (VNNI), or on ARM (no such issue)."""
    if platform.machine().lower() in ("aarch64", "arm64", "armv7l"):
        return True
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def use_reduce_range(setting: str) -> bool:
    """Resolve reduce_range=auto for this machine.

    Without VNNI, x86 evaluates u8 x s8 with saturating 16-bit pair sums (vpmaddubsw): measured
    here, the reference CNN fell from 96.4% to 87.0% with full-range weights and kept 95.8%
    with 7-bit ones. Accuracy control measures on this machine, so it must compute what
    such a device computes; ARM and VNNI devices lose almost nothing with 7-bit weights.
    """
    if setting == "auto":
        return not cpu_has_vnni()
    return setting == "on"
