"""A partial bundle archive on disk, assembled chunk by chunk and checked against its offer.

Layout under `transfers_dir/{sha256}/`:

* `offer.json` — the encoded `BundleOffer` the chunks are checked against;
* `part` — the archive being assembled: chunk i at offset i * chunk_size, fsynced after each
  chunk;
* `archive` — `part` renamed atomically once every chunk is there and the whole file's
  sha256 equals the offer's.

There is no progress log: opening a store re-hashes each chunk region of `part` against
`offer.chunk_sha256[i]` (about 10 ms per 5 MB), so what the store "has" is always exactly
what is on disk, and a SIGKILL or power loss at any moment costs at most the chunk being
written. A region that is short, a hole or half written simply does not match and is fetched
again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from edgefleet.agent.durable import fsync_dir
from edgefleet.agent.protocol import BundleOffer, encode
from edgefleet.agent.protocol.errors import TopicError
from edgefleet.agent.protocol.ids import check_sha256

log = logging.getLogger(__name__)

OFFER_FILE = "offer.json"
PART_FILE = "part"
ARCHIVE_FILE = "archive"
_READ_BLOCK = 1024 * 1024


class TransferError(RuntimeError):
    """A bundle archive cannot be (or was not) fetched; the message names the sha and why."""


class ChunkError(ValueError):
    """A received chunk is not the one the offer describes; the message names its index."""

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class ChunkStore:
    """The chunks of one offered archive held on disk; open with `ChunkStore.open`."""

    def __init__(self, directory: Path, offer: BundleOffer, have: set[int], fd: int | None):
        self.directory = directory
        self.offer = offer
        self._have = have
        self._fd = fd  # None once the archive is complete (or already was)

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls, transfers_dir: Path, offer: BundleOffer, *, max_bytes: int, reserve_bytes: int = 0
    ) -> ChunkStore:
        """Create the partial archive of `offer`, or resume the one on disk.

        An existing `offer.json` that differs from `offer` means another layout of the same
        bytes (chunk size, timestamps): everything is started over. Raises TransferError when
        the archive is larger than `max_bytes` (the device's disk budget), or when its missing
        bytes would leave less than `reserve_bytes` free on the disk (the outbox and the logs
        need room too).
        """
        sha = offer.sha256
        if offer.size > max_bytes:
            raise TransferError(
                f"bundle archive {sha} is {offer.size} bytes, over this device's transfer "
                f"budget of {max_bytes} bytes"
            )
        directory = transfers_dir / sha
        directory.mkdir(parents=True, exist_ok=True)
        offer_bytes = encode(offer)
        offer_path = directory / OFFER_FILE
        try:
            previous = offer_path.read_bytes()
        except FileNotFoundError:
            previous = None
        if previous is not None and previous != offer_bytes:
            log.warning("transfer %s: the offer changed since the last attempt; starting over", sha)
            for name in (PART_FILE, ARCHIVE_FILE):
                (directory / name).unlink(missing_ok=True)
        if previous != offer_bytes:
            tmp = directory / (OFFER_FILE + ".tmp")
            tmp.write_bytes(offer_bytes)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, offer_path)
            fsync_dir(directory)

        archive = directory / ARCHIVE_FILE
        if archive.exists():
            # Completed earlier (and checked then); complete() checks its hash once more.
            return cls(directory, offer, set(range(offer.chunk_count)), None)

        part = directory / PART_FILE
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            have = _verified_chunks(fd, offer)
            missing_bytes = sum(
                offer.chunk_length(i) for i in range(offer.chunk_count) if i not in have
            )
            free = shutil.disk_usage(directory).free
            if missing_bytes > free - reserve_bytes:
                kept = f", {reserve_bytes} of them kept in reserve" if reserve_bytes else ""
                raise TransferError(
                    f"bundle archive {sha} needs {missing_bytes} more bytes in {directory}, "
                    f"but only {free} bytes are free{kept}"
                )
        except BaseException:
            os.close(fd)
            raise
        if have:
            log.info(
                "transfer %s: resuming with %d/%d chunks already on disk",
                sha,
                len(have),
                offer.chunk_count,
            )
        return cls(directory, offer, have, fd)

    # -- state --------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Number of chunks of the archive."""
        return self.offer.chunk_count

    @property
    def have_count(self) -> int:
        """Number of verified chunks on disk."""
        return len(self._have)

    def has(self, index: int) -> bool:
        """Whether chunk `index` is verified and on disk."""
        return index in self._have

    def missing(self) -> list[int]:
        """Indexes of the chunks still needed, in order."""
        return [i for i in range(self.total) if i not in self._have]

    # -- writing ------------------------------------------------------------------------

    def put(self, index: int, data: bytes) -> bool:
        """Check chunk `index` against the offer and write it; False if it was already held.

        Raises ChunkError (naming the index) for an index out of range, a wrong length or a
        wrong sha256; nothing is written then.
        """
        offer = self.offer
        if not 0 <= index < offer.chunk_count:
            raise ChunkError(
                f"chunk {index} of {offer.sha256}: index out of range 0..{offer.chunk_count - 1}",
                index=index,
            )
        if index in self._have:
            return False
        expected = offer.chunk_length(index)
        if len(data) != expected:
            raise ChunkError(
                f"chunk {index} of {offer.sha256}: {len(data)} bytes, the offer says {expected}",
                index=index,
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != offer.chunk_sha256[index]:
            raise ChunkError(
                f"chunk {index} of {offer.sha256}: sha256 {digest}, the offer says "
                f"{offer.chunk_sha256[index]}",
                index=index,
            )
        fd = self._require_fd()
        written = os.pwrite(fd, data, index * offer.chunk_size)
        if written != len(data):  # a full disk shows up as a short write or an OSError
            raise TransferError(
                f"chunk {index} of {offer.sha256}: wrote {written} of {len(data)} bytes to "
                f"{self.directory / PART_FILE}"
            )
        # Durable before counted: after a power loss the re-hash on open is the only truth.
        os.fsync(fd)
        self._have.add(index)
        return True

    def complete(self) -> Path:
        """Check the whole archive's sha256, rename `part` to `archive` durably; return its path.

        Raises TransferError when chunks are missing, or when the whole-file hash differs
        from the offer's (then the part is discarded: its chunks matched their own hashes,
        so the offer itself is inconsistent and resuming it would give the same result).
        """
        offer = self.offer
        archive = self.directory / ARCHIVE_FILE
        if len(self._have) != self.total:
            raise TransferError(
                f"bundle archive {offer.sha256} is not complete: "
                f"{len(self._have)}/{self.total} chunks"
            )
        if self._fd is None:
            digest = _file_sha256(archive)
            if digest != offer.sha256:
                archive.unlink(missing_ok=True)
                self._have.clear()
                raise TransferError(
                    f"bundle archive {archive} has sha256 {digest}, expected {offer.sha256}; "
                    "discarded"
                )
            return archive
        fd = self._fd
        os.ftruncate(fd, offer.size)  # a part from an older, longer layout keeps no tail
        digest = _fd_sha256(fd, offer.size)
        part = self.directory / PART_FILE
        if digest != offer.sha256:
            self.close()
            part.unlink(missing_ok=True)
            self._have.clear()
            raise TransferError(
                f"bundle archive {offer.sha256}: every chunk matched the offer but the whole "
                f"file has sha256 {digest}; discarded the partial file"
            )
        os.fsync(fd)
        self.close()
        os.replace(part, archive)
        fsync_dir(self.directory)
        log.info("transfer %s: complete, %d bytes in %s", offer.sha256, offer.size, archive)
        return archive

    def close(self) -> None:
        """Close the partial file (what is on disk stays for a later resume)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise TransferError(f"bundle archive {self.offer.sha256}: the store is closed")
        return self._fd

    # -- housekeeping -------------------------------------------------------------------

    @staticmethod
    def discard(transfers_dir: Path, sha256: str) -> None:
        """Delete everything held for the archive `sha256` (partial or complete)."""
        shutil.rmtree(transfers_dir / check_sha256(sha256), ignore_errors=True)

    @staticmethod
    def prune(
        transfers_dir: Path, keep: set[str], max_age_s: float, *, now: float | None = None
    ) -> list[str]:
        """Delete transfers not in `keep` untouched for `max_age_s`; return their sha256s.

        Only directories named by a sha256 are considered, so nothing else placed in
        `transfers_dir` is ever deleted.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        try:
            entries = list(transfers_dir.iterdir())
        except FileNotFoundError:
            return removed
        for entry in entries:
            try:
                sha = check_sha256(entry.name)
            except TopicError:
                continue
            if sha in keep or not entry.is_dir():
                continue
            if now - _newest_mtime(entry) < max_age_s:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(sha)
            log.info("transfer %s: pruned (untouched for over %.0f s)", sha, max_age_s)
        return removed


def _verified_chunks(fd: int, offer: BundleOffer) -> set[int]:
    """Indexes whose region of the part file already hashes to the offer's chunk digest."""
    have: set[int] = set()
    for index in range(offer.chunk_count):
        length = offer.chunk_length(index)
        data = os.pread(fd, length, index * offer.chunk_size)
        if len(data) == length and hashlib.sha256(data).hexdigest() == offer.chunk_sha256[index]:
            have.add(index)
    return have


def _fd_sha256(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(_READ_BLOCK, size - offset), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _newest_mtime(directory: Path) -> float:
    newest = directory.stat().st_mtime
    for child in directory.iterdir():
        try:
            newest = max(newest, child.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest
