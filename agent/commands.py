"""Coordinator commands: decode, check expiry, dispatch, and always answer with a Reply.

A malformed or unknown command is answered with ok=false naming the problem, under its
correlation id when that can be read and under `UNCORRELATED_ID` when not; nothing here
raises into the agent's loop.
"""

from __future__ import annotations

import base64
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
    SetOperatingPoint,
    SetTelemetryInterval,
    SetThresholds,
    Snapshot,
    UnpinOperatingPoint,
    decode,
    encode,
    peek_command_id,
)

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


class CommandHandler:
    """Turns a raw command payload into a Reply, calling the target."""

    def __init__(self, device_id: str, target: CommandTarget) -> None:
        self.device_id = device_id
        self.target = target
        self.rejected = 0

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
        reply, cmd = self._handle(topic, payload)
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

    def _handle(self, topic: str, payload: bytes) -> tuple[Reply, Command | None]:
        """The reply, and the command when one could be decoded."""
        decoded = decode(Command, payload, topic=topic)
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
            raise RuntimeError("bundle transfer is not supported by this agent version yet")
        raise ValueError(f"unknown command {body.name!r}")  # pragma: no cover - union is closed
