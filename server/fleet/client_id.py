"""The coordinator's MQTT client id: unguessable per installation, the same across restarts.

The coordinator's session is persistent (the broker queues device traffic for it while it is
down), so its client id must stay the same across restarts; and on a broker that lets any
client pick its id (the anonymous/dev profile), a fixed, guessable id would let anyone connect
with it, take the session over and read what is queued for the coordinator. So by default the
id is `edgefleet-coordinator-<random>`, made once and kept in a file of the coordinator's state
directory. On the secure profile the broker uses the username as the client id
(`use_username_as_clientid`, docs/security.md), so the id is the coordinator's username.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from pathlib import Path

from edgefleet.server.fleet.store import sqlite_path

log = logging.getLogger(__name__)

ID_FILE = "coordinator-client-id"
PREFIX = "edgefleet-coordinator-"
DEFAULT_STATE_DIR = Path("/var/lib/edgefleet")

# What a stored id may be: what MQTT allows and a log line shows unambiguously.
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def state_dir_for(store_url: str) -> Path:
    """Where a coordinator keeps its own state by default: beside a SQLite store, else the
    unit's StateDirectory= ($STATE_DIRECTORY), else /var/lib/edgefleet (a PostgreSQL store is
    shared by coordinators that each need their own id)."""
    path = sqlite_path(store_url)
    if path:
        return Path(path).expanduser().resolve().parent
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(systemd) if systemd else DEFAULT_STATE_DIR


def coordinator_client_id(state_dir: Path, username: str | None = None) -> str:
    """The username when there is one, else this installation's id (made on first use)."""
    if username:
        return username
    path = state_dir / ID_FILE
    if not path.exists():
        _create(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not _VALID.fullmatch(text):
        # A new id would orphan the persistent session and what the broker queued in it.
        raise ValueError(f"{path} holds no valid client id ({text[:40]!r}); fix or remove it")
    return text


def _create(path: Path) -> None:
    """Write a new random id; if another process made one first, theirs is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new_id = PREFIX + secrets.token_hex(8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with tmp.open("x", encoding="ascii") as f:
            f.write(new_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        # link() never replaces: of two coordinators starting at once, exactly one id wins,
        # and a crash leaves either no file or a whole one.
        os.link(tmp, path)
        log.info("coordinator client id %s made and kept in %s", new_id, path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
