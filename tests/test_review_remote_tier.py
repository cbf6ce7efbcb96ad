"""Review (H7) of blockstore.remote.tier: the tier drops local copies on the strength of the directory's
remote flag alone. A damaged or forged entry (a remote name on a block that was never uploaded) must not
make it delete the only copy of acknowledged records. In-memory object store (a unit-test aid; the tier
on a real SeaweedFS cluster: tests/test_remote_tier.py)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

import blockstore
from blockstore.directory import Directory, DirectoryBatch
from blockstore.errors import CorruptionError, NotFound
from blockstore.remote.objects import S3Settings
from blockstore.remote.tier import RemoteTier
from blockstore.remote.uploader import Uploader
from blockstore.store import DIRECTORY
from blockstore.tools.repair import repair

BLOCK = 64 << 10


class MemoryObjects:
    """The ObjectStore interface over a dict."""

    def __init__(self) -> None:
        self.settings = S3Settings("memory://", "b", "", "")
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def size(self, key: str) -> int | None:
        got = self.objects.get(key)
        return None if got is None else len(got)

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        return [memoryview(self.objects[key][a:b]) for a, b in ranges]

    def list_after(self, prefix: str, after: str | None) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix) and (after is None or k > after))

    def list_children(self, prefix: str) -> list[str]:
        return sorted({k[len(prefix):].split("/", 1)[0] + "/" for k in self.objects if k.startswith(prefix)})

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def test_tier_keeps_a_block_whose_remote_flag_names_no_object(tmp_path: Path) -> None:
    """A block entry whose remote name was set by damage (the block was never uploaded): the uploader
    skips it (pending() trusts the flag), and with a local capacity the tier drops its local file, the
    only copy; every read of its records then fails. Expected: before a drop, the tier checks that the
    object exists with the block file's size (one HEAD), and keeps the local copy otherwise."""
    vals = {f"k{i:03d}".encode(): os.urandom(20_000) for i in range(6)}
    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        forged = s.block_table()[0].block_id
    d = Directory(str(path / DIRECTORY), read_only=False, sync=True, create=False)
    try:
        e = d.load_blocks()[forged]
        e.remote_name = b"blocks/node-x/never-uploaded"
        b = DirectoryBatch()
        b.put_block(e)
        d.write(b, force_sync=True)
    finally:
        d.close()
    objects = MemoryObjects()
    with blockstore.open(path, block_size=BLOCK) as s:
        tier = RemoteTier(s, objects, "node-x", poll_s=0.05, local_capacity_bytes=0)
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and s.has_local_copy(forged) and tier.uploader.pending():
                time.sleep(0.05)
            time.sleep(1.2)  # the capacity check runs at most once a second
            assert s.has_local_copy(forged), "the tier deleted the only copy of a block it never uploaded"
            assert [s.get(k) for k in vals] == list(vals.values())
        finally:
            tier.close(drain=False)


def test_a_lost_directory_is_not_rebuilt_under_a_remote_tier(tmp_path: Path) -> None:
    """The directory of a store whose tier dropped its newest block is lost whole, and fsck --repair rebuilds
    it from the local block files: the dropped block's records are forgotten and its id is free again. The
    next block takes that id; the uploader's ledger says the id is uploaded, so the tier flags the new block
    with the old block's object, never uploads it, and drops its local copy: a put acknowledged after the
    repair is lost (its reads fetch the old object's bytes and fail their checksum). Expected: repair
    refuses a rebuild from the local blocks while the store has a remote ledger, saying why."""
    vals = {f"k{i:03d}".encode(): os.urandom(20_000) for i in range(9)}
    path = tmp_path / "s"
    objects = MemoryObjects()
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        tier = RemoteTier(s, objects, "node-x", poll_s=0.05)
        try:
            assert tier.drain(20.0)
            top = max(e.block_id for e in s.block_table())
            assert s.drop_local_copy(top) > 0
        finally:
            tier.close(drain=False)
    shutil.rmtree(path / DIRECTORY)
    result = repair(path)
    if result.refused:
        assert "remote" in result.refused, result.refused
        assert not (path / DIRECTORY).exists() and sorted(os.listdir(path / "blocks"))  # nothing changed
        return
    fresh = os.urandom(20_000)
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"fresh", fresh)
        s.seal_open_blocks()
        tier = RemoteTier(s, objects, "node-x", poll_s=0.05, local_capacity_bytes=0)
        try:
            time.sleep(1.5)  # an upload pass and a capacity check
            assert s.get(b"fresh") == fresh
        finally:
            tier.close(drain=False)


def test_a_damaged_remote_name_reads_as_a_blockstore_error(tmp_path: Path) -> None:
    """A dropped block's remote name damaged into bytes that are not UTF-8: a read of its records raised
    UnicodeDecodeError out of the tier's fetcher (not a BlockstoreError). Expected: CorruptionError naming
    the block, and the tier keeps running."""
    vals = {f"k{i:03d}".encode(): os.urandom(20_000) for i in range(6)}
    path = tmp_path / "s"
    objects = MemoryObjects()
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        tier = RemoteTier(s, objects, "node-x", poll_s=0.05)
        try:
            assert tier.drain(20.0)
            loc = s.locate_many([b"k000"])[0]
            assert loc is not None and s.drop_local_copy(loc.block_id) > 0
        finally:
            tier.close(drain=False)
    d = Directory(str(path / DIRECTORY), read_only=False, sync=True, create=False)
    try:
        e = d.load_blocks()[loc.block_id]
        e.remote_name = b"\xff" * len(e.remote_name)
        b = DirectoryBatch()
        b.put_block(e)
        d.write(b, force_sync=True)
    finally:
        d.close()
    with blockstore.open(path, block_size=BLOCK) as s:
        tier = RemoteTier(s, objects, "node-x", poll_s=0.05)
        try:
            with pytest.raises(CorruptionError, match=f"{loc.block_id:016x}"):
                s.get(b"k000")
            time.sleep(0.3)
            assert tier.status().running
        finally:
            tier.close(drain=False)


def test_a_block_deleted_under_the_capacity_check_is_not_a_tier_error(tmp_path: Path) -> None:
    """The capacity check drops blocks from a copy of the block table; compaction may delete one of them
    first, and drop_local_copy then raises NotFound. That aborted the pass as an error (backoff, a
    warning that uploads are pending, the other blocks not dropped). Expected: skipped."""
    vals = {f"k{i:03d}".encode(): os.urandom(20_000) for i in range(9)}
    objects = MemoryObjects()
    with blockstore.open(tmp_path / "s", block_size=BLOCK) as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        real = s.drop_local_copy
        first = min(e.block_id for e in s.block_table())
        gone: list[int] = []

        def deleted_meanwhile(block_id: int) -> int:
            if block_id == first and not gone:
                gone.append(block_id)
                raise NotFound(f"block {block_id:016x} is not in the block table")
            return real(block_id)

        s.drop_local_copy = deleted_meanwhile  # type: ignore[method-assign]
        tier = RemoteTier(s, objects, "node-x", poll_s=0.05, retry_min_s=5.0, retry_max_s=5.0,
                          local_capacity_bytes=0)
        try:
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and (tier.status().local_bytes > 0 or not gone):
                assert tier.status().last_error is None, tier.status().last_error
                time.sleep(0.05)
            st = tier.status()
            assert gone and st.last_error is None and st.failures_in_a_row == 0, st
            assert st.local_bytes <= sum(e.data_end for e in s.block_table() if e.block_id == first)
        finally:
            tier.close(drain=False)


def test_a_block_recovery_cut_after_its_upload_is_not_flagged_again(tmp_path: Path) -> None:
    """Cache mode: a sealed block is uploaded and flagged, then a power cut loses its last page; recovery
    cuts the block to what verifies and clears the flag (the object holds another file now). The next
    tier's confirm_uploaded flagged it again from the ledger's mark, naming an object of another size:
    the capacity check would drop the only copy of the cut block for it, a remote wait counts it as
    confirmed, and restoring it from that object always fails. Expected: not flagged."""
    path = tmp_path / "s"
    objects = MemoryObjects()
    s = blockstore.open(path, block_size=BLOCK, durability="cache")
    s.put_many([(f"k{i}".encode(), os.urandom(9_000)) for i in range(5)])
    (bid,) = s.seal_open_blocks()
    up = Uploader(s, objects, "node-x")
    try:
        up.run_once()
        assert [e.remote_name for e in s.block_table()][0]
    finally:
        up.close()
    s.abandon()  # a power cut
    blk = s.blocks.path(bid)
    with open(blk, "r+b") as f:
        f.truncate(os.path.getsize(blk) - 64 - 100)  # the footer and a record's tail lost
    with blockstore.open(path, block_size=BLOCK, durability="cache") as s:
        (e,) = [x for x in s.block_table() if x.block_id == bid]
        assert not e.remote_name  # recovery cut it and cleared the flag
        up = Uploader(s, objects, "node-x")
        try:
            up.confirm_uploaded()
            (e,) = [x for x in s.block_table() if x.block_id == bid]
            assert not e.remote_name, "flagged remote under an object that holds another file"
        finally:
            up.close()


@pytest.mark.parametrize("flag", [b"blocks/node-x/never-uploaded", b"\xff\xfe"])
def test_a_damaged_flag_on_a_reserved_block_does_not_stop_the_tier(tmp_path: Path, flag: bytes) -> None:
    """A block that has a publication number reserved but no upload mark (a pass cut short), whose remote
    flag is damaged: confirm_uploaded (run when a tier starts) completed the ledger from the flag by
    parsing the name's xxh3 and raised ValueError (or UnicodeDecodeError), so no tier could start on the
    store. Expected: the flag is not trusted for the ledger, the tier starts."""
    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put_many([(f"k{i}".encode(), os.urandom(9_000)) for i in range(5)])
        (bid,) = s.seal_open_blocks()
        up = Uploader(s, MemoryObjects(), "node-x")
        try:
            up.ledger.reserve_many({bid: 1}, 2)
        finally:
            up.close()
    d = Directory(str(path / DIRECTORY), read_only=False, sync=True, create=False)
    try:
        e = d.load_blocks()[bid]
        e.remote_name = flag
        b = DirectoryBatch()
        b.put_block(e)
        d.write(b, force_sync=True)
    finally:
        d.close()
    with blockstore.open(path, block_size=BLOCK) as s:
        tier = RemoteTier(s, MemoryObjects(), "node-x", poll_s=0.05)
        try:
            assert tier.status().running
            assert tier.uploader.ledger.uploaded(bid) is None
        finally:
            tier.close(drain=False)
