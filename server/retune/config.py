"""The closed loop's settings in the coordinator's configuration (docs/closedloop.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.server.retune.policy import LoopSettings


class LoopConfig(BaseModel):
    """How often the loop looks and how cautious it is; defaults suit a fleet of cameras."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick_s: float = Field(5.0, gt=0, description="How often every group is checked.")
    miss_windows: int = Field(3, ge=1, description="Windows in a row over target: a miss.")
    under_windows: int = Field(6, ge=1, description="Windows in a row far under: move back.")
    headroom: float = Field(
        0.85, gt=0, le=1, description="Choose configs predicted under this x target."
    )
    far_under: float = Field(0.5, gt=0, lt=1, description="Far under: p95 below this x target.")
    min_gain: float = Field(0.002, ge=0, description="Accuracy worth moving back for.")
    relief: float = Field(
        0.7,
        gt=0,
        lt=1,
        description="A config left on a miss is tried again "
        "once the device runs this x faster than when it left.",
    )
    cooldown_s: float = Field(60.0, ge=0, description="No change to a device this long after one.")
    canary: str = Field("10%", description="Canaries of each loop rollout.")
    soak_s: float = Field(60.0, ge=0, description="How long a loop rollout's canaries soak.")
    pin_timeout_s: float = Field(
        60.0, gt=0, description="A pin not seen in telemetry by then is dropped."
    )
    build: bool = Field(True, description="Build a faster variant when none in the catalogue fits.")

    @model_validator(mode="after")
    def _valid(self) -> LoopConfig:
        self.settings()  # the same checks as the engine's
        return self

    def settings(self) -> LoopSettings:
        return LoopSettings(
            miss_windows=self.miss_windows,
            under_windows=self.under_windows,
            headroom=self.headroom,
            far_under=self.far_under,
            min_gain=self.min_gain,
            relief=self.relief,
            cooldown_s=self.cooldown_s,
            canary=self.canary,
            soak_s=self.soak_s,
            pin_timeout_s=self.pin_timeout_s,
        )
