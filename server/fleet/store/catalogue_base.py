"""The model catalogue's part of the store: source models, build jobs, variants, group targets,
latency measured per device class, and the closed loop's decisions (schema v6).

Records are plain frozen dataclasses like the rest of base.py; the SQL is in catalogue.py,
written once for both backends. Every method is one transaction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# A job in one of these states holds its model (the partial unique index build_jobs_one_open).
OPEN_JOB_STATES: tuple[JobState, ...] = ("queued", "running")
JobOrigin = Literal["operator", "loop"]


@dataclass(frozen=True)
class ModelRecord:
    """A source model and its labelled data, kept by the coordinator to build variants from."""

    name: str  # catalogue name, an id ([A-Za-z0-9][A-Za-z0-9_.-]{0,63})
    source_sha256: str
    source_path: str  # the ONNX file, copied into the catalogue directory
    source_bytes: int
    data_sha256: str
    data_path: str  # the labelled data (.npz or a folder), copied beside it
    data_bytes: int
    options_json: str  # optimize options given at `models add` (preprocessing flags...)
    added_at: float


@dataclass(frozen=True)
class BuildJobRecord:
    """One `edgefleet optimize` run of the coordinator, from queued to its variant."""

    job_id: str
    model: str
    origin: JobOrigin
    options_json: str  # the optimize options of this build (BuildOptions)
    state: JobState
    step: int  # the optimizer's [step/steps] progress
    steps: int
    progress: str  # the newest progress line
    log_path: str
    variant_id: str | None  # set when it succeeded
    reason: str | None  # why it failed or was cancelled
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


@dataclass(frozen=True)
class VariantRecord:
    """An optimized, signed bundle built from a catalogue model, with its figures."""

    variant_id: str  # "{model}-v{version}"
    model: str
    version: int
    model_id: str  # the manifest's model_id
    bundle_sha256: str  # the archive in the archive store
    manifest_sha256: str  # what a device reports in status.bundle_sha256 while running it
    job_id: str | None  # None for a variant registered from an existing bundle
    options_json: str
    size_bytes: int  # the archive
    macs: int  # the full model, every exit disabled
    # [{"name", "val_accuracy", "test_accuracy" (or null), "expected_macs", "exit_rates"}]
    # one per operating point, accurate to fast, as in the manifest.
    points_json: str
    default_point: int
    # The optimizer's own latency figures: {"measured_on": device class of the build machine,
    # "latency_ms": {label: ms}, "by_class": {class: ms every exit disabled}}.
    estimate_json: str
    created_at: float
    retired_at: float | None = None  # an operator took it out of the loop's choices


@dataclass(frozen=True)
class GroupTarget:
    """What the operator asks of a group, and how far the closed loop may go to get it."""

    group: str
    p95_ms: float
    min_accuracy: float | None
    max_power_w: float | None
    loop: bool  # False: the loop changes nothing in this group
    pinned_variant: str | None  # the loop keeps the group on this variant (points still move)
    updated_at: float


DecisionAction = Literal[
    "pin_point",  # pinned an operating point of the variant the devices run
    "rollout",  # rolled a faster (or, moving back, a more accurate) variant out, with canaries
    "build",  # asked for a new variant with a tighter budget or more aggressive passes
    "move_back",  # far under target: toward a more accurate point or variant
    "hold",  # out of target but nothing to do (no candidate, cool-down, rollout running)
    "measured",  # a prediction met its first measurement (the prediction error)
]


@dataclass(frozen=True)
class DecisionRecord:
    """One decision of the closed loop, with the numbers behind it (details_json)."""

    decision_id: int  # assigned by the store, increasing
    group: str
    ts: float
    action: DecisionAction
    devices: tuple[str, ...]
    message: str  # one line for a human
    details_json: str  # windows, variant, expected vs measured latency...
    rollout_id: str | None
    job_id: str | None


@dataclass(frozen=True)
class LatencyRecord:
    """How fast one variant runs at one operating point on one device class, as measured."""

    manifest_sha256: str
    device_class: str
    operating_point: int
    windows: int  # telemetry windows folded in
    devices: int  # distinct devices that reported (at the last update)
    p95_ms: float  # robust running estimate of the windows' p95 (see retune/latency.py)
    p50_ms: float
    power_w: float | None
    predicted_p95_ms: float | None  # the prediction made before the first measurement
    updated_at: float


class CatalogueStore(ABC):
    """Catalogue, targets, measurements and decisions; a part of Store."""

    # -- models and variants ------------------------------------------------------------------

    @abstractmethod
    def add_model(self, record: ModelRecord) -> None:
        """Store a source model; ValueError naming it when the name is taken."""

    @abstractmethod
    def model(self, name: str) -> ModelRecord | None: ...

    @abstractmethod
    def models(self) -> list[ModelRecord]:
        """Every model, by name."""

    @abstractmethod
    def add_variant(self, record: VariantRecord) -> None:
        """Register a variant; ValueError when its id or manifest is already registered."""

    @abstractmethod
    def variant(self, variant_id: str) -> VariantRecord | None: ...

    @abstractmethod
    def variants(self, model: str | None = None) -> list[VariantRecord]:
        """Variants (of one model), oldest first."""

    @abstractmethod
    def variant_by_manifest(self, manifest_sha256: str) -> VariantRecord | None: ...

    @abstractmethod
    def retire_variant(self, variant_id: str, at: float | None) -> None:
        """Take a variant out of the loop's choices (None: put it back); KeyError if unknown."""

    # -- build jobs ---------------------------------------------------------------------------

    @abstractmethod
    def create_job(self, record: BuildJobRecord) -> None:
        """Store a queued job; JobConflict (store/errors.py) naming the open job when the
        model already has one queued or running."""

    @abstractmethod
    def job(self, job_id: str) -> BuildJobRecord | None: ...

    @abstractmethod
    def jobs(
        self,
        model: str | None = None,
        states: Sequence[JobState] | None = None,
        limit: int = 100,
    ) -> list[BuildJobRecord]:
        """Newest created first."""

    @abstractmethod
    def update_job(
        self,
        job_id: str,
        *,
        only_if: Sequence[JobState] | None = None,
        state: JobState | None = None,
        step: int | None = None,
        steps: int | None = None,
        progress: str | None = None,
        variant_id: str | None = None,
        reason: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> BuildJobRecord | None:
        """Change the given fields (None: keep), set updated_at; KeyError for an unknown id.
        With only_if, nothing changes unless the job is in one of those states (None back)."""

    # -- group targets ------------------------------------------------------------------------

    @abstractmethod
    def set_target(self, target: GroupTarget) -> None:
        """Create or replace a group's target."""

    @abstractmethod
    def target(self, group: str) -> GroupTarget | None: ...

    @abstractmethod
    def targets(self) -> list[GroupTarget]:
        """Every group's target, by group."""

    # -- latency per device class -------------------------------------------------------------

    @abstractmethod
    def put_latency(self, record: LatencyRecord) -> None:
        """Create or replace the row keyed (manifest_sha256, device_class, operating_point)."""

    @abstractmethod
    def latencies(self, manifest_sha256: str | None = None) -> list[LatencyRecord]:
        """Rows (of one variant), by manifest, class, point."""

    # -- decisions ----------------------------------------------------------------------------

    @abstractmethod
    def add_decision(
        self,
        group: str,
        ts: float,
        action: DecisionAction,
        devices: Sequence[str],
        message: str,
        details_json: str,
        rollout_id: str | None = None,
        job_id: str | None = None,
    ) -> DecisionRecord:
        """Append a decision; returns it with its id."""

    @abstractmethod
    def decisions(
        self,
        group: str | None = None,
        since_id: int = 0,
        limit: int = 100,
    ) -> list[DecisionRecord]:
        """Newest first, of one group, with ids > since_id."""

    @abstractmethod
    def decision_counts(self) -> dict[str, int]:
        """Decisions by action, every action listed (zero included), for /metrics."""
