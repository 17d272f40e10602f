"""The command handler answers every payload, whatever fails behind it."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from pydantic import JsonValue

from edgefleet.agent.commands import CommandHandler
from edgefleet.agent.protocol import UNCORRELATED_ID, Command, Ping, Snapshot, encode
from edgefleet.agent.protocol.commands import SetOperatingPoint, SetThresholds
from edgefleet.agent.reply_memory import ReplyMemory


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


class CountingTarget(Target):
    """Counts how often each command really ran."""

    def __init__(self, frame: np.ndarray) -> None:
        super().__init__(frame)
        self.moves = 0

    def set_operating_point(self, index: int, pin: bool) -> dict[str, JsonValue]:
        self.moves += 1
        return {"index": index, "run": self.moves}


def test_a_repeated_id_gets_the_same_reply_and_does_not_run_again() -> None:
    target = CountingTarget(np.zeros((8, 8, 3), np.uint8))
    handler = CommandHandler("pi-1", target)
    payload = _cmd("c-move", SetOperatingPoint(index=1))
    first, first_bytes = handler.answer("t/cmd", payload)
    again, again_bytes = handler.answer("t/cmd", payload)
    assert target.moves == 1 and handler.repeated == 1
    assert again_bytes == first_bytes and again == first and first.ok
    # Another command under the same id is not run either: the id was answered.
    other, _ = handler.answer("t/cmd", _cmd("c-move", SetOperatingPoint(index=2)))
    assert target.moves == 1 and other == first
    # A new id runs.
    assert handler.handle("t/cmd", _cmd("c-next", SetOperatingPoint(index=2))).ok
    assert target.moves == 2


def test_an_undecodable_command_is_not_remembered(handler: CommandHandler) -> None:
    bad = b'{"v": 1, "id": "c-x", "ts": "yesterday", "command": {"name": "ping"}}'
    assert not handler.handle("t/cmd", bad).ok
    # The id was refused, not answered: the real command under it still runs.
    assert handler.handle("t/cmd", _cmd("c-x", Ping())).ok and handler.repeated == 0


def test_an_id_whose_reply_was_let_go_is_refused_not_run_again() -> None:
    target = CountingTarget(np.zeros((8, 8, 3), np.uint8))
    handler = CommandHandler("pi-1", target)
    handler.memory = ReplyMemory(max_ids=4, max_bytes=0)  # ids kept, reply bytes never
    payload = _cmd("c-move", SetOperatingPoint(index=1))
    assert handler.handle("t/cmd", payload).ok
    again = handler.handle("t/cmd", payload)
    assert not again.ok and "already answered" in (again.error or "") and target.moves == 1


def test_reply_memory_is_bounded_in_ids_and_bytes() -> None:
    memory = ReplyMemory(max_ids=3, max_bytes=10)
    for i in range(5):
        memory.remember(f"c{i}", b"abcd")
    assert len(memory) == 3 and "c1" not in memory and "c2" in memory
    # 3 x 4 bytes is over 10: the oldest bytes go first, the id stays known.
    assert memory.get("c2") is None and memory.get("c4") == b"abcd"
    assert memory.size_bytes == 8


def test_a_retained_command_is_reported_once_per_payload(handler: CommandHandler) -> None:
    stale = _cmd("c-stale", Ping())
    first = handler.ignore_retained("t/dev/pi-1/cmd", stale)
    assert first is not None and "c-stale" in first and "t/dev/pi-1/cmd" in first
    # The broker sends it again at every subscription: counted, not reported again.
    assert handler.ignore_retained("t/dev/pi-1/cmd", stale) is None
    assert handler.ignore_retained("t/dev/pi-1/cmd", _cmd("c-other", Ping())) is not None
    assert handler.retained == 3 and handler.repeated == 0
