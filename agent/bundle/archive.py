"""Pack a bundle directory into one archive for transfer, and unpack one safely."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from .errors import UnsafeArchive

MAX_MEMBERS = 256
MAX_UNPACKED_BYTES = 1 << 30


def pack(bundle_dir: Path, archive: Path) -> Path:
    """Write bundle_dir's files into a gzip tar with fixed metadata (same input, same bytes)."""
    files = sorted(p for p in Path(bundle_dir).rglob("*") if p.is_file())
    # Fixed owner, mode, mtime and an empty gzip name so an archive's sha256 names its content.
    with (
        archive.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in files:
            info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    with archive.open("rb+") as fh:
        os.fsync(fh.fileno())
    return archive


def _safe_name(name: str, archive: Path) -> str:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or name.startswith("/"):
        raise UnsafeArchive(archive, f"member {name!r} would escape the bundle directory")
    return pure.as_posix()


def unpack(archive: Path, dest: Path) -> Path:
    """Extract only regular files with safe relative names into a new directory dest."""
    if dest.exists():
        raise UnsafeArchive(archive, f"destination {dest} already exists")
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            _extract(tar, archive, dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsafeArchive(archive, f"not a readable tar archive: {exc}") from exc
    except UnsafeArchive:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _extract(tar: tarfile.TarFile, archive: Path, dest: Path) -> None:
    """Check every member first, then write; a refused archive writes nothing."""
    total = 0
    members = tar.getmembers()
    if len(members) > MAX_MEMBERS:
        raise UnsafeArchive(archive, f"{len(members)} members (limit {MAX_MEMBERS})")
    for member in members:
        name = _safe_name(member.name, archive)
        if member.isdir():
            continue
        if not member.isfile():
            raise UnsafeArchive(archive, f"member {name!r} is not a regular file")
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise UnsafeArchive(archive, f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    dest.mkdir(parents=True)
    for member in members:
        if member.isdir():
            continue
        src = tar.extractfile(member)
        if src is None:  # pragma: no cover - isfile() members always have data
            raise UnsafeArchive(archive, f"member {member.name!r} has no data")
        target = dest / _safe_name(member.name, archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        with src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
