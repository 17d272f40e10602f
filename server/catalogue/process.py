"""A build's process: started in a process group of its own, followed line by line, killed
as a group, and found again by its pid file after the coordinator that started it died."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

CHECKER = "edgefleet.server.catalogue.checker"


def spawn(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start argv with stdout and stderr on one pipe, unbuffered, in a new session (so its
    process group is its own and a kill reaches every helper it started)."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by pid (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def follow(
    proc: subprocess.Popen[bytes], log_file: IO[bytes], on_line: Callable[[str], None]
) -> None:
    """Copy the process's output into log_file as it comes, handing each line on."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        log_file.write(raw)
        log_file.flush()
        on_line(raw.decode("utf-8", "replace"))


def kill_leftover(pid_file: Path, marker: str) -> int | None:
    """Kill the process group of the pid in pid_file if that process is still alive and its
    command line holds marker (a pid reused by something else is left alone); its pid."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if marker.encode() not in cmdline:
        return None
    kill_group(pid)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def ask_checker(args: list[str], timeout_s: float = 900.0) -> dict[str, Any]:
    """checker.py's JSON answer to args; RuntimeError with its last words if it failed."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", CHECKER, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the checks took more than {timeout_s:g} s") from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = done.stderr.decode("utf-8", "replace").strip().splitlines()
        last = errors[-1] if errors else f"exit status {done.returncode}"
        raise RuntimeError(f"the checks failed: {last}")
    answer = json.loads(lines[-1])
    if not isinstance(answer, dict):
        raise RuntimeError(f"the checks answered {lines[-1][:200]!r}")
    return answer
