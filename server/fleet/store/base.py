"""One store interface for the coordinator; SQLite and PostgreSQL implement it.

The ingestor hands the store one IngestBatch per transaction. The store is the single
authority for "exactly once": telemetry and events are keyed by (device_id, seq), so a
replayed or redelivered message is a counted duplicate, never a second row, whichever
coordinator wrote it first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from edgefleet.agent.protocol import Event, FedUpdate, Reply, Status, Telemetry
from edgefleet.server.fleet.store.catalogue_base import CatalogueStore

# Why a message was not stored; counted per reason and kept in the rejects log.
RejectReason = Literal[
    "invalid_topic",
    "invalid_payload",
    "oversized",
    "device_mismatch",  # device id in the payload differs from the topic's
    "unregistered",  # unknown device while registration is closed
    "unstorable",  # valid, but the store refused it for good (see store/errors.py)
]


@dataclass(frozen=True)
class Received:
    """A decoded message and when this coordinator received it (Unix seconds)."""

    received_at: float


@dataclass(frozen=True)
class StatusIn(Received):
    status: Status


@dataclass(frozen=True)
class TelemetryIn(Received):
    telemetry: Telemetry
    # The payload's JSON as received (it validated as this model): stored as is, which spares
    # serializing every window again on the ingest path.
    raw: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EventIn(Received):
    event: Event


@dataclass(frozen=True)
class ReplyIn(Received):
    reply: Reply


@dataclass(frozen=True)
class FedUpdateIn(Received):
    """A device's weight update for a federated round (fed/{round}/update/{device})."""

    update: FedUpdate
    # The payload's JSON as received: stored as is for the round's aggregation.
    raw: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Reject(Received):
    """A message that failed validation; device_id is None when the topic named none."""

    topic: str
    device_id: str | None
    reason: RejectReason
    detail: str


@dataclass
class IngestBatch:
    """Everything one ingest transaction writes, in arrival order within each list."""

    statuses: list[StatusIn] = field(default_factory=list)
    telemetry: list[TelemetryIn] = field(default_factory=list)
    events: list[EventIn] = field(default_factory=list)
    replies: list[ReplyIn] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    fed_updates: list[FedUpdateIn] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.statuses)
            + len(self.telemetry)
            + len(self.events)
            + len(self.replies)
            + len(self.rejects)
            + len(self.fed_updates)
        )


# Why a federated update was not kept for its round's aggregate (counted and logged; stale and
# late ones are also recorded with the round, see FedUpdateStatus).
FedIgnoreReason = Literal["unknown_round", "stale", "late", "duplicate"]


@dataclass(frozen=True)
class FedIgnored:
    """One update the ingest did not take into its round, and why."""

    round_id: str
    device_id: str
    reason: FedIgnoreReason
    detail: str


@dataclass(frozen=True)
class IngestOutcome:
    """What one ingest did; duplicates are messages whose (device, seq) was already stored."""

    telemetry_inserted: int = 0
    telemetry_duplicates: int = 0
    events_inserted: int = 0
    events_duplicates: int = 0
    devices_registered: tuple[str, ...] = ()
    # Messages of unknown devices while registration is closed (stored as rejects instead).
    unregistered: int = 0
    # Births whose boot_id had already been replaced by another one: two agents, one id.
    id_conflicts: tuple[str, ...] = ()
    # Telemetry whose window_end is more than the clock tolerance away from received_at.
    clock_skewed: int = 0
    # Federated updates stored for their round's aggregate, and those ignored (with why).
    fed_received: int = 0
    fed_ignored: tuple[FedIgnored, ...] = ()


@dataclass(frozen=True)
class DeviceRecord:
    """The registry's view of one device."""

    device_id: str
    group: str | None
    online: bool
    first_seen: float
    last_seen: float  # received_at of the newest message of any kind
    status: Status | None  # newest status (birth or will)
    last_telemetry: Telemetry | None
    id_conflicts: int  # times two agents claimed this id


@dataclass(frozen=True)
class TelemetryRecord:
    device_id: str
    seq: int
    received_at: float
    telemetry: Telemetry


@dataclass(frozen=True)
class EventRecord:
    device_id: str
    seq: int
    received_at: float
    event: Event


@dataclass(frozen=True)
class CommandRecord:
    """A command sent by an operator and, once it came, its reply."""

    command_id: str
    target: str  # "dev/{device_id}" or "group/{group}"
    name: str  # the command's name, e.g. "ping"
    body_json: str  # the Command payload as sent
    sent_at: float
    replies: tuple[Reply, ...]  # one per answering device (a group command has many)


@dataclass(frozen=True)
class SequenceReport:
    """Sequence accounting of one device's telemetry since the coordinator first saw it.

    missing = expected - received, where expected = max_seq - first_seq + 1. A gap is
    pending while it may still fill through outbox replay; declare_losses() turns gaps older
    than a grace period into dropped (as many of the oldest as the device reported dropping
    and are not yet attributed) or else lost, recorded for good (a later arrival still takes
    a seq out of either).
    """

    device_id: str
    first_seq: int
    max_seq: int
    received: int
    duplicates: int
    missing: int
    lost: int  # missing for longer than the grace period, and not reported dropped
    dropped: int  # missing for longer than the grace period, and reported dropped by the device
    reported_overflow: int  # highest outbox_overflow the device reported (a lifetime count)


@dataclass(frozen=True)
class RollupRecord:
    """Downsampled telemetry of one device over one bucket (an hour by default)."""

    device_id: str
    bucket_start: float
    windows: int
    frames_processed: int
    fps_mean: float
    p95_ms_max: float
    power_w_mean: float | None
    energy_j: float | None  # sum over windows of power * duration, when power was known


@dataclass(frozen=True)
class RetentionPolicy:
    """Raw windows for raw_days, hourly rollups for rollup_days (a year by default)."""

    raw_days: float = 7.0
    rollup_days: float = 366.0
    bucket_s: float = 3600.0
    events_days: float = 90.0


@dataclass(frozen=True)
class RetentionOutcome:
    windows_rolled_up: int
    windows_deleted: int
    rollups_deleted: int
    events_deleted: int


RolloutState = Literal["running", "paused", "halted", "completed", "aborted"]
# States in which a rollout holds its group (the unique index of schema v4).
ACTIVE_ROLLOUT_STATES: tuple[RolloutState, ...] = ("running", "paused")
RolloutDeviceState = Literal[
    "pending",  # planned, no command sent yet
    "sent",  # install_bundle sent, nothing heard back
    "downloading",
    "verifying",
    "health_checking",
    "active",  # installed and running the bundle
    "failed",
    "rolled_back",
    "refused",
    "timed_out",  # no final state before deadline_at
]


@dataclass(frozen=True)
class BundleRecord:
    """A bundle archive the coordinator holds and may publish as retained chunks."""

    sha256: str  # of the archive: names its bundle/{sha256}/ topics
    kind: Literal["full", "delta"]
    manifest_sha256: str
    base_manifest_sha256: str | None  # delta only: the bundle it applies on
    model_id: str
    version: int
    size: int
    chunk_size: int
    path: str
    added_at: float
    published_at: float | None = None
    cleared_at: float | None = None
    published_bytes: int = 0


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout of a bundle to a group; spec_json holds the operator's options."""

    rollout_id: str
    group: str
    bundle_sha256: str
    manifest_sha256: str
    model_id: str
    version: int
    spec_json: str  # canary, soak_s, halt rules as text, waves, deadline_s, allow_model_change
    state: RolloutState
    phase: str  # e.g. "canary", "soak", "wave 2", "done"
    phase_started_at: float
    reason: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RolloutDeviceRecord:
    """One device of a rollout: its wave and how far its install got."""

    rollout_id: str
    device_id: str
    wave: int  # 0: canary
    state: RolloutDeviceState
    have: int  # chunks received, as the device reported
    total: int | None
    reason: str | None
    previous_manifest_sha256: str | None  # what to roll back to
    sent_at: float | None
    deadline_at: float | None
    updated_at: float


FedRoundState = Literal["running", "aggregated", "done", "failed", "aborted"]
# A running round holds its group (the unique index of schema v5).
ACTIVE_FED_ROUND_STATES: tuple[FedRoundState, ...] = ("running",)
FedUpdateStatus = Literal[
    "received",  # stored, in time, on the round's base; not yet judged
    "accepted",  # decoded and checked: it joins the aggregate
    "rejected",  # NaN, wrong shape, norm beyond the bound, not a participant (reason says)
    "stale",  # made on another base bundle than the round's
    "late",  # arrived after the deadline or after the round closed
]


@dataclass(frozen=True)
class FedRoundRecord:
    """One federated round of a group: its spec, base, progress and outcome."""

    round_id: str
    group: str
    state: FedRoundState
    phase: str  # announce, collect, aggregate, publish, done
    phase_started_at: float
    spec_json: str  # the operator's RoundSpec
    task_json: str  # the FedTask as published on fed/{round}/task
    model_id: str
    base_manifest_sha256: str
    base_bundle_sha256: str  # the archive the coordinator holds of the base
    base_version: int
    expected: tuple[str, ...]  # devices expected to report (online, on the base, sampled)
    received: int  # updates in time on the base (received, accepted or rejected)
    rejected: int
    deadline_at: float
    figures_json: str | None  # aggregation and evaluation figures, once aggregated
    result_version: int | None
    result_path: str | None  # the candidate bundle directory on the coordinator
    result_bundle_sha256: str | None  # its archive, once added to the archive store
    result_manifest_sha256: str | None
    rollout_id: str | None
    reason: str | None
    created_at: float
    updated_at: float
    closed_at: float | None  # when collection ended (deadline, all reported, abort)


@dataclass(frozen=True)
class FedUpdateRecord:
    """One device's update for a round, keyed by (round, device, base manifest)."""

    round_id: str
    device_id: str
    base_manifest_sha256: str
    status: FedUpdateStatus
    reason: str | None
    samples: int
    norm: float | None  # global L2 norm of the decoded delta, once judged
    received_at: float
    updated_at: float
    payload: str | None  # the FedUpdate JSON (received/accepted/rejected), when asked for


class Store(CatalogueStore, ABC):
    """The coordinator's persistent state; every method is one transaction.

    The catalogue's methods (models, build jobs, variants, targets, latency per device class,
    the loop's decisions) are declared in catalogue_base.py.
    """

    # Telemetry whose device clock is further than this from ours is flagged (kept, counted).
    CLOCK_TOLERANCE_S = 300.0

    @abstractmethod
    def migrate(self) -> int:
        """Bring the schema to the newest version; return that version. Idempotent."""

    @abstractmethod
    def schema_version(self) -> int:
        """The version the database is at (0 when empty)."""

    @abstractmethod
    def close(self) -> None: ...

    # -- writing -------------------------------------------------------------------------

    @abstractmethod
    def ingest(self, batch: IngestBatch, *, registration_open: bool = True) -> IngestOutcome:
        """Write one batch atomically.

        Unknown devices are registered on any message when registration_open, else their
        messages become 'unregistered' rejects. Statuses update the registry (online/offline,
        model, operating point, group when the device reports one). A status older than the
        stored one for the same boot_id never overrides it.
        """

    @abstractmethod
    def register(self, device_id: str, group: str | None = None) -> None:
        """Pre-register a device (for closed registration)."""

    @abstractmethod
    def set_group(self, device_id: str, group: str | None) -> None:
        """Assign a device to a group (None removes it); KeyError for an unknown device."""

    @abstractmethod
    def log_command(self, record: CommandRecord) -> None:
        """Remember a command sent to a device or group."""

    @abstractmethod
    def declare_losses(self, now: float, grace_s: float) -> int:
        """Record gaps that stayed open longer than grace_s as lost; return how many seqs."""

    @abstractmethod
    def apply_retention(self, now: float, policy: RetentionPolicy) -> RetentionOutcome:
        """Roll raw windows older than raw_days into buckets, delete what is past keeping."""

    # -- reading -------------------------------------------------------------------------

    @abstractmethod
    def devices(self, group: str | None = None) -> list[DeviceRecord]:
        """Every device (of one group), sorted by device id."""

    @abstractmethod
    def device(self, device_id: str) -> DeviceRecord | None: ...

    @abstractmethod
    def groups(self) -> dict[str, int]:
        """Group name -> number of devices."""

    @abstractmethod
    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRecord]:
        """Newest raw windows of a device first."""

    @abstractmethod
    def rollups(self, device_id: str, since: float = 0.0) -> list[RollupRecord]:
        """Downsampled buckets of a device, oldest first."""

    @abstractmethod
    def events(self, device_id: str | None = None, limit: int = 100) -> list[EventRecord]:
        """Newest events first, of one device or of all."""

    @abstractmethod
    def commands(self, limit: int = 100) -> list[CommandRecord]:
        """Newest commands first, with the replies received so far."""

    @abstractmethod
    def sequence_reports(self, device_id: str | None = None) -> list[SequenceReport]:
        """Sequence accounting per device, sorted by device id."""

    @abstractmethod
    def reject_counts(self) -> dict[str, int]:
        """Rejected messages since the store was created, by reason."""

    @abstractmethod
    def telemetry_count(self) -> int:
        """Raw telemetry windows stored (for ingest-rate metrics and benchmarks)."""

    # -- rollouts -------------------------------------------------------------------------

    @abstractmethod
    def add_bundle(self, record: BundleRecord) -> bool:
        """Remember a bundle archive; False (and the first record kept) when already known."""

    @abstractmethod
    def bundle(self, sha256: str) -> BundleRecord | None: ...

    @abstractmethod
    def bundles(self) -> list[BundleRecord]:
        """Every bundle, newest added first."""

    @abstractmethod
    def mark_bundle_published(self, sha256: str, at: float, published_bytes: int) -> None:
        """Record that the archive's chunks and offer are on the broker (clears cleared_at)."""

    @abstractmethod
    def mark_bundle_cleared(self, sha256: str, at: float) -> None:
        """Record that the archive's retained messages were deleted from the broker."""

    @abstractmethod
    def create_rollout(self, record: RolloutRecord, waves: list[list[str]]) -> None:
        """Store a rollout and its devices (state pending, wave = index in waves).

        Raises RolloutConflict when record is running or paused and its group already has a
        rollout running or paused, whichever coordinator created that one.
        """

    @abstractmethod
    def rollout(self, rollout_id: str) -> RolloutRecord | None: ...

    @abstractmethod
    def rollouts(
        self,
        group: str | None = None,
        states: Sequence[RolloutState] | None = None,
        limit: int = 100,
    ) -> list[RolloutRecord]:
        """Newest created first, of one group and/or in some states."""

    @abstractmethod
    def rollout_devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        """The rollout's devices by wave, then device id."""

    @abstractmethod
    def update_rollout(
        self,
        rollout_id: str,
        *,
        state: RolloutState | None = None,
        phase: str | None = None,
        phase_started_at: float | None = None,
        reason: str | None = None,
    ) -> RolloutRecord:
        """Change the given fields (None: keep), set updated_at; KeyError for an unknown id."""

    @abstractmethod
    def update_rollout_device(
        self,
        rollout_id: str,
        device_id: str,
        *,
        state: RolloutDeviceState | None = None,
        have: int | None = None,
        total: int | None = None,
        reason: str | None = None,
        sent_at: float | None = None,
        deadline_at: float | None = None,
        previous_manifest_sha256: str | None = None,
    ) -> RolloutDeviceRecord:
        """Change the given fields (None: keep), set updated_at; KeyError when not in it."""

    # -- federated rounds (the SQL is in fed.py) --------------------------------------------

    @abstractmethod
    def create_fed_round(self, record: FedRoundRecord) -> None:
        """Store a round; FedRoundConflict when its group already has a round running."""

    @abstractmethod
    def fed_round(self, round_id: str) -> FedRoundRecord | None: ...

    @abstractmethod
    def fed_rounds(
        self,
        group: str | None = None,
        states: Sequence[FedRoundState] | None = None,
        limit: int = 100,
    ) -> list[FedRoundRecord]:
        """Newest created first, of one group and/or in some states."""

    @abstractmethod
    def update_fed_round(
        self,
        round_id: str,
        *,
        only_if: FedRoundState | None = None,
        only_phase: str | None = None,
        state: FedRoundState | None = None,
        phase: str | None = None,
        phase_started_at: float | None = None,
        reason: str | None = None,
        figures_json: str | None = None,
        result_version: int | None = None,
        result_path: str | None = None,
        result_bundle_sha256: str | None = None,
        result_manifest_sha256: str | None = None,
        rollout_id: str | None = None,
        closed_at: float | None = None,
    ) -> FedRoundRecord | None:
        """Change the given fields (None: keep), set updated_at; KeyError for an unknown id.

        With only_if (only_phase), nothing changes unless the round is in that state (phase),
        and None comes back: an operator's abort and the engine's next step, or two
        coordinators stepping one round, cannot both win.
        """

    @abstractmethod
    def fed_updates(
        self,
        round_id: str,
        statuses: Sequence[FedUpdateStatus] | None = None,
        *,
        with_payload: bool = False,
    ) -> list[FedUpdateRecord]:
        """A round's updates by device id (payload None unless with_payload)."""

    @abstractmethod
    def judge_fed_update(
        self,
        round_id: str,
        device_id: str,
        base_manifest_sha256: str,
        *,
        status: FedUpdateStatus,
        reason: str | None = None,
        norm: float | None = None,
    ) -> FedUpdateRecord:
        """Record the verdict on an update (and the round's counts); KeyError if unknown."""

    @abstractmethod
    def fed_round_counts(self) -> dict[str, int]:
        """Rounds by state, every state listed (zero included)."""

    @abstractmethod
    def fed_update_counts(self) -> dict[str, int]:
        """Updates of every round by status, every status listed (zero included)."""
