"""Walk and copy a bundle directory without ever following a link inside it.

The one rule for what a bundle directory may hold, shared by the verifier (`verify_bundle`),
`pack` and the installer's copy: directories and regular files only. A symbolic link (to a
file or a directory, inside or outside the bundle, or a loop such as `self -> .`) or any other
kind of file is refused on sight and never followed. The walk opens each directory relative to
its parent with O_NOFOLLOW, so a link swapped in while it runs is refused, not followed. Only the
bundle path itself may be a link (the agent loads `bundles/current`, which is one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, ExtraFile, NotABundle

# The limits of an archive (archive.py reads them from here): a bundle holds a few stage files.
MAX_ENTRIES = 256
MAX_BYTES = 1 << 30
MAX_DEPTH = 32

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the check must not block the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_CHUNK = 1 << 20


def link_refused(bundle: Path, rel: str) -> ExtraFile:
    """The error for a link inside a bundle, worded the same wherever it is found."""
    return ExtraFile(bundle, f"{rel} is a symbolic link; bundles hold plain files only")


@dataclass(frozen=True)
class Tree:
    """What a bundle directory holds: relative POSIX paths, parents before children."""

    dirs: tuple[str, ...]
    files: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class _Entry:
    rel: str
    is_dir: bool
    parent_fd: int  # open while the walk is at this entry
    name: str
    size: int


def _listing(fd: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return iter(sorted(it, key=lambda e: e.name))


def _open_child_dir(root: Path, parent_fd: int, name: str, rel: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise link_refused(root, rel) from exc
        raise


def _walk(root: Path) -> Generator[_Entry, None, None]:
    """Every entry under root, depth first in name order; refuses what a bundle may not hold."""
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotABundle(root, "not a directory") from exc
    # One open descriptor per level of the current path, closed on the way back up.
    stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = []
    try:
        stack.append((top, "", _listing(top)))
        count = 0
        while stack:
            fd, rel, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                os.close(fd)
                continue
            name = f"{rel}/{entry.name}" if rel else entry.name
            count += 1
            if count > MAX_ENTRIES:
                raise BundleError(root, f"holds more than {MAX_ENTRIES} files and directories")
            if entry.is_symlink():
                raise link_refused(root, name)
            if entry.is_dir(follow_symlinks=False):
                if len(stack) > MAX_DEPTH:
                    raise BundleError(root, f"{name} is nested more than {MAX_DEPTH} levels deep")
                yield _Entry(name, True, fd, entry.name, 0)
                child = _open_child_dir(root, fd, entry.name, name)
                stack.append((child, name, _listing(child)))
            elif entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                yield _Entry(name, False, fd, entry.name, size)
            else:
                raise ExtraFile(root, f"{name} is not a regular file")
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def plain_tree(root: Path) -> Tree:
    """List a bundle directory, refusing links, special files and oversized trees."""
    dirs: list[str] = []
    files: list[str] = []
    size = 0
    with contextlib.closing(_walk(Path(root))) as entries:
        for entry in entries:
            (dirs if entry.is_dir else files).append(entry.rel)
            size += entry.size
    return Tree(tuple(dirs), tuple(files), size)


def copy_tree(src: Path, dest: Path) -> Tree:
    """Copy a bundle directory into the new directory dest without following any link.

    Everything is checked first, so a refused bundle writes nothing; the copy then walks the
    tree again with the same rule, so a link swapped in between is refused, not followed.
    """
    src, dest = Path(src), Path(dest)
    tree = plain_tree(src)
    if tree.size > MAX_BYTES:
        raise BundleError(src, f"holds more than {MAX_BYTES} bytes")
    if dest.exists():
        raise BundleError(src, f"destination {dest} already exists")
    dest.mkdir(parents=True)
    try:
        budget = MAX_BYTES
        with contextlib.closing(_walk(src)) as entries:
            for entry in entries:
                if entry.is_dir:
                    (dest / entry.rel).mkdir()
                else:
                    budget -= _copy_file(src, entry, dest / entry.rel, budget)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return tree


def _copy_file(root: Path, entry: _Entry, target: Path, budget: int) -> int:
    try:
        fd = os.open(entry.name, _FILE_FLAGS, dir_fd=entry.parent_fd)
    except OSError as exc:
        if stat.S_ISLNK(os.stat(entry.name, dir_fd=entry.parent_fd, follow_symlinks=False).st_mode):
            raise link_refused(root, entry.rel) from exc
        raise
    copied = 0
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise ExtraFile(root, f"{entry.rel} is not a regular file")
        with target.open("xb") as out:
            while chunk := source.read(_CHUNK):
                copied += len(chunk)
                if copied > budget:
                    raise BundleError(root, f"holds more than {MAX_BYTES} bytes")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    return copied
