"""Bytes <-> payload models, with size limits; decode never raises."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, TypeAlias, TypeVar, overload

from pydantic import ValidationError

from edgefleet.agent.protocol.base import SCHEMA_VERSION, SUPPORTED_VERSIONS, Payload, PayloadKind
from edgefleet.agent.protocol.commands import CORRELATION_ID_PATTERN, Command, Reply
from edgefleet.agent.protocol.errors import PayloadTooLargeError, ProtocolError, TopicError
from edgefleet.agent.protocol.fed import FedTask, FedUpdate
from edgefleet.agent.protocol.keys import KeyTrust
from edgefleet.agent.protocol.messages import Event, Result, Status, Telemetry
from edgefleet.agent.protocol.topics import TopicKind, TopicTree
from edgefleet.agent.protocol.transfer import BundleOffer

KiB = 1024
MiB = 1024 * KiB

# Checked on both sides before any parsing, so a hostile payload costs at most this much work.
SIZE_LIMITS: Final[Mapping[PayloadKind, int]] = MappingProxyType(
    {
        "status": 4 * KiB,
        "telemetry": 16 * KiB,
        # A detector's boxes: 50 objects at every bound fit (messages.MAX_OBJECTS).
        "results": 16 * KiB,
        "events": 16 * KiB,
        "cmd": 16 * KiB,
        "reply": 1 * MiB,  # a snapshot's JPEG travels base64 in the reply
        "bundle_meta": 64 * KiB,
        "keys_trust": 64 * KiB,
        "fed_task": 16 * KiB,
        # Two 10-class heads on 4096-wide features in fp32, base64: ~440 KB; under the
        # broker's 1 MiB message limit (docs/security.md).
        "fed_update": 1 * MiB,
    }
)

Message: TypeAlias = (
    Status
    | Telemetry
    | Result
    | Event
    | Command
    | Reply
    | BundleOffer
    | KeyTrust
    | FedTask
    | FedUpdate
)

MODELS: Final[Mapping[PayloadKind, type[Message]]] = MappingProxyType(
    {
        model.KIND: model
        for model in (
            Status,
            Telemetry,
            Result,
            Event,
            Command,
            Reply,
            BundleOffer,
            KeyTrust,
            FedTask,
            FedUpdate,
        )
    }
)

# Which payload a topic of the tree carries; chunks are raw bytes.
TOPIC_PAYLOADS: Final[Mapping[TopicKind, PayloadKind]] = MappingProxyType(
    {
        "status": "status",
        "telemetry": "telemetry",
        "results": "results",
        "events": "events",
        "reply": "reply",
        "cmd": "cmd",
        "group_cmd": "cmd",
        "bundle_meta": "bundle_meta",
        "keys_trust": "keys_trust",
        "fed_task": "fed_task",
        "fed_update": "fed_update",
    }
)

_T = TypeVar("_T")
_M = TypeVar("_M", bound=Payload)

# Either the validated message or why it was rejected: check with isinstance(x, ProtocolError).
Decoded: TypeAlias = _T | ProtocolError

_FROM_DEVICE = (Status, Telemetry, Result, Event, Reply, FedUpdate)
_MAX_REPORTED_ERRORS = 5
_FAST_PREFIX = f'{{"v":{SCHEMA_VERSION},'
_CORRELATION_ID = re.compile(CORRELATION_ID_PATTERN[1:-1])


def encode(msg: Payload) -> bytes:
    """Compact UTF-8 JSON of msg; raise PayloadTooLargeError above its kind's limit."""
    data = msg.model_dump_json().encode("utf-8")
    limit = SIZE_LIMITS[msg.KIND]
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"{msg.KIND} payload is {len(data)} bytes, over the {limit}-byte limit",
            size=len(data),
            limit=limit,
        )
    return data


@overload
def decode(
    model: type[_M], payload: bytes | bytearray, *, topic: str | None = None
) -> Decoded[_M]: ...
@overload
def decode(
    model: PayloadKind, payload: bytes | bytearray, *, topic: str | None = None
) -> Decoded[Message]: ...
def decode(
    model: type[Payload] | PayloadKind, payload: bytes | bytearray, *, topic: str | None = None
) -> Decoded[Payload]:
    """Validate payload as model (or the model of a kind); never raises."""
    kind = str(getattr(model, "KIND", model))
    where = f"{kind} on {topic}" if topic else kind
    try:
        return _decode(model, payload, topic, kind, where)
    except Exception as exc:  # a bug here must not kill a network loop
        return ProtocolError(
            "invalid", f"{where}: unexpected {type(exc).__name__}: {exc}", kind, topic
        )


def _decode(
    model: type[Payload] | PayloadKind,
    payload: bytes | bytearray,
    topic: str | None,
    kind: str,
    where: str,
) -> Decoded[Payload]:
    """Body of decode; may raise only on bugs."""
    if isinstance(model, str):
        found = MODELS.get(model)
        if found is None:
            return ProtocolError(
                "unknown_topic", f"no payload model for kind {model!r}", kind, topic
            )
        model = found
    limit = SIZE_LIMITS[model.KIND]
    if len(payload) > limit:
        return ProtocolError(
            "too_large",
            f"{where}: payload is {len(payload)} bytes, over the {limit}-byte limit",
            kind,
            topic,
        )
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        return ProtocolError("not_utf8", f"{where}: payload is not UTF-8 ({exc})", kind, topic)
    # Fast path for what encode() writes (v first, compact): one parse, by pydantic, which
    # refuses NaN/Infinity as the slow path does. Anything else, or anything it refuses, goes
    # the slow way, which says precisely what is wrong.
    if text.startswith(_FAST_PREFIX):
        try:
            return model.model_validate_json(text, strict=True)
        except ValidationError:
            pass
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return ProtocolError("not_json", f"{where}: payload is not JSON ({exc})", kind, topic)
    if not isinstance(obj, dict):
        return ProtocolError(
            "invalid", f"{where}: expected a JSON object, got {_json_type(obj)}", kind, topic
        )
    if "v" not in obj:
        return ProtocolError("invalid", f"{where}: field 'v': Field required", kind, topic)
    version = obj["v"]
    # type() rather than isinstance: JSON true must not pass for version 1.
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        return ProtocolError(
            "unknown_version",
            f"{where}: unknown schema version v={json.dumps(version)[:40]}, "
            f"this side reads v in {sorted(SUPPORTED_VERSIONS)}",
            kind,
            topic,
        )
    try:
        # strict: "5" is not an int on the wire; a sender that quotes numbers has a bug.
        return model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        return ProtocolError("invalid", f"{where}: {_describe(exc)}", kind, topic)


def decode_topic(tree: TopicTree, topic: str, payload: bytes | bytearray) -> Decoded[Message]:
    """Pick the model from the topic, decode, and check ids in payload and topic agree."""
    try:
        parsed = tree.parse(topic)
    except TopicError as exc:
        return ProtocolError("unknown_topic", str(exc), None, topic)
    except Exception as exc:  # never raise into a network loop
        return ProtocolError("unknown_topic", f"topic {topic!r}: {exc}", None, topic)
    kind = TOPIC_PAYLOADS.get(parsed.kind)
    if kind is None:
        return ProtocolError(
            "unknown_topic",
            f"topic {topic!r} ({parsed.kind}) carries no JSON payload model",
            None,
            topic,
        )
    msg = decode(kind, payload, topic=topic)
    if isinstance(msg, ProtocolError):
        return msg
    # ACLs bind a device's credentials to its own topics, so the topic is authoritative.
    if isinstance(msg, _FROM_DEVICE) and msg.device_id != parsed.device_id:
        return ProtocolError(
            "invalid",
            f"{kind} on {topic}: field 'device_id': {msg.device_id!r} "
            f"does not match the topic's device {parsed.device_id!r}",
            kind,
            topic,
        )
    if isinstance(msg, BundleOffer) and msg.sha256 != parsed.sha256:
        return ProtocolError(
            "invalid",
            f"{kind} on {topic}: field 'sha256': {msg.sha256!r} does not match the topic's",
            kind,
            topic,
        )
    if isinstance(msg, (FedTask, FedUpdate)) and msg.round_id != parsed.round_id:
        return ProtocolError(
            "invalid",
            f"{kind} on {topic}: field 'round_id': {msg.round_id!r} does not match the "
            f"topic's round {parsed.round_id!r}",
            kind,
            topic,
        )
    return msg


# "id": "<printable ASCII>" near the start of an oversized command (encoders put it second).
_ID_NEAR_START = re.compile(rb'"id"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{1,64})"')
_PEEK_BYTES = 4 * KiB


def peek_command_id(payload: bytes | bytearray) -> str | None:
    """Best-effort id of a command that failed to decode, so the device can still reply.

    An oversized payload is not parsed (that is what the size limit prevents): its id is
    looked for in its first 4 KiB only, as a plain `"id": "..."` pair.
    """
    try:
        if len(payload) > SIZE_LIMITS["cmd"]:
            found = _ID_NEAR_START.search(bytes(payload[:_PEEK_BYTES]))
            return found.group(1).decode("ascii") if found else None
        obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant)
        ident = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(ident, str) and _CORRELATION_ID.fullmatch(ident):
            return ident
    except Exception:  # best effort by design
        return None
    return None


def _reject_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which Python's json accepts but JSON does not have."""
    raise ValueError(f"{name} is not valid JSON")


def _json_type(obj: object) -> str:
    """The JSON name of a parsed value's type."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, (int, float)):
        return "a number"
    if isinstance(obj, str):
        return "a string"
    return "an array"


def _describe(exc: ValidationError) -> str:
    """One line naming each wrong field, e.g. "field 'seq': Input should be ..."."""
    parts = []
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    for error in errors[:_MAX_REPORTED_ERRORS]:
        text = str(error["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(part) for part in error["loc"])
        parts.append(f"field {loc!r}: {text}" if loc else text)
    if len(errors) > _MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_REPORTED_ERRORS} more errors")
    return "; ".join(parts)
