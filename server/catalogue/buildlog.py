"""A build's log: the optimizer's progress lines, its error line, the log's tail."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")
# How the CLI reports a mistake it caught: `edgefleet optimize: error: <one line>`.
_ERROR = re.compile(r"^edgefleet \w+: error: (.*)$")
# The last line of a traceback: [module.path.]ClassName: message.
_EXCEPTION = re.compile(r"^((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*(?:Error|Exception|Interrupt)): (.*)$")
# The optimizer's own errors say everything in their message (optimize/errors.py).
_OPTIMIZER_ERRORS = "edgefleet.server.optimize.errors."
_TAIL_BYTES = 64 << 10


@dataclass
class Progress:
    """What the optimizer said so far: its newest [step/steps] line and its last words."""

    step: int = 0
    steps: int = 0
    line: str = ""
    error: str | None = None
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    changed: bool = False

    def feed(self, text: str) -> None:
        """Take one line of the optimizer's output."""
        text = text.rstrip()
        if not text.strip():
            return
        self.recent.append(text)
        if m := _STEP.match(text):
            self.step, self.steps, self.line = int(m[1]), int(m[2]), text
            self.changed = True
        elif m := _ERROR.match(text):
            self.error = m[1].strip()

    def failure(self, returncode: int) -> str:
        """Why the build failed, in one line: the optimizer's error line, else its last line
        (an exception's), else its exit status."""
        if self.error:
            return self.error
        for text in reversed(self.recent):
            if text.startswith(" ") or " INFO " in text:
                continue
            if m := _EXCEPTION.match(text.strip()):
                module, name, message = m.groups()
                return message if module == _OPTIMIZER_ERRORS else f"{name}: {message}"
            return text.strip()
        if returncode < 0:
            return f"the optimizer was killed by signal {-returncode}"
        return f"the optimizer exited with status {returncode}"


def tail(path: Path, lines: int) -> list[str]:
    """The log's last lines (at most 64 KiB of it); [] when there is no log."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            raw = fh.read()
    except OSError:
        return []
    text = raw.decode("utf-8", "replace").splitlines()
    if size > _TAIL_BYTES and text:
        text = text[1:]  # the first line is cut
    return text[-lines:]
