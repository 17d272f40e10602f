"""The MQTT topic tree: builders, subscription filters and the parser."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from edgefleet.agent.protocol.errors import TopicError
from edgefleet.agent.protocol.ids import check_id, check_sha256

DEFAULT_ROOT = "edgefleet/v1"

DeviceKind = Literal["status", "telemetry", "results", "events", "reply", "cmd"]
TopicKind = Literal[
    "status",
    "telemetry",
    "results",
    "events",
    "reply",
    "cmd",
    "group_cmd",
    "bundle_meta",
    "bundle_chunk",
    "fed_task",
    "fed_update",
    "keys_trust",
]
DEVICE_KINDS: tuple[DeviceKind, ...] = get_args(DeviceKind)

# Decimal without leading zeros, so each chunk has exactly one topic (content addressing).
_INDEX_RE = re.compile(r"0|[1-9][0-9]{0,5}")
MAX_CHUNK_INDEX = 999_999


@dataclass(frozen=True)
class ParsedTopic:
    """What a concrete topic of the tree names."""

    kind: TopicKind
    device_id: str | None = None
    group: str | None = None
    sha256: str | None = None
    chunk_index: int | None = None
    round_id: str | None = None


def _check_kind(kind: str) -> DeviceKind:
    for known in DEVICE_KINDS:
        if kind == known:
            return known
    raise TopicError(f"unknown device topic kind {kind!r}: expected one of {list(DEVICE_KINDS)}")


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_CHUNK_INDEX:
        raise TopicError(f"invalid chunk index {index!r}: must be an int in 0..{MAX_CHUNK_INDEX}")
    return index


@dataclass(frozen=True)
class TopicTree:
    """Topics under one root; tests pass a unique root to isolate themselves."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        levels = self.root.split("/")
        if (
            not self.root
            or any(not level for level in levels)
            or any(c in self.root for c in "+#\x00")
            or self.root.startswith("$")
        ):
            raise TopicError(
                f"invalid topic root {self.root!r}: needs non-empty levels, "
                "no wildcards and no leading '$'"
            )

    # -- device <-> coordinator -------------------------------------------------------------

    def device(self, device_id: str, kind: DeviceKind) -> str:
        """Topic of one device's status, telemetry, results, events, reply or cmd."""
        return f"{self.root}/dev/{check_id(device_id)}/{_check_kind(kind)}"

    def group_cmd(self, group: str) -> str:
        """Topic on which the coordinator commands every device of a group."""
        return f"{self.root}/group/{check_id(group, 'group name')}/cmd"

    def all_devices(self, kind: DeviceKind) -> str:
        """Filter for one kind of topic of every device."""
        return f"{self.root}/dev/+/{_check_kind(kind)}"

    def all_group_cmds(self) -> str:
        """Filter for the commands of every group."""
        return f"{self.root}/group/+/cmd"

    @staticmethod
    def shared(group_name: str, topic_filter: str) -> str:
        """MQTT 5 shared subscription: the broker gives each message to one group member."""
        check_id(group_name, "shared subscription group")
        if not topic_filter or topic_filter.startswith("$share/"):
            raise TopicError(f"invalid filter for a shared subscription: {topic_filter!r}")
        return f"$share/{group_name}/{topic_filter}"

    # -- model transfer ---------------------------------------------------------------------

    def bundle_meta(self, sha256: str) -> str:
        """Retained BundleOffer of the archive with this sha256."""
        return f"{self.root}/bundle/{check_sha256(sha256)}/meta"

    def bundle_chunk(self, sha256: str, index: int) -> str:
        """Retained raw bytes of one chunk of the archive."""
        return f"{self.root}/bundle/{check_sha256(sha256)}/chunk/{_check_index(index)}"

    def bundle_chunks(self, sha256: str) -> str:
        """Filter for every chunk of one archive."""
        return f"{self.root}/bundle/{check_sha256(sha256)}/chunk/+"

    def all_bundle_meta(self) -> str:
        """Filter for every offered bundle."""
        return f"{self.root}/bundle/+/meta"

    # -- federated rounds (payload models come later; the topics are reserved) ---------------

    def fed_task(self, round_id: str) -> str:
        """Retained task of one federated round."""
        return f"{self.root}/fed/{check_id(round_id, 'round id')}/task"

    def fed_update(self, round_id: str, device_id: str) -> str:
        """One device's update for a federated round."""
        return f"{self.root}/fed/{check_id(round_id, 'round id')}/update/{check_id(device_id)}"

    def all_fed_tasks(self) -> str:
        """Filter for the tasks of every round."""
        return f"{self.root}/fed/+/task"

    def fed_updates(self, round_id: str) -> str:
        """Filter for every device's update of one round."""
        return f"{self.root}/fed/{check_id(round_id, 'round id')}/update/+"

    # -- fleet keys -------------------------------------------------------------------------

    def keys_trust(self) -> str:
        """Retained KeyTrust: every device reads it, only the coordinator writes it."""
        return f"{self.root}/keys/trust"

    # -- parsing ----------------------------------------------------------------------------

    def parse(self, topic: str) -> ParsedTopic:
        """Say what a received topic names; raise TopicError for anything outside the tree."""
        prefix = self.root + "/"
        if not isinstance(topic, str) or not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is outside the tree {self.root!r}")
        try:
            return _parse_levels(topic[len(prefix) :].split("/"))
        except TopicError as exc:
            # The id checks do not know the topic; the caller's log line needs it.
            raise TopicError(f"topic {topic!r}: {exc}", reason=exc.reason) from None


def _parse_levels(parts: list[str]) -> ParsedTopic:
    """Match the levels below the root against the tree."""
    match parts:
        case ["dev", device_id, kind] if kind in DEVICE_KINDS:
            return ParsedTopic(kind=_check_kind(kind), device_id=check_id(device_id))
        case ["group", group, "cmd"]:
            return ParsedTopic(kind="group_cmd", group=check_id(group, "group name"))
        case ["bundle", sha256, "meta"]:
            return ParsedTopic(kind="bundle_meta", sha256=check_sha256(sha256))
        case ["bundle", sha256, "chunk", index]:
            if _INDEX_RE.fullmatch(index) is None:
                raise TopicError(f"invalid chunk index {index!r}")
            return ParsedTopic(
                kind="bundle_chunk", sha256=check_sha256(sha256), chunk_index=int(index)
            )
        case ["fed", round_id, "task"]:
            return ParsedTopic(kind="fed_task", round_id=check_id(round_id, "round id"))
        case ["fed", round_id, "update", device_id]:
            return ParsedTopic(
                kind="fed_update",
                round_id=check_id(round_id, "round id"),
                device_id=check_id(device_id),
            )
        case ["keys", "trust"]:
            return ParsedTopic(kind="keys_trust")
    raise TopicError(
        "not a topic of the tree (expected dev/{device}/{status|telemetry|results|events|reply|cmd}"
        ", group/{group}/cmd, bundle/{sha256}/meta, bundle/{sha256}/chunk/{n}"
        ", fed/{round}/task, fed/{round}/update/{device} or keys/trust)"
    )
