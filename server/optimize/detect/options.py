"""Options of `edgefleet optimize --task detect`, validated once (a typo is an error)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..quantize import Method


class DetectOptions(BaseModel):
    """What the detector optimizer may be told; defaults are the documented behaviour."""

    model_config = ConfigDict(extra="forbid")

    max_drop: float = Field(
        1.0,
        ge=0,
        le=100,
        description="accepted drop of validation mAP@0.5, in mAP points (1.0 = 0.01 mAP); "
        "unlabelled data: of 100 x the INT8-vs-fp32 agreement mAP@0.5",
    )
    quantization: Literal["static", "none"] = "static"
    calibration: Method = "minmax"
    reduce_range: Literal["auto", "on", "off"] = Field(
        "auto", description="7-bit weights; auto = on for x86 CPUs without VNNI"
    )
    threads: int = Field(1, ge=1, le=64, description="threads for latency measurement")
    latency_samples: int = Field(50, ge=1, description="test frames timed per contender")
    latency_rounds: int = Field(5, ge=1, le=100)
    model_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(1, ge=1)
    labels: list[str] | None = None
    color_given: bool = Field(
        False, description="--color was given: a model/data channel mismatch is converted"
    )
    gate_clip: Path | None = Field(
        None, description="video whose frames calibrate the motion gate's operating points"
    )
    gate_truth: Path | None = Field(
        None, description="per-frame boxes of the gate clip; None: the detector's own"
    )
    gate_max_drop: float = Field(
        1.0, ge=0, le=100, description="recall the gate may cost on the clip, in points"
    )
    gate_max_skip: int = Field(30, ge=0, le=100_000, description="frames skipped in a row at most")
