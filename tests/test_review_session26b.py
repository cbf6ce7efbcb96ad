"""Review of session 26b (H54): the examiner's open/recovery/reserve changes since 33daad1, read as a storage
engineer would. Each test is a finding: fixed (the test passes) or xfail(strict=True) with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_enospc import SmallFs, mounted_tmpfs, small_fs  # noqa: F401 - small_fs is a fixture used by name

import blockstore
from blockstore import blocklife
from blockstore.errors import NoSpace
from blockstore.reserve import SpaceReserve, reserve_size
from blockstore.tools.fsck import check

BLOCK = 64 << 10
VALUE = 5000


def crashed_cache_session(store: Path) -> dict[bytes, bytes]:
    """A cache-mode store whose second session stops without closing (kill -9) after sealing blocks of its
    own; returns what the closed first session acknowledged."""
    acked = {}
    with blockstore.open(store, durability="cache", block_size=BLOCK) as s:
        for i in range(8):
            acked[b"k%03d" % i] = bytes([i]) * VALUE
            s.put(b"k%03d" % i, bytes([i]) * VALUE)
    s = blockstore.open(store, durability="cache", block_size=BLOCK)
    for i in range(8, 24):
        s.put(b"k%03d" % i, bytes([i]) * VALUE)
    s.abandon()
    return acked


def lose_unsynced_pages(store: Path) -> None:
    """A power cut takes the tail of a block the crashed cache session sealed (never synced: allowed)."""
    victim = sorted((store / "blocks").iterdir())[-3]
    os.truncate(victim, victim.stat().st_size // 2)


def test_a_power_cut_cache_session_still_opens_after_a_sync_open_was_killed_in_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache session loses unsynced pages to a power cut; the next open, in sync mode, rewrites the MANIFEST's
    durability to "sync" before its recovery runs, and is killed during that recovery. Every later open then read
    the crashed cache session as a sync one (5e0ad1a: recovery holds a crashed session to the MANIFEST's
    durability) and refused the store (CorruptionError, fsck --repair needed) for damage a cache session is
    allowed to leave. The MANIFEST now says "sync" only once the sync session's recovery is done."""
    store = tmp_path / "s"
    acked = crashed_cache_session(store)
    lose_unsynced_pages(store)

    def killed(*_args: object, **_kw: object) -> None:
        raise KeyboardInterrupt("killed during recovery")
    monkeypatch.setattr(blocklife, "recover", killed)
    with pytest.raises(KeyboardInterrupt):
        blockstore.open(store, durability="sync")
    monkeypatch.undo()
    with blockstore.open(store, durability="cache") as s:  # was: CorruptionError
        report = s.recovery_report
        for key, value in acked.items():  # the closed session's records are intact
            assert bytes(s.get(key) or b"") == value, key
    assert report, "recovery ran"


@pytest.fixture
def fs96(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB tmpfs: big enough that the reserve is one block + 4 MiB, not capped at a sixteenth of it."""
    with mounted_tmpfs(tmp_path / "fs", "96m") as mnt:
        yield mnt


def fill_until_free(root: Path, free: int) -> None:
    st = os.statvfs(root)
    with open(root / "filler", "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - free)


def test_a_held_reserve_is_not_taken_for_given_up_when_the_block_size_changes(fs96: Path) -> None:
    """A store on a low disk holds its reserve (one block + 4 MiB) across a clean close; reopened with a larger
    block_size option, the file (sized for the old block) was shorter than the new reserve, and before_open took
    any file shorter than that for one given up: every put was refused with NoSpace while the disk had 5 MiB
    free and the store itself held 4 MiB back, never released (give_up frees only a reserve held). Only a
    truncated (0-byte) file says given up; a held one of another size is still held."""
    store = fs96 / "s"
    with blockstore.open(store, durability="sync", block_size=BLOCK) as s:
        fill_until_free(fs96, 9_600 << 10)
        s.put(b"first", b"x" * 100)  # the disk is low: the reserve is taken
    held = (store / "RESERVE").stat().st_size
    assert held > 4 << 20
    with blockstore.open(store, durability="sync", block_size=1 << 20) as s:
        s.put(b"second", b"x" * 100)  # was: NoSpace (the reserve read as given up)
        assert bytes(s.get(b"first") or b"") == b"x" * 100
    assert (store / "RESERVE").stat().st_size >= held


def test_a_reserve_whose_allocation_failed_does_not_read_as_given_up(
        fs96: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocation of a reserve fails (ENOSPC from a racing writer, a file system without fallocate): _take left
    RESERVE as a 0-byte file, which the next open reads as a reserve given up, so puts were refused with NoSpace
    while the disk was below twice the reserve though the store never held or gave up anything. A failed take
    now leaves no file."""
    store = fs96 / "s"

    def no_room(*_args: object) -> None:
        raise OSError(28, "No space left on device")
    with blockstore.open(store, durability="sync", block_size=BLOCK) as s:
        fill_until_free(fs96, 9_600 << 10)
        monkeypatch.setattr(os, "posix_fallocate", no_room)
        s.put(b"first", b"x" * 100)  # the take fails: no reserve, the put goes on
        monkeypatch.undo()
    assert not (store / "RESERVE").exists()
    fill_until_free(fs96, 6 << 20)  # below twice the reserve
    with blockstore.open(store, durability="sync", block_size=BLOCK) as s:
        s.put(b"second", b"x" * 100)  # was: NoSpace (the 0-byte file read as a reserve given up)


def test_moving_unnamed_tables_aside_on_a_full_disk_is_a_blockstore_error(fs96: Path) -> None:
    """A flush cut short leaves a table file its MANIFEST does not name; the next writable open moves it to
    lost+found/ (f8aaeb9) and logs that in fsck-log.jsonl. On a full disk that log append raised a bare OSError
    (outside the BlockstoreError hierarchy) out of blockstore.open. Now NoSpace, and the open works once there
    is room, the table kept in lost+found/."""
    store = fs96 / "s"
    with blockstore.open(store, durability="sync", block_size=BLOCK) as s:
        for i in range(8):
            s.put(b"k%03d" % i, bytes([i]) * VALUE)
    tables = sorted((store / "directory").glob("*.sst"))
    assert tables, "a closed store has a table file"
    (store / "directory" / "999999.sst").write_bytes(tables[0].read_bytes())  # a flush cut short left it
    fill_until_free(fs96, 0)
    with open(fs96 / "filler2", "wb", buffering=0) as f:  # the last pages too
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(blockstore.BlockstoreError):
        blockstore.open(store, durability="sync")
    os.unlink(fs96 / "filler")
    with blockstore.open(store, durability="sync") as s:
        assert bytes(s.get(b"k003") or b"") == bytes([3]) * VALUE
    assert list((store / "lost+found").glob("directory-tables-*/999999.sst"))


def test_a_store_killed_right_after_giving_up_its_reserve_reopens_and_recovers_room(
        small_fs: SmallFs) -> None:  # noqa: F811 - the fixture imported above
    """Sound (checked, passes as the change landed): a writer fills its disk until NoSpace gives the reserve up,
    and is killed at once (no close: the directory's WAL holds the session). The next open, on the full disk,
    reads the 0-byte RESERVE as given up, recovers (the room given up is what RocksDB's WAL recovery needs),
    refuses puts with NoSpace, takes deletes, and after GC takes puts again with every acknowledged record
    intact and fsck clean."""
    store = small_fs.root / "store"
    writer = ("import os, sys, blockstore\n"
              "from blockstore.errors import NoSpace\n"
              "s = blockstore.open(sys.argv[1], create=True, durability='sync', block_size=65536)\n"
              "n = 0\n"
              "try:\n"
              "    while True:\n"
              "        s.put(b'k%05d' % n, bytes([n % 251]) * 20000)\n"
              "        n += 1\n"
              "except NoSpace:\n"
              "    print(n, flush=True)\n"
              "    os._exit(0)  # as kill -9 leaves it\n")
    out = subprocess.run([sys.executable, "-c", writer, str(store)], check=True, capture_output=True, text=True)
    acked = {b"k%05d" % i: bytes([i % 251]) * 20000 for i in range(int(out.stdout))}
    assert len(acked) > 100
    assert (store / "RESERVE").stat().st_size == 0
    with small_fs.open(durability="sync") as s:
        with pytest.raises(NoSpace):
            s.put(b"more", b"x" * 20000)
        for key in list(acked)[::2]:
            assert s.delete(key)
            del acked[key]
    with small_fs.open(durability="sync", compaction={"policy": "aggressive", "gc_invalid_ratio": 0.3}) as s:
        s.compactor.run_until_idle()
        s.put(b"after", b"x" * 20000)
        for key, value in acked.items():
            assert bytes(s.get(key) or b"") == value, key
    assert check(store).findings == []


def test_threads_filling_the_disk_together_give_the_reserve_up_once_and_lose_nothing(
        small_fs: SmallFs) -> None:  # noqa: F811 - the fixture imported above
    """Sound (checked, passes as the change landed): four threads put until each has seen NoSpace, racing the
    reserve's admit and give_up. Every put acknowledged reads back; the reserve ends given up (0 bytes), so
    deletes and GC make the store writable again, and fsck is clean."""
    s = small_fs.open(durability="sync", block_size=BLOCK)
    acked: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(100_000):
            key, value = b"t%d-%05d" % (t, i), bytes([t * 37 + i % 199]) * 15_000
            try:
                s.put(key, value)
            except NoSpace:
                return
            with lock:
                acked[key] = value
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(acked) > 100
    assert (small_fs.root / "store" / "RESERVE").stat().st_size == 0
    for key in list(acked)[::2]:
        assert s.delete(key)
        del acked[key]
    s.close()
    with small_fs.open(durability="sync", compaction={"policy": "aggressive", "gc_invalid_ratio": 0.3}) as s2:
        s2.compactor.run_until_idle()
        s2.put(b"after", b"x" * 15_000)
        for key, value in acked.items():
            assert bytes(s2.get(key) or b"") == value, key
    assert check(small_fs.root / "store").findings == []


def test_a_huge_block_size_holds_back_at_most_a_gib_and_nothing_on_a_roomy_disk(tmp_path: Path) -> None:
    """block_size=2**40 (the largest allowed) took a 16.9 GB STORE/RESERVE on a 252 GB disk: the reserve was one
    block + 4 MiB (capped only at a sixteenth of the file system) and the disk counted as low below 8 of those,
    more than it had free. A block now counts as at most 1 GiB, and low is 4 reserves or 2 % of the disk."""
    store = tmp_path / "s"
    store.mkdir()
    size = reserve_size(str(store), 1 << 40)
    assert size <= (1 << 30) + (4 << 20)
    low = SpaceReserve(str(store), 1 << 40).low
    st = os.statvfs(store)
    if st.f_bavail * st.f_frsize <= 2 * low:
        pytest.skip(f"this disk is not roomy for a 2**40-byte block size ({st.f_bavail * st.f_frsize} bytes free, "
                    f"low is {low}): a reserve would rightly be taken")
    with blockstore.open(store, create=True, allow_non_empty=True, block_size=1 << 40) as s:
        s.put(b"k", b"x" * 100)
    assert not (store / "RESERVE").exists()
