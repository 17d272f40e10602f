"""The partial archive on disk: what it keeps, what it refuses, how it resumes after a kill."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from edgefleet.agent.update.chunks import ChunkError, ChunkStore, TransferError
from tests.update.transfer_helpers import make_offer, random_archive

BIG = 1 << 40
CHUNK = 4096


def _fill(store: ChunkStore, chunks: list[bytes], indexes: list[int]) -> None:
    for i in indexes:
        assert store.put(i, chunks[i]) is True


def test_chunks_in_any_order_make_the_archive(tmp_path: Path) -> None:
    data = random_archive(10 * CHUNK + 123)
    offer, chunks = make_offer(data, CHUNK)
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        assert store.total == 11 and store.missing() == list(range(11))
        _fill(store, chunks, [10, 3, 0, 7, 1, 2, 4, 5, 6, 9, 8])
        assert store.missing() == [] and store.have_count == 11
        path = store.complete()
    assert path == tmp_path / offer.sha256 / "archive"
    assert path.read_bytes() == data
    assert not (tmp_path / offer.sha256 / "part").exists()


def test_resume_rehashes_part_after_a_kill(tmp_path: Path) -> None:
    """No progress log: a torn write or a truncated file only loses the chunks it touched."""
    data = random_archive(8 * CHUNK)
    offer, chunks = make_offer(data, CHUNK)
    store = ChunkStore.open(tmp_path, offer, max_bytes=BIG)
    _fill(store, chunks, [0, 1, 2, 3, 5, 6, 7])
    store.close()  # the process dies here
    part = tmp_path / offer.sha256 / "part"
    with part.open("r+b") as fh:
        fh.seek(1 * CHUNK + 100)
        fh.write(b"\x00garbage")  # chunk 1 half-overwritten
        fh.truncate(6 * CHUNK + 10)  # chunks 6 and 7 lost with the file's tail
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as again:
        assert again.missing() == [1, 4, 6, 7]
        assert again.have_count == 4
        _fill(again, chunks, again.missing())
        assert again.complete().read_bytes() == data


def test_wrong_hash_wrong_length_and_bad_index_are_refused_and_not_written(
    tmp_path: Path,
) -> None:
    offer, chunks = make_offer(random_archive(3 * CHUNK + 5), CHUNK)
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        flipped = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
        with pytest.raises(ChunkError, match=r"chunk 1 of .*: sha256 ") as bad_hash:
            store.put(1, flipped)
        assert bad_hash.value.index == 1
        with pytest.raises(ChunkError, match=r"chunk 3 of .*: 4096 bytes, the offer says 5"):
            store.put(3, chunks[0])
        with pytest.raises(ChunkError, match=r"chunk 4 of .*: index out of range 0\.\.3"):
            store.put(4, chunks[0])
        assert store.missing() == [0, 1, 2, 3]
    # Nothing refused reached the disk: a resume still finds nothing.
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as again:
        assert again.have_count == 0


def test_a_duplicate_is_reported_not_rewritten(tmp_path: Path) -> None:
    offer, chunks = make_offer(random_archive(2 * CHUNK), CHUNK)
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        assert store.put(0, chunks[0]) is True
        assert store.put(0, chunks[0]) is False
        assert store.have_count == 1


def test_whole_hash_mismatch_discards_the_part(tmp_path: Path) -> None:
    """Chunks that match their own digests but not the archive's: an inconsistent offer."""
    data = random_archive(2 * CHUNK)
    other = random_archive(2 * CHUNK)
    _, other_chunks = make_offer(other, CHUNK)
    offer, _ = make_offer(
        data, CHUNK, chunk_sha256=[hashlib.sha256(c).hexdigest() for c in other_chunks]
    )
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        _fill(store, other_chunks, [0, 1])
        with pytest.raises(TransferError, match=r"whole file has sha256 .*discarded"):
            store.complete()
        assert store.have_count == 0
    assert not (tmp_path / offer.sha256 / "part").exists()
    assert not (tmp_path / offer.sha256 / "archive").exists()


def test_complete_refuses_while_chunks_are_missing(tmp_path: Path) -> None:
    offer, chunks = make_offer(random_archive(3 * CHUNK), CHUNK)
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        store.put(0, chunks[0])
        with pytest.raises(TransferError, match="not complete: 1/3 chunks"):
            store.complete()


def test_a_completed_archive_is_found_again_and_rechecked(tmp_path: Path) -> None:
    data = random_archive(2 * CHUNK)
    offer, chunks = make_offer(data, CHUNK)
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        _fill(store, chunks, [0, 1])
        path = store.complete()
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as again:
        assert again.missing() == []
        assert again.complete() == path
    path.write_bytes(b"x" + data[1:])  # rotted on disk since
    with (
        ChunkStore.open(tmp_path, offer, max_bytes=BIG) as rotten,
        pytest.raises(TransferError, match=r"has sha256 .*expected"),
    ):
        rotten.complete()
    assert not path.exists()


def test_a_different_offer_for_the_same_sha_starts_over(tmp_path: Path) -> None:
    data = random_archive(4 * CHUNK)
    offer, chunks = make_offer(data, CHUNK)
    with ChunkStore.open(tmp_path, offer, max_bytes=BIG) as store:
        _fill(store, chunks, [0, 1, 2])
    relaid, big_chunks = make_offer(data, 2 * CHUNK)
    with ChunkStore.open(tmp_path, relaid, max_bytes=BIG) as store:
        assert store.missing() == [0, 1]
        _fill(store, big_chunks, [0, 1])
        assert store.complete().read_bytes() == data


def test_disk_budget_and_free_space_are_checked_before_anything_is_written(
    tmp_path: Path,
) -> None:
    offer, _ = make_offer(random_archive(3 * CHUNK), CHUNK)
    with pytest.raises(TransferError, match=rf"is {3 * CHUNK} bytes, over .* budget of 1000 bytes"):
        ChunkStore.open(tmp_path, offer, max_bytes=1000)
    assert not (tmp_path / offer.sha256).exists()
    # Free space: the missing bytes must leave `reserve_bytes` free; no disk has more free
    # than its size, so reserving that much refuses whatever others do to the disk meanwhile.
    whole_disk = shutil.disk_usage(tmp_path).total
    with pytest.raises(
        TransferError, match=rf"needs {3 * CHUNK} more bytes .* only \d+ bytes are free, \d+ of"
    ):
        ChunkStore.open(tmp_path, offer, max_bytes=BIG, reserve_bytes=whole_disk)


def test_prune_removes_only_old_unkept_transfers(tmp_path: Path) -> None:
    keep_offer, _ = make_offer(random_archive(CHUNK), CHUNK)
    old_offer, _ = make_offer(random_archive(CHUNK), CHUNK)
    new_offer, _ = make_offer(random_archive(CHUNK), CHUNK)
    for offer in (keep_offer, old_offer, new_offer):
        ChunkStore.open(tmp_path, offer, max_bytes=BIG).close()
    (tmp_path / "not-a-transfer").mkdir()
    day_ago = time.time() - 86400
    for offer in (keep_offer, old_offer):
        d = tmp_path / offer.sha256
        for p in (d, *d.iterdir()):
            os.utime(p, (day_ago, day_ago))
    removed = ChunkStore.prune(tmp_path, keep={keep_offer.sha256}, max_age_s=3600)
    assert removed == [old_offer.sha256]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [keep_offer.sha256, new_offer.sha256, "not-a-transfer"]
    )
    ChunkStore.discard(tmp_path, new_offer.sha256)
    assert not (tmp_path / new_offer.sha256).exists()
