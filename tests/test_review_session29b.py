"""Review of session 29's second half (H67): durable directory writes as an unsynced write plus a synced WAL
flush (2d3a964), the directory naming its store (bb0e320, 0ede6f8), close() and the compactor thread.

Each test here failed before the fix committed with it."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from compaction_helpers import put_shared_with_one_copy

import blockstore
from blockstore.errors import IOErrorBS
from blockstore.manifest import load_manifest
from blockstore.tools import cli, fsck

COPIES = b"\0compaction/copies"


def _commit_then_fail(s: blockstore.Store) -> None:
    """The next directory write commits, then reports failure: a WAL sync that failed after the write (since
    2d3a964 a durable write is an unsynced write then flush_wal(True), so the batch is in the memtable too)."""
    real = s.dir.write

    def committed_then_failed(batch: Any, *, force_sync: bool = False) -> None:
        s.dir.write = real  # type: ignore[method-assign]
        real(batch, force_sync=force_sync)
        err = IOErrorBS(errno.EIO, "directory write failed: IO error (simulated: the WAL sync failed after the write)")
        s.dir._failed = err  # the next write reopens the handle, which replays the WAL
        raise err

    s.dir.write = committed_then_failed  # type: ignore[method-assign]


def test_a_failed_group_that_only_drops_a_copy_is_adopted_when_found_committed(tmp_path: Path) -> None:
    # A group of copy drops writes no record, so nothing remembered it as "unsure": committed anyway, its
    # block-counter changes were never adopted, the next group wrote the old counters back, and the copy's
    # block counted a record no value names (fsck: block-counts; the block is never reclaimed).
    s = blockstore.open(tmp_path, block_size=1 << 20)
    try:
        sfx, value = put_shared_with_one_copy(s)
        copy_block = value.copies[0].block_id
        _commit_then_fail(s)
        with pytest.raises(IOErrorBS):
            s.place_copies([], partition=COPIES, drops=[(sfx, value, value.places()[-1])])
        s.put(b"b", b"B" * 100, partition="one")
        s.put(b"c", b"C" * 100, partition=COPIES)  # both blocks' entries written again
        for e in s.block_table():  # each block counts the records the directory places in it
            assert e.live_records == len(list(s.dir.block_records(e.block_id))), e
        assert {e.block_id: e.live_records for e in s.block_table()}.get(copy_block, 0) == 0
        assert s.get(b"shared") == b"S" * 5000
    finally:
        s.close()
    rep = fsck.check(tmp_path, log=False)
    assert [f.line() for f in rep.findings] == []


def test_a_lost_manifest_and_two_stray_blocks_do_not_make_the_store_another_ones(tmp_path: Path) -> None:
    # With MANIFEST.json lost, fsck counted the block headers alone (0ede6f8 weighed the directory only
    # beside a MANIFEST): two files of another store copied into blocks/ outvoted this store's one block and
    # its directory, so repair moved both to lost+found, rebuilt from the strangers and served their values
    # (this store's own key lost). The directory and a block header that agree now name the store.
    a, b = tmp_path / "a", tmp_path / "b"
    with blockstore.open(a, block_size=1 << 20) as s:
        s.put(b"k", b"mine")
    sid = load_manifest(str(a))["store_id"]
    with blockstore.open(b, block_size=1 << 20) as s:
        for i in range(3):
            s.put(b"b%d" % i, os.urandom(700_000))  # one block each
    for name in sorted(os.listdir(b / "blocks"))[1:]:
        shutil.copyfile(b / "blocks" / name, a / "blocks" / name)
    os.unlink(a / "MANIFEST.json")
    assert cli.main(["fsck", "--repair", str(a)]) == 1
    assert load_manifest(str(a))["store_id"] == sid
    assert cli.main(["fsck", str(a)]) == 0
    with blockstore.open(a) as s:
        assert s.get(b"k") == b"mine"
        assert all(s.get(b"b%d" % i) is None for i in range(3))
    assert sorted(n for n in os.listdir(a / "lost+found") if n.endswith(".blk")) == sorted(os.listdir(b / "blocks"))[1:]


def test_the_compaction_failing_gauge_clears_once_a_background_pass_succeeds(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # blockstore_compaction_failing is "1 if the last compaction pass failed"; it read status()['last_error'],
    # which stays set (1efdabf keeps it for status), so one full disk kept the gauge at 1 for good
    import time

    from blockstore import metrics
    from blockstore.compaction import Compactor
    from blockstore.errors import NoSpace

    calls: list[int] = []
    real = Compactor.run_pass

    def flaky(self: Compactor, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise NoSpace(errno.ENOSPC, "the disk is full (simulated)")
        return real(self, *a, **kw)

    monkeypatch.setattr(Compactor, "run_pass", flaky)
    with blockstore.open(tmp_path, block_size=1 << 20, compaction={"policy": "full", "interval_s": 0.01}) as s:
        deadline = time.monotonic() + 20
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 3
        status = s.compactor.status()
        assert "full" in (status["last_error"] or "")  # kept for status
        fams = {m.name: m for m in metrics.StoreCollector(lambda: [s]).collect()}
        assert [x.value for x in fams["blockstore_compaction_failing"].samples] == [0.0]
        assert status["failing"] is False


def _overwrite_unsure(tmp_path: Path) -> tuple[blockstore.Store, int]:
    """A store whose sealed block holds k and j, and whose overwrite of k was reported failed but committed
    (the group is "unsure" until the next write settles it)."""
    s = blockstore.open(tmp_path, block_size=1 << 20)
    s.put(b"k", b"K" * 3000, partition="p")
    s.put(b"j", b"J" * 3000, partition="p")
    s.seal_open_blocks()
    (sealed,) = [e.block_id for e in s.block_table()]
    s.put(b"z", b"Z" * 100, partition="p")  # p's next open block exists: the overwrite is one directory batch
    _commit_then_fail(s)
    with pytest.raises(IOErrorBS):
        s.put(b"k", b"k2" * 100, partition="p")  # retires k's record in the sealed block
    return s, sealed


def test_a_remote_flag_set_while_a_failed_group_is_unsure_is_kept(tmp_path: Path) -> None:
    # mark_block_remote wrote the block's entry from the table before the failed group was settled, and the
    # settle then put the group's copy of the entry (no remote name) in the table: the flag was lost in
    # memory (drop_local_copy refused, the uploader would upload the block again) and the directory kept
    # the old counters (fsck block-counts)
    s, sealed = _overwrite_unsure(tmp_path)
    try:
        assert s.mark_block_remote(sealed, b"blocks/n/obj")
        s.put(b"x", b"X", partition="q")
        e = {e.block_id: e for e in s.block_table()}[sealed]
        assert e.remote_name == b"blocks/n/obj" and e.live_records == 1
        assert s.get(b"k") == b"k2" * 100 and s.get(b"j") == b"J" * 3000
    finally:
        s.close()
    rep = fsck.check(tmp_path, log=False)
    assert [f.line() for f in rep.findings] == []


def test_a_block_evicted_while_a_failed_group_is_unsure_stays_gone(tmp_path: Path) -> None:
    # evict_blocks removed the block from the table before the failed group was settled, and the settle put
    # the group's copy of its entry back: the table named a block whose file was deleted
    s, sealed = _overwrite_unsure(tmp_path)
    try:
        assert s.evict_blocks([sealed]).blocks == [sealed]
        s.put(b"x", b"X", partition="q")
        assert sealed not in {e.block_id for e in s.block_table()}
        assert s.get(b"j") is None and s.get(b"k") == b"k2" * 100
        assert s.stats().records == 3  # k, z, x
    finally:
        s.close()
    rep = fsck.check(tmp_path, log=False)
    assert [f.line() for f in rep.findings] == []
