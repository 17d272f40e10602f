"""The command handler answers every payload, whatever fails behind it."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from pydantic import JsonValue

from edgefleet.agent.commands import CommandHandler
from edgefleet.agent.protocol import UNCORRELATED_ID, Command, Ping, Snapshot, encode
from edgefleet.agent.protocol.commands import SetThresholds


class Target:
    """A stand-in for the running agent: a real JPEG encoder, failures on demand."""

    def __init__(self, frame: np.ndarray) -> None:
        self.frame = frame

    def set_operating_point(self, index: int, pin: bool) -> dict[str, JsonValue]:
        return {"index": index}

    def unpin_operating_point(self) -> dict[str, JsonValue]:
        return {}

    def set_thresholds(self, thresholds: list[float | None]) -> dict[str, JsonValue]:
        cv2.resize(np.zeros((0, 0), np.uint8), (4, 4))  # raises cv2.error, not a ValueError
        return {}

    def set_telemetry_interval(self, seconds: float) -> dict[str, JsonValue]:
        return {}

    def snapshot_jpeg(self, quality: int) -> bytes:
        ok, buf = cv2.imencode(".jpg", self.frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return bytes(buf)

    def reload_bundle(self) -> dict[str, JsonValue]:
        return {}


@pytest.fixture
def handler() -> CommandHandler:
    noise = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    return CommandHandler("pi-1", Target(noise))


def _cmd(cid: str, body: object) -> bytes:
    return encode(Command(id=cid, ts=time.time(), command=body))  # type: ignore[arg-type]


def test_unreadable_payload_is_refused_under_the_uncorrelated_id(handler: CommandHandler) -> None:
    reply = handler.handle("t/cmd", b"\x00not json")
    assert reply.id == UNCORRELATED_ID and not reply.ok and "not" in (reply.error or "")
    assert handler.rejected == 1


def test_any_exception_behind_a_command_is_a_reply(handler: CommandHandler) -> None:
    reply = handler.handle("t/cmd", _cmd("c-th", SetThresholds(thresholds=[0.5])))
    assert reply.id == "c-th" and not reply.ok and "set_thresholds" in (reply.error or "")


def test_a_snapshot_too_large_to_send_is_refused_with_a_hint(handler: CommandHandler) -> None:
    # 1080p noise at quality 100 is several MiB of JPEG: over the 1 MiB reply limit.
    reply = handler.handle("t/cmd", _cmd("c-big", Snapshot(quality=100)))
    assert not reply.ok and "lower quality" in (reply.error or "")
    encode(reply)  # the refusal itself fits
    small = handler.handle("t/cmd", _cmd("c-ok", Ping()))
    assert small.ok
