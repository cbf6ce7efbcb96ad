"""Review (H7) of the object-store tier's engine seams: damage and bad input around dropped local copies
must not lose or hide acknowledged records. Each test names the bug it proves; an `xfail(strict=True)`
marks one whose fix has not landed (the owner's inbox has the reproduction and a proposed diff)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

import blockstore
from blockstore.directory import Directory, DirectoryBatch
from blockstore.errors import BlockstoreError, ChecksumMismatch, CorruptionError
from blockstore.keys import SPACE_KV, block_key, key_suffix
from blockstore.store import DIRECTORY
from blockstore.tools.repair import repair

BLOCK = 64 << 10


class CopyFetcher:
    """Stands in for the object store: block files copied aside before their local copies are dropped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def keep(self, store: blockstore.Store, bid: int) -> bytes:
        name = f"obj-{bid:016x}".encode()
        shutil.copyfile(store.blocks.path(bid), self.folder / name.decode())
        return name

    def raw(self, name: bytes) -> bytes:
        return (self.folder / name.decode()).read_bytes()

    def __call__(self, bid: int, name: bytes, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        raw = self.raw(name)
        return [raw[a:b] for a, b in ranges]


def _dropped_block_store(path: Path, objects: Path) -> tuple[CopyFetcher, int, bytes, bytes]:
    """k = old in block A (kept local, with filler that keeps A live), then k = new in block B, which is
    uploaded (copied aside), flagged remote and dropped. Returns the fetcher, B's id, old and new."""
    old, new = b"old-" + os.urandom(2000), b"new-" + os.urandom(2000)
    fetch = CopyFetcher(objects)
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"k", old)
        s.put_many([(f"fill{i}".encode(), os.urandom(3000)) for i in range(5)])
        s.seal_open_blocks()
        s.put(b"k", new)
        s.seal_open_blocks()
        b = s.locate_many([b"k"])[0]
        assert b is not None
        bid = b.block_id
        s.mark_block_remote(bid, fetch.keep(s, bid))
        assert s.drop_local_copy(bid) > 0
        s.set_block_fetcher(fetch)
        assert s.get(b"k") == new
    return fetch, bid, old, new


def test_restore_local_copy_refuses_a_payload_that_does_not_verify(tmp_path: Path) -> None:
    """restore_local_copy checks the size, header and footer of the bytes it is given, not the records:
    an object with a flipped payload byte (bit rot, a bad transfer) is written as the block's local file.
    Reads then go local and raise ChecksumMismatch for a record whose object is intact, and fsck --repair
    would treat the record as damaged. Expected: CorruptionError, nothing written."""
    objects = tmp_path / "objects"
    objects.mkdir()
    fetch, bid, _old, new = _dropped_block_store(tmp_path / "s", objects)
    with blockstore.open(tmp_path / "s") as s:
        s.set_block_fetcher(fetch)
        e = next(x for x in s.block_table() if x.block_id == bid)
        loc = s.locate_many([b"k"])[0]
        assert loc is not None
        data = bytearray(fetch.raw(e.remote_name))
        data[loc.payload_offset + 10] ^= 0xFF
        try:
            s.restore_local_copy(bid, bytes(data))
        except CorruptionError:
            pass
        else:  # the bad copy now shadows the good object
            with pytest.raises(ChecksumMismatch):
                s.get(b"k")
            pytest.fail("restore_local_copy wrote a block file whose record does not verify")
        assert not s.has_local_copy(bid)
        assert s.get(b"k") == new


def test_repair_rebuild_does_not_bring_back_an_older_value_over_a_dropped_block(tmp_path: Path) -> None:
    """A directory that cannot be read is rebuilt from the local block files alone. A block whose local
    copy was dropped (flagged remote, its entry salvaged from the damaged directory) is not a local file,
    so its records are forgotten: the key's newest value is lost and the older value in a local block
    comes back as current. Expected: repair refuses (or keeps the dropped block and its records), and
    never serves the older value."""
    objects = tmp_path / "objects"
    objects.mkdir()
    path = tmp_path / "s"
    fetch, bid, _old, new = _dropped_block_store(path, objects)
    os.unlink(path / "directory" / "CURRENT")  # the directory cannot be opened; its tables salvage whole
    with pytest.raises(BlockstoreError):
        blockstore.open(path)
    result = repair(path)
    if result.refused:
        assert "remote" in result.refused or "dropped" in result.refused, result.refused
        return
    with blockstore.open(path) as s:
        s.set_block_fetcher(fetch)
        got = s.get(b"k")
        assert got is not None and got[:4] != b"old-", "repair brought back the value the dropped block replaced"
        assert got == new
        assert any(x.block_id == bid and x.remote_name for x in s.block_table())


def test_repair_of_a_damaged_entry_keeps_a_dropped_blocks_records(tmp_path: Path) -> None:
    """The block-table entry of a dropped block is damaged (its value no longer decodes): the flag, the
    only sign that the block's records are in an object, is lost with it. fsck --repair then calls the
    key entries naming it `dangling` (no file, no entry) and drops them: the newest value of k is
    deleted from the directory (and once the block leaves the table, remote GC deletes its object).
    Expected: the key entries stay (the open may refuse until the entry is restored: a clear error that
    loses nothing); if the store opens, k reads its newest value from the object."""
    objects = tmp_path / "objects"
    objects.mkdir()
    path = tmp_path / "s"
    fetch, bid, _old, new = _dropped_block_store(path, objects)
    d = Directory(str(path / DIRECTORY), read_only=False, sync=True, create=False)
    try:
        sfx = key_suffix(d.namespaces()["default"], SPACE_KV, b"k")
        (before,) = d.get_locations([sfx])
        b = DirectoryBatch()
        b.put(block_key(bid), b"\x01\x02\x03")  # an entry that does not decode
        d.write(b, force_sync=True)
    finally:
        d.close()
    assert before is not None and before.block_id == bid
    repair(path)
    d = Directory(str(path / DIRECTORY), read_only=True, sync=True, create=False)
    try:
        assert d.get_locations([sfx]) == [before], "repair dropped the key of a record that is in its object"
    finally:
        d.close()
    try:
        s = blockstore.open(path)
    except BlockstoreError:
        return  # refused until the entry is restored: nothing lost
    with s:
        s.set_block_fetcher(fetch)
        assert s.get(b"k") == new


def test_a_read_of_a_dropped_block_survives_compaction_deleting_it_meanwhile(tmp_path: Path) -> None:
    """A read finds block B dropped (flagged, no file) and fetches from its object after the pinned part of
    the read; compaction moved B's records out and deleted B in between (found by a stress run of reads,
    drops, restores and relocations). The read asked the table for B's remote name a second time, got b""
    (B is no longer in the table) and handed the fetcher an empty object name: an error (the tier asks the
    object store for key "") instead of the value, which B's object still holds (remote GC keeps it through
    its grace period). Expected: the value."""
    objects = tmp_path / "objects"
    objects.mkdir()
    path = tmp_path / "s"
    fetch, bid, _old, new = _dropped_block_store(path, objects)
    with blockstore.open(path) as s:
        s.set_block_fetcher(fetch)
        reader = s._reader  # the read path's seam: compaction is made to run inside the read's window
        real = reader.remote_name_of
        moving = [False]

        def name_then_compact(b: int) -> bytes:
            name = real(b)
            if b == bid and name and not moving[0] and s.has_block(bid):
                moving[0] = True
                loc = s.locate_many([b"k"])[0]
                assert loc is not None
                (sfx,) = [sx for off, sx in s.dir.block_records(bid) if off == loc.offset]
                payload = s.read_locations([loc])[0]
                assert s.relocate_many([(sfx, loc, payload)], partition=b"elsewhere") == [True]
                s.sync_moves()
                assert not s.has_block(bid)  # B emptied and deleted while the read is under way
            return name

        reader.remote_name_of = name_then_compact
        assert s.get(b"k") == new
