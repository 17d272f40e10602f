"""The coordinator's persistent store: one interface, SQLite and PostgreSQL behind it.

Decisions other code relies on (the reasons are next to the code, mostly in logic.py and
ingest.py, the one ingest algorithm every backend runs):
- Registration: with registration closed, messages of unknown devices (statuses, telemetry,
  events, replies) become 'unregistered' rejects with topic dev/{device}/{kind}, relative to
  the topic root the store does not know. Rejects never register or touch a device.
- first_seen/last_seen: earliest/latest received_at of any accepted message (duplicates and
  ignored statuses included). A pre-registered device that never spoke reports its
  registration time for both.
- Statuses apply in arrival order, except (a) same boot_id with an older ts, and (b) an
  offline status of another boot_id with an older ts than the stored one (the late Will of a
  replaced process). A birth of an already replaced boot_id is an id conflict and still
  applies. IngestOutcome.id_conflicts names each device once per batch; the device's
  id_conflicts counter counts every conflicting birth.
- clock_skewed counts newly inserted windows only; outbox replays count too (late, not wrong).
- declare_losses: a gap in a device's raw windows is lost once the window just above it was
  received more than grace_s before now. Lost seqs are kept as ranges; a late arrival takes
  its seq out of them. Only devices with unexplained missing seqs are scanned.
- Dedupe horizon: duplicates are recognised while the raw row exists. A window redelivered
  after retention deleted its row (older than raw_days) is stored and counted again, and gaps
  below the raw horizon are not re-examined once rolled up.
- Retention buckets by received_at (the coordinator's clock). windows_rolled_up counts the
  deleted windows added to rollups; windows whose bucket is already older than rollup_days
  are deleted without rollup, so it can be below windows_deleted.
- Orders: telemetry(id) newest seq first; events(id) newest seq first, events() newest
  received_at first; commands() newest sent_at first, replies sorted by device id; a reply
  to an unlogged command is stored and shows up once that command is logged. log_command
  with a known id keeps the first record; a second reply per (command, device) is dropped.
- sequence_reports lists only devices that sent telemetry; reject_counts lists every known
  reason, zero included.
"""

from __future__ import annotations

import re

from edgefleet.server.fleet.store.base import (
    ACTIVE_FED_ROUND_STATES,
    ACTIVE_ROLLOUT_STATES,
    BundleRecord,
    CommandRecord,
    DeviceRecord,
    EventIn,
    EventRecord,
    FedIgnored,
    FedRoundRecord,
    FedRoundState,
    FedUpdateIn,
    FedUpdateRecord,
    FedUpdateStatus,
    IngestBatch,
    IngestOutcome,
    Reject,
    RejectReason,
    ReplyIn,
    RetentionOutcome,
    RetentionPolicy,
    RolloutDeviceRecord,
    RolloutDeviceState,
    RolloutRecord,
    RolloutState,
    RollupRecord,
    SequenceReport,
    StatusIn,
    Store,
    TelemetryIn,
    TelemetryRecord,
)
from edgefleet.server.fleet.store.catalogue_base import (
    OPEN_JOB_STATES,
    BuildJobRecord,
    CatalogueStore,
    DecisionAction,
    DecisionRecord,
    GroupTarget,
    JobOrigin,
    JobState,
    LatencyRecord,
    ModelRecord,
    VariantRecord,
)
from edgefleet.server.fleet.store.errors import FedRoundConflict, JobConflict, RolloutConflict
from edgefleet.server.fleet.store.postgres import PostgresStore
from edgefleet.server.fleet.store.sqlite import SqliteStore

__all__ = [
    "ACTIVE_FED_ROUND_STATES",
    "ACTIVE_ROLLOUT_STATES",
    "OPEN_JOB_STATES",
    "BuildJobRecord",
    "BundleRecord",
    "CatalogueStore",
    "CommandRecord",
    "DecisionAction",
    "DecisionRecord",
    "DeviceRecord",
    "EventIn",
    "EventRecord",
    "FedIgnored",
    "FedRoundConflict",
    "FedRoundRecord",
    "FedRoundState",
    "FedUpdateIn",
    "FedUpdateRecord",
    "FedUpdateStatus",
    "GroupTarget",
    "IngestBatch",
    "IngestOutcome",
    "JobConflict",
    "JobOrigin",
    "JobState",
    "LatencyRecord",
    "ModelRecord",
    "PostgresStore",
    "Reject",
    "RejectReason",
    "ReplyIn",
    "RetentionOutcome",
    "RetentionPolicy",
    "RolloutConflict",
    "RolloutDeviceRecord",
    "RolloutDeviceState",
    "RolloutRecord",
    "RolloutState",
    "RollupRecord",
    "SequenceReport",
    "SqliteStore",
    "StatusIn",
    "Store",
    "TelemetryIn",
    "TelemetryRecord",
    "VariantRecord",
    "open_store",
    "sqlite_path",
]

# "host=db dbname=fleet": libpq's keyword form starts with a keyword and '='.
_LIBPQ_KEYWORDS = re.compile(r"^\s*[A-Za-z_]+\s*=")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def sqlite_path(url: str) -> str | None:
    """The file a SQLite store URL (or plain path) names; None for a PostgreSQL store."""
    if url.startswith(("postgresql://", "postgres://")) or (
        _LIBPQ_KEYWORDS.match(url) and not _URL_SCHEME.match(url)
    ):
        return None
    if url.startswith("sqlite://"):
        return url[len("sqlite://") :]
    return url


def open_store(url: str) -> Store:
    """Open the store a URL names and bring its schema up to date.

    - sqlite:///var/lib/edgefleet/fleet.db: a SQLite file; the part after "sqlite://" is the
      path, so three slashes make it absolute and sqlite://fleet.db is relative;
    - a plain path such as fleet.db or /var/lib/edgefleet/fleet.db: a SQLite file;
    - postgresql://... or postgres://...: PostgreSQL, as libpq reads the URL;
    - host=... dbname=...: PostgreSQL, libpq's keyword form.
    """
    if url.startswith(("postgresql://", "postgres://")) or (
        _LIBPQ_KEYWORDS.match(url) and not _URL_SCHEME.match(url)
    ):
        store: Store = PostgresStore(url)
    elif url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path:
            raise ValueError(f"no path in store URL {url!r}: use sqlite:///path/to/fleet.db")
        store = SqliteStore(path)
    elif _URL_SCHEME.match(url):
        raise ValueError(
            f"unsupported store URL {url!r}: expected sqlite://, postgresql://, postgres://, "
            "a libpq keyword string or a file path"
        )
    else:
        store = SqliteStore(url)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store
