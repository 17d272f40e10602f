"""Durable writes: after a crash a file holds its old or its new content, never half of one,
and a rename or a new entry survives a power cut once its directory has been synced.

One place for what bundles, keys, slots, transfers and the coordinator's catalogue and
archives all need (SD cards on battery-less devices lose power mid-write).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """path holds data, or keeps what it held: a temporary name, fsync, rename, fsync the dir.

    mode: the file is created with it from the start (a private key is never readable by
    others, not even for a moment); None keeps mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
