"""The demo's console: numbered steps in plain words on stdout, every log record in a file.

The story a newcomer reads must not be interleaved with timestamped library logs; those
still matter when something fails, so they go to `<out>/demo.log`, which the story names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

LOG_NAME = "demo.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INDENT = "   "

log = logging.getLogger(__name__)


def log_to_file(path: Path) -> None:
    """Send every log record (ours, the libraries', Python warnings) to path, none to the console.

    The root logger's level is kept as the CLI set it (-v: debug).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    path.write_text("", encoding="utf-8")  # one run's log; a rerun starts it afresh
    # Append mode, not "w": uvicorn's logging.config.dictConfig closes every handler, and a
    # closed "w" FileHandler drops records for good, where an "a" one reopens its file.
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    logging.captureWarnings(True)


class Story:
    """Numbered steps and the lines under them; each line is also logged, so the log file
    reads as the story with the libraries' records in between."""

    def __init__(self, steps: int, write: Callable[[str], None] | None = None) -> None:
        self.steps = steps
        self.number = 0
        self.title = ""
        self._write = write or _print

    def step(self, title: str) -> None:
        """Start the next numbered step."""
        self.number += 1
        self.title = title
        self.line(f"{self.number}. {title}")

    def say(self, text: str) -> None:
        """Line(s) under the current step, indented."""
        for part in text.splitlines() or [""]:
            self.line(INDENT + part)

    def line(self, text: str = "") -> None:
        """A line at the left margin (headings, the summary)."""
        log.info("%s", text.strip() or "-")
        self._write(text)


def _print(text: str) -> None:
    # Flushed: the story is often piped (tee, CI logs) while the demo waits on something.
    print(text, flush=True)
