"""What an operator asks of a federated round: who, what to train, how to judge and publish.

Stored with the round (spec_json), so a restarted coordinator goes on with the same settings.
The local-training fields mirror FedTask's (agent/protocol/fed.py), which carries them to the
devices; the rest stays on the coordinator: deadline, quorum, aggregator, norm bound, the
evaluation tolerance and how the result is rolled out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.agent.protocol.fed import MAX_HEADS, Compression, FedTask, PrivacySpec
from edgefleet.agent.protocol.ids import GroupName
from edgefleet.server.federated.aggregate import AGGREGATORS
from edgefleet.server.rollout.spec import RolloutSpec

AggregatorName = Literal["fedavg", "median", "trimmed_mean", "norm_clipped_fedavg", "krum"]
# Parameters an aggregator gets when the spec leaves them out. norm_clipped_fedavg's bound
# is not here: without one it clips at the round's median update norm (rounds.py).
DEFAULT_PARAMS: dict[str, dict[str, float]] = {"trimmed_mean": {"trim": 0.2}, "krum": {"f": 1}}
_INT_PARAMS = frozenset({"f", "m"})

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")


@dataclass(frozen=True)
class Quorum:
    """Updates a round needs: a count, or a share of the devices expected (one is set)."""

    count: int | None = None
    share: float | None = None

    def needed(self, expected: int) -> int:
        """Accepted updates needed; a share rounds up and is never below one update."""
        if self.count is not None:
            return self.count
        assert self.share is not None
        return max(1, math.ceil(round(self.share * expected, 9)))


def parse_quorum(text: str) -> Quorum:
    """'2' (at least two accepted updates) or '50%' (of the devices expected, above 0%)."""
    if m := _PERCENT.match(text):
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ValueError(f"quorum {text!r}: a percentage must be above 0% and at most 100%")
        return Quorum(share=pct / 100)
    if m := _COUNT.match(text):
        count = int(m.group(1))
        if count < 1:
            raise ValueError(f"quorum {text!r}: at least 1 update")
        return Quorum(count=count)
    raise ValueError(f"quorum {text!r}: expected a count like '2' or a share like '50%'")


class RoundSpec(BaseModel):
    """POST /fed/rounds: one federated round of a group's exit heads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: GroupName = Field(description="Devices of this group running one bundle take part.")
    heads: list[Annotated[int, Field(ge=0, le=MAX_HEADS - 1)]] | None = Field(
        None,
        max_length=MAX_HEADS,
        description="Early exits to train (0 = first); None: every early exit with a head file.",
    )
    labels: Literal["pseudo", "supplied", "both"] = Field(
        "both", description="pseudo: confident final predictions; supplied: given labels."
    )
    min_confidence: float = Field(0.9, ge=0, le=1, description="Pseudo labels this sure only.")
    min_samples: int = Field(32, ge=1, le=1_000_000, description="Fewer: the device sits out.")
    val_fraction: float = Field(0.2, gt=0, le=0.5, description="Kept for local validation.")
    local_epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(0.05, gt=0, le=10)
    batch_size: int = Field(32, ge=1, le=4096)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    prox_mu: float = Field(0.0, ge=0, le=100, description="FedProx term; 0 is plain FedAvg.")
    cpu_budget_s: float = Field(60.0, gt=0, le=3600, description="CPU seconds per device.")
    sampling: float = Field(1.0, gt=0, le=1, description="Share of eligible devices sampled.")
    privacy: PrivacySpec | None = Field(None, description="Update-level DP: clip and noise.")
    clip: float | None = Field(None, gt=0, le=1e6, description="L2 clip without noise.")
    compression: Compression = Field("fp16", description="How deltas travel.")
    deadline_s: float = Field(
        600.0, gt=0, le=7 * 86400, description="Collection ends this long after the announce."
    )
    quorum: str = Field(
        "50%", description="Accepted updates needed: a count ('2') or a share of expected."
    )
    aggregator: AggregatorName = "fedavg"
    aggregator_params: dict[str, float] = Field(
        default_factory=dict,
        description="trimmed_mean: trim (default 0.2); krum: f (default 1), m; "
        "norm_clipped_fedavg: bound (default: the round's median update norm).",
    )
    max_norm: float | None = Field(
        None,
        gt=0,
        le=1e12,
        description="Updates with a larger L2 norm are rejected; None: 5x the round's median.",
    )
    max_accuracy_drop: float = Field(
        0.005, ge=0, le=1, description="The new heads may lose at most this much accuracy."
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description="How the new bundle goes out (canaries, soak, halt rules, waves).",
    )

    @field_validator("quorum")
    @classmethod
    def _quorum(cls, value: str) -> str:
        parse_quorum(value)
        return value

    @field_validator("heads")
    @classmethod
    def _heads(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"heads must be distinct exit indexes, got {value}")
        return value

    @model_validator(mode="after")
    def _aggregator(self) -> RoundSpec:
        rule = AGGREGATORS[self.aggregator]
        allowed = rule.required | rule.optional
        unknown = sorted(set(self.aggregator_params) - allowed)
        if unknown:
            raise ValueError(
                f"aggregator {self.aggregator!r} takes {sorted(allowed) or 'no parameters'}; "
                f"unknown {unknown}"
            )
        for name in sorted(_INT_PARAMS & set(self.aggregator_params)):
            value = self.aggregator_params[name]
            if value != int(value) or value < 0:
                raise ValueError(f"aggregator parameter {name} must be a whole number >= 0")
        if self.rollout.deltas:
            raise ValueError("rollout.deltas is filled in by the coordinator, not given")
        return self

    def aggregator_kwargs(self) -> dict[str, Any]:
        """The aggregator's parameters with the defaults filled in (counts as ints)."""
        params: dict[str, Any] = {**DEFAULT_PARAMS.get(self.aggregator, {})}
        params.update(self.aggregator_params)
        return {k: int(v) if k in _INT_PARAMS else v for k, v in params.items()}

    def needed(self, expected: int) -> int:
        """Accepted updates the round needs with `expected` devices expected."""
        return parse_quorum(self.quorum).needed(expected)

    def task(
        self,
        round_id: str,
        *,
        model_id: str,
        base_manifest_sha256: str,
        base_version: int,
        heads: list[int],
        now: float,
    ) -> FedTask:
        """The FedTask devices are sent for this spec: the training half of it, with a base."""
        return FedTask(
            round_id=round_id,
            model_id=model_id,
            base_manifest_sha256=base_manifest_sha256,
            base_version=base_version,
            group=self.group,
            heads=sorted(heads),
            labels=self.labels,
            min_confidence=self.min_confidence,
            min_samples=self.min_samples,
            val_fraction=self.val_fraction,
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            prox_mu=self.prox_mu,
            cpu_budget_s=self.cpu_budget_s,
            sampling=self.sampling,
            privacy=self.privacy,
            clip=self.clip,
            compression=self.compression,
            deadline_ts=now + self.deadline_s,
            created_ts=now,
        )
