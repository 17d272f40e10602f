"""Make a running mosquitto re-read its password file and ACL (SIGHUP to the pid in its pid file).

On reload mosquitto 2.0 also re-checks connected clients, so a revoked device is disconnected
at once, not at its next reconnect (tested in tests/test_broker_acl.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

DEFAULT_PID_FILE = Path("/run/mosquitto/mosquitto.pid")  # Debian/Ubuntu's mosquitto.conf
HOW_TO = "reload the broker yourself: `systemctl reload mosquitto` (or send it SIGHUP)"


class ReloadError(RuntimeError):
    """The broker could not be signalled; the message says how to reload it by hand."""


def reload_broker(pid_file: Path = DEFAULT_PID_FILE) -> int:
    """Send SIGHUP to the broker named by pid_file; return its pid."""
    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        raise ReloadError(f"no broker pid file {pid_file}; {HOW_TO}") from None
    except ValueError:
        raise ReloadError(f"{pid_file} holds no pid; {HOW_TO}") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"no process {pid} (from {pid_file}); {HOW_TO}") from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal broker pid {pid}; {HOW_TO} as root") from None
    return pid
