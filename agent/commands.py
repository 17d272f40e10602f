"""Coordinator commands: decode, check expiry, dispatch, and always answer with a Reply.

A malformed or unknown command is answered with ok=false naming the problem, under its
correlation id when that can be read and under `UNCORRELATED_ID` when not; nothing here
raises into the agent's loop. A command whose id was already answered is not run again: the
reply it got is sent again from memory (`ReplyMemory`). A command that arrives retained is
never run nor answered (`ignore_retained`): commands are never retained, so it is a stale
message left on the broker, or a forgery, that would otherwise run again at every reconnect.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from typing import Protocol

from pydantic import JsonValue

from edgefleet.agent.protocol import (
    UNCORRELATED_ID,
    Command,
    InstallBundle,
    PayloadTooLargeError,
    Ping,
    ProtocolError,
    ReloadBundle,
    Reply,
    RollbackBundle,
    SetOperatingPoint,
    SetTelemetryInterval,
    SetThresholds,
    Snapshot,
    UnpinOperatingPoint,
    decode,
    encode,
    peek_command_id,
)
from edgefleet.agent.reply_memory import ReplyMemory

log = logging.getLogger(__name__)


class CommandTarget(Protocol):
    """What the running agent exposes to commands."""

    def set_operating_point(self, index: int, pin: bool) -> dict[str, JsonValue]:
        """Switch (and optionally pin) an operating point; raises ValueError if invalid."""

    def unpin_operating_point(self) -> dict[str, JsonValue]:
        """Let the governor move again."""

    def set_thresholds(self, thresholds: list[float | None]) -> dict[str, JsonValue]:
        """Override exit thresholds; raises ValueError on a wrong count."""

    def set_telemetry_interval(self, seconds: float) -> dict[str, JsonValue]:
        """Change the telemetry window."""

    def snapshot_jpeg(self, quality: int) -> bytes:
        """The current frame as JPEG; raises LookupError when there is none."""

    def reload_bundle(self) -> dict[str, JsonValue]:
        """Verify and load the installed bundle again; keeps the old one on failure."""

    def install_bundle(self, cmd: InstallBundle) -> dict[str, JsonValue]:
        """Accept a pushed bundle (its progress comes as events) or raise naming why not."""

    def rollback_bundle(self, cmd: RollbackBundle) -> dict[str, JsonValue]:
        """Go back to the previous bundle if the named one runs."""


class CommandHandler:
    """Turns a raw command payload into a Reply, calling the target."""

    def __init__(self, device_id: str, target: CommandTarget) -> None:
        self.device_id = device_id
        self.target = target
        self.rejected = 0
        self.repeated = 0  # commands whose id was already answered: replied from memory
        self.retained = 0  # retained commands ignored
        self.memory = ReplyMemory()
        self._retained_seen: dict[str, str] = {}  # topic -> digest of the last one reported

    def _reply(
        self,
        cid: str,
        ok: bool,
        error: str | None = None,
        result: dict[str, JsonValue] | None = None,
    ) -> Reply:
        return Reply(
            id=cid, device_id=self.device_id, ts=time.time(), ok=ok, error=error, result=result
        )

    def handle(self, topic: str, payload: bytes) -> Reply:
        """The reply to send; ok=false naming the problem for anything that did not work."""
        return self.answer(topic, payload)[0]

    def answer(self, topic: str, payload: bytes) -> tuple[Reply, bytes]:
        """The reply and its encoded bytes (encoded once: a snapshot's are ~1 MiB)."""
        decoded = decode(Command, payload, topic=topic)
        if isinstance(decoded, Command) and decoded.id in self.memory:
            return self._repeat(decoded.id, topic)
        reply, data = self._answer(topic, payload, decoded)
        if isinstance(decoded, Command):  # one that could not be decoded ran nothing
            self.memory.remember(decoded.id, data)
        return reply, data

    def ignore_retained(self, topic: str, payload: bytes) -> str | None:
        """Count a command that arrived retained; a line to report when it is a new one.

        The broker keeps at most one retained message per topic and sends it again at every
        subscription, so only a payload other than the last one reported on its topic is
        news; the memory is one digest per command topic.
        """
        self.retained += 1
        cid = peek_command_id(payload) or UNCORRELATED_ID
        digest = hashlib.sha256(payload).hexdigest()
        if self._retained_seen.get(topic) == digest:
            log.debug("ignored retained command %s on %s again", cid, topic)
            return None
        self._retained_seen[topic] = digest
        line = (
            f"ignored retained command {cid} on {topic}: commands are never retained "
            "(clear it with an empty retained message on that topic)"
        )
        log.warning("%s", line)
        return line

    def _repeat(self, cid: str, topic: str) -> tuple[Reply, bytes]:
        """The reply already sent for cid; a refusal when its bytes were let go."""
        self.repeated += 1
        data = self.memory.get(cid)
        if data is not None:
            log.info("command %s on %s repeated: sending its reply again", cid, topic)
            reply = decode(Reply, data)
            if isinstance(reply, Reply):
                return reply, data
        log.info("command %s on %s repeated: its reply is no longer kept", cid, topic)
        refusal = self._reply(cid, False, "command id already answered; not run again")
        return refusal, encode(refusal)

    def _answer(
        self, topic: str, payload: bytes, decoded: Command | ProtocolError
    ) -> tuple[Reply, bytes]:
        reply, cmd = self._handle(topic, payload, decoded)
        try:
            return reply, encode(reply)
        except PayloadTooLargeError as exc:
            # Only a carried-out command's result can be this large (errors are <= 1000
            # characters): a snapshot of a large frame at high quality. Say so instead.
            name = cmd.command.name if cmd is not None else "reply"
            log.warning("command %s (%s): reply too large: %s", reply.id, name, exc)
            snapshot = cmd is not None and isinstance(cmd.command, Snapshot)
            hint = " (ask for a lower quality)" if snapshot else ""
            refusal = self._reply(reply.id, False, f"{name}: {exc}{hint}"[:1000])
            return refusal, encode(refusal)

    def _handle(
        self, topic: str, payload: bytes, decoded: Command | ProtocolError
    ) -> tuple[Reply, Command | None]:
        """The reply, and the command when one could be decoded."""
        if isinstance(decoded, ProtocolError):
            self.rejected += 1
            cid = peek_command_id(payload) or UNCORRELATED_ID
            log.warning("rejected command %s on %s: %s", cid, topic, decoded)
            return self._reply(cid, False, str(decoded)[:1000]), None
        cmd = decoded
        if cmd.is_expired(time.time()):
            return self._reply(cmd.id, False, f"command expired at {cmd.expires_at}"), cmd
        try:
            result = self._dispatch(cmd)
        except Exception as exc:  # any failure, OpenCV's or onnxruntime's too, is a reply
            log.warning("command %s (%s) failed: %s", cmd.id, cmd.command.name, exc)
            return self._reply(cmd.id, False, f"{cmd.command.name}: {exc}"[:1000]), cmd
        log.info("command %s (%s) done", cmd.id, cmd.command.name)
        return self._reply(cmd.id, True, result=result), cmd

    def _dispatch(self, cmd: Command) -> dict[str, JsonValue]:
        body = cmd.command
        t = self.target
        if isinstance(body, Ping):
            return {"pong": time.time(), "issued": cmd.ts}
        if isinstance(body, SetOperatingPoint):
            return t.set_operating_point(body.index, body.pin)
        if isinstance(body, UnpinOperatingPoint):
            return t.unpin_operating_point()
        if isinstance(body, SetThresholds):
            return t.set_thresholds(list(body.thresholds))
        if isinstance(body, SetTelemetryInterval):
            return t.set_telemetry_interval(body.seconds)
        if isinstance(body, Snapshot):
            jpeg = t.snapshot_jpeg(body.quality)
            return {"jpeg_b64": base64.b64encode(jpeg).decode(), "bytes": len(jpeg)}
        if isinstance(body, ReloadBundle):
            return t.reload_bundle()
        if isinstance(body, InstallBundle):
            return t.install_bundle(body)
        if isinstance(body, RollbackBundle):
            return t.rollback_bundle(body)
        raise ValueError(f"unknown command {body.name!r}")  # pragma: no cover - union is closed
