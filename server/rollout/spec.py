"""What an operator asks of a rollout: canaries, soak, halt rules, waves, deadlines."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.agent.protocol.ids import SHA256_PATTERN
from edgefleet.server.rollout.plan import parse_canary, parse_waves
from edgefleet.server.rollout.rules import parse_rule


class RolloutSpec(BaseModel):
    """Stored with the rollout (spec_json), so a restarted coordinator goes on with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    canary: str = Field("10%", description="'10%' of the group or a count like '3'")
    soak_s: float = Field(300.0, ge=0, le=7 * 86400, description="canaries watched this long")
    halt_if: list[str] = Field(default_factory=list, max_length=16, description="e.g. p95_ms>40")
    waves: str = Field(
        "100%", description="cumulative shares after the canaries, e.g. 10%,50%,100%"
    )
    device_deadline_s: float = Field(
        1800.0, gt=0, le=30 * 86400, description="a device not active by then has failed"
    )
    max_failed: float = Field(
        0.0, ge=0, le=1, description="share of a wave allowed to fail before the rollout halts"
    )
    allow_model_change: bool = False
    # base manifest sha256 -> delta archive sha256, filled in when the rollout is created.
    deltas: dict[str, str] = Field(default_factory=dict)

    @field_validator("canary")
    @classmethod
    def _canary(cls, value: str) -> str:
        parse_canary(value)
        return value

    @field_validator("waves")
    @classmethod
    def _waves(cls, value: str) -> str:
        parse_waves(value)
        return value

    @field_validator("halt_if")
    @classmethod
    def _rules(cls, value: list[str]) -> list[str]:
        for rule in value:
            parse_rule(rule)
        return value

    @field_validator("deltas")
    @classmethod
    def _deltas(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        sha = re.compile(SHA256_PATTERN)
        for base, delta in value.items():
            if not (sha.match(base) and sha.match(delta)):
                raise ValueError(f"deltas: {base!r} -> {delta!r} are not sha256 digests")
        return value
