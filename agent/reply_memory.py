"""The agent's memory of the commands it answered: a repeated id gets the same reply again.

QoS 1 may deliver a command twice, and a coordinator may resend one whose reply it missed;
neither may run it twice (a second `set_operating_point` is an extra event, a second
snapshot an extra frame off the device). docs/protocol.md ("Correlation ids") promises the
reply from memory. The memory is bounded twice: the last `max_ids` ids are remembered, and
their reply bytes only while they fit in `max_bytes` together (a snapshot's reply is up to
1 MiB). An id whose bytes were let go is still known: it is refused, never run again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

MAX_IDS: Final = 256
MAX_BYTES: Final = 4 * 1024 * 1024


class ReplyMemory:
    """Encoded replies by command id, oldest forgotten first; bounded in ids and in bytes."""

    def __init__(self, max_ids: int = MAX_IDS, max_bytes: int = MAX_BYTES) -> None:
        if max_ids < 1 or max_bytes < 0:
            raise ValueError(f"reply memory bounds must be >= 1 and >= 0: {max_ids}, {max_bytes}")
        self.max_ids = max_ids
        self.max_bytes = max_bytes
        self._replies: OrderedDict[str, bytes | None] = OrderedDict()
        self._bytes = 0

    def __contains__(self, cid: object) -> bool:
        return cid in self._replies

    def __len__(self) -> int:
        return len(self._replies)

    @property
    def size_bytes(self) -> int:
        """Reply bytes held."""
        return self._bytes

    def get(self, cid: str) -> bytes | None:
        """The reply sent for cid, or None when cid is unknown or its bytes were let go."""
        return self._replies.get(cid)

    def remember(self, cid: str, reply: bytes) -> None:
        """Keep the reply to cid; the oldest ids, then the oldest bytes, make room."""
        old = self._replies.pop(cid, None)
        self._bytes -= len(old or b"")
        self._replies[cid] = reply
        self._bytes += len(reply)
        while len(self._replies) > self.max_ids:
            _, dropped = self._replies.popitem(last=False)
            self._bytes -= len(dropped or b"")
        if self._bytes > self.max_bytes:
            for key, held in list(self._replies.items()):
                if self._bytes <= self.max_bytes:
                    break
                if held is not None:
                    self._replies[key] = None  # the id stays known: it is never run again
                    self._bytes -= len(held)
