"""Pack a bundle directory into one archive for transfer, and unpack one safely."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from .errors import UnsafeArchive
from .tree import MAX_BYTES, MAX_ENTRIES, plain_tree

MAX_MEMBERS = MAX_ENTRIES
MAX_UNPACKED_BYTES = MAX_BYTES


def pack(bundle_dir: Path, archive: Path, only: Collection[str] | None = None) -> Path:
    """Write bundle_dir's files into a gzip tar with fixed metadata (same input, same bytes).

    `only` limits the archive to those bundle-relative names (a delta bundle, delta.py).
    """
    bundle_dir = Path(bundle_dir)
    # The verifier's rule: a link anywhere in the bundle is refused, never packed through.
    names = sorted(plain_tree(bundle_dir).files)
    if only is not None:
        names = [n for n in names if n in only]
    files = [bundle_dir / rel for rel in names]
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
    """The member's path inside the bundle; '' for the bundle directory itself ('.', './')."""
    # PurePosixPath drops '.' parts and repeated slashes: `tar -C DIR .` writes './stage0.onnx'.
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("/"):
        raise UnsafeArchive(archive, f"member {name!r} would escape the bundle directory")
    return pure.as_posix() if pure.parts else ""


_KINDS = {
    tarfile.SYMTYPE: "is a symbolic link",
    tarfile.LNKTYPE: "is a hard link",
    tarfile.CHRTYPE: "is a character device",
    tarfile.BLKTYPE: "is a block device",
    tarfile.FIFOTYPE: "is a FIFO",
}


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
    files: dict[str, tarfile.TarInfo] = {}
    dirs: set[str] = set()
    for member in members:
        name = _safe_name(member.name, archive)
        if member.isdir():
            dirs.add(name)
            continue
        if not member.isfile():
            kind = _KINDS.get(member.type, "is not a regular file")
            raise UnsafeArchive(
                archive, f"member {member.name!r} {kind}; bundles hold plain files only"
            )
        if not name:
            raise UnsafeArchive(archive, f"member {member.name!r} has no file name")
        if name in files:
            # './a' and 'a' are one file: a second copy would silently replace the first.
            raise UnsafeArchive(archive, f"member {member.name!r} appears twice")
        files[name] = member
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise UnsafeArchive(archive, f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    for name in files:
        # 'heads' as a file and 'heads/exit0.npz' cannot both be written.
        clash = [p.as_posix() for p in PurePosixPath(name).parents if p.as_posix() in files]
        if clash or name in dirs:
            both = clash[0] if clash else name
            raise UnsafeArchive(archive, f"member {both!r} is both a file and a directory")
    dest.mkdir(parents=True)
    for name, member in files.items():
        src = tar.extractfile(member)
        if src is None:  # pragma: no cover - isfile() members always have data
            raise UnsafeArchive(archive, f"member {member.name!r} has no data")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
