"""Writing the broker's files: atomically (the broker may reload at any moment), 0600."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    """Write path via a temporary file and rename, created with mode (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.tmp")
    # O_EXCL after unlinking a leftover: the file is never readable by others, even briefly.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, mode)  # the umask may have narrowed it; say exactly what we mean
    os.replace(tmp, path)
