"""Waiting on a condition: poll it until it holds, or fail naming what never happened.

Tests, benchmarks and the demo wait on what they need to see (a telemetry window stored, a
process gone, a file written), never for a fixed time, so they neither flake on a slow
machine nor waste time on a fast one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_POLL_S = 0.1


class WaitTimeout(TimeoutError):
    """A condition did not hold in time; the message says which, and what was seen."""


def poll_until(pred: Callable[[], bool], timeout: float, poll: float = DEFAULT_POLL_S) -> bool:
    """Poll pred until it holds (True) or timeout seconds pass (False, after a last look)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        # Never sleep past the deadline: the last look below comes right at it.
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
    return pred()


def wait_until(
    pred: Callable[[], bool],
    timeout: float,
    what: str,
    poll: float = DEFAULT_POLL_S,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll pred until it holds; if it never does, raise WaitTimeout naming `what` and detail()."""
    if poll_until(pred, timeout, poll):
        return
    message = f"timed out after {timeout:g} s waiting for {what}"
    if detail is not None:
        message += f"\n{detail()}"
    raise WaitTimeout(message)
