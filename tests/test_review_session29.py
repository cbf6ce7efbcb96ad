"""Outside examination of session 29 (H64): maintenance cut short part-way (fsck --repair, compaction),
concurrency and configuration that earlier reviews did not try. Each test is a finding that failed on the
HEAD it was found on."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore.errors import TruncatedError
from blockstore.tools import cli
from blockstore.tools.repair import repair

sys.path.insert(0, str(Path(__file__).parent))
from test_review_session26 import assert_all_read, make_store  # noqa: E402  (a closed sync store of sealed blocks)


class Cut(Exception):
    """Stands for a crash (kill -9) at the point where it is raised: every step before it was synced."""


def cut_at(monkeypatch: pytest.MonkeyPatch, name: str, n: int) -> None:
    """Make the nth call of os.<name> raise Cut instead of doing anything."""
    orig = getattr(os, name)
    calls = [0]

    def cutting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == n:
            raise Cut(f"os.{name} #{n}")
        return orig(*args, **kwargs)

    monkeypatch.setattr(os, name, cutting)


# ------------------------------------------------------------------ repair cut short


def test_a_repair_cut_in_the_middle_of_a_swap_loses_no_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two block files with swapped names: repair moves each to ID.blk.fsck-renaming, then to its name. Cut
    after the first move, the next repair found the name still taken by the other (misnamed) file and put
    the moved file in lost+found as a duplicate: block 1's 8 keys read as misses (missing-block)."""
    store = tmp_path / "s"
    acked = make_store(store)
    one, two = store / "blocks" / f"{1:016x}.blk", store / "blocks" / f"{2:016x}.blk"
    os.rename(one, tmp_path / "t")
    os.rename(two, one)
    os.rename(tmp_path / "t", two)
    cut_at(monkeypatch, "rename", 2)
    with pytest.raises(Cut):
        repair(store)
    monkeypatch.undo()
    assert (store / "blocks" / f"{1:016x}.blk.fsck-renaming").exists()
    assert cli.main(["fsck", "--repair", str(store)]) == 1
    assert cli.main(["fsck", str(store)]) == 0
    assert_all_read(store, acked)
    assert not (store / "lost+found").exists()


# ------------------------------------------------------------------ the object tier


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from seaweed_cluster import running_cluster

    with running_cluster(tmp_path_factory.mktemp("seaweed")) as c:
        yield c


def dropped_store(cluster: Any, path: Path, **open_kw: Any) -> tuple[Any, Any, Any, dict[bytes, bytes]]:
    """A store whose every block is uploaded and its local copy dropped: (store, tier, objects, acked)."""
    from seaweed_cluster import new_bucket, value

    from blockstore.remote import make_object_store
    from blockstore.remote.tier import RemoteTier

    objects = make_object_store(new_bucket(cluster))
    kv = {b"d%02d" % i: value(i) for i in range(12)}
    s = blockstore.open(path, block_size=256 << 10, **open_kw)
    s.put_many(list(kv.items()))
    tier = RemoteTier(s, objects, "node", local_capacity_bytes=0)
    assert tier.drain()
    deadline = time.monotonic() + 20
    while tier.status().dropped_blocks < len(s.block_table()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tier.status().dropped_blocks == len(s.block_table())
    return s, tier, objects, kv


@pytest.mark.parametrize(("on_corrupt", "keep"), [("raise", 100), ("miss", 100), ("miss", 3)])
def test_an_object_truncated_in_the_bucket_is_corruption_not_an_unreachable_store(
        cluster: Any, tmp_path: Path, on_corrupt: str, keep: int) -> None:
    """An object cut (by something else) to 100 bytes, or to a third: S3 answers a ranged GET past its end with
    416 Range Not Satisfiable, which was RemoteUnavailable ("the object store did not answer... retried"),
    with obstore's 30-line debug dump as its message; and on_corrupt="miss" raised (that, or the
    CorruptionError of a range cut short) instead of reading a miss."""
    s, tier, objects, kv = dropped_store(cluster, tmp_path / "s", on_corrupt=on_corrupt)
    try:
        locs = dict(zip(kv, s.locate_many(list(kv))))
        first = locs[b"d00"].block_id  # type: ignore[union-attr]
        key = max((k for k in kv if locs[k].block_id == first), key=lambda k: locs[k].payload_offset)  # type: ignore[union-attr]
        name = next(e.remote_name for e in s.block_table() if e.block_id == first).decode()
        whole = objects.get(name)
        objects.put(name, whole[: keep if keep > 3 else len(whole) // keep])
        if on_corrupt == "miss":
            assert s.get(key) is None
        else:
            with pytest.raises(TruncatedError, match="truncated or replaced in the bucket") as err:
                s.get(key)
            assert "\n" not in str(err.value)
        others = [k for k in kv if locs[k].block_id != first]  # type: ignore[union-attr]
        assert others and [bytes(v) for v in s.get_many(others)] == [kv[k] for k in others]
        objects.put(name, whole)
        assert s.get(key) == kv[key]
    finally:
        tier.close()
        s.close()


# ------------------------------------------------------------------ close while other threads call in


class _BusyHandle:
    """The directory's rocksdict handle while another thread is still inside a call on it: rocksdict refuses
    close() with RuntimeError("Already borrowed") (what it raised in a store closed under 4 threads calling
    put and get_many: 4 of 20 closes) until that call returns."""

    def __init__(self, db: Any, busy: int) -> None:
        self.db, self.busy = db, busy

    def close(self) -> None:
        if self.busy:
            self.busy -= 1
            raise RuntimeError("Already borrowed")
        self.db.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_a_store_closed_while_a_thread_is_in_a_directory_call_can_be_opened_again(tmp_path: Path) -> None:
    """Directory.close() swallowed the refusal: the handle stayed open with RocksDB's LOCK, and every later
    open of the store in the process raised IOErrorBS ("lock hold by current process")."""
    store = tmp_path / "s"
    s = blockstore.open(store, block_size=64 << 10)
    s.put(b"k", b"v" * 3000)
    s.dir._db = _BusyHandle(s.dir._db, busy=3)
    s.close()
    with blockstore.open(store) as again:
        assert again.get(b"k") == b"v" * 3000


def test_a_block_held_across_close_keeps_its_descriptor_until_the_hold_ends(tmp_path: Path) -> None:
    """close() closed every block descriptor, those of blocks a reader held too: a get_many racing close got
    IOErrorBS EBADF (seen in 2 of 6 runs of threads reading while the store closed), and a reader of
    block_read_fd ("valid while the hold lasts") read whatever file took the number next."""
    s = blockstore.open(tmp_path / "s", block_size=64 << 10)
    s.put(b"k", b"v" * 3000)
    loc = s.locate_many([b"k"])[0]
    assert loc is not None
    with s.hold_blocks([loc.block_id]):
        fd = s.block_read_fd(loc.block_id)
        assert fd is not None
        s.close()
        other = os.open(os.devnull, os.O_RDONLY)  # takes the lowest free number: fd's, were it closed
        try:
            assert os.pread(fd, loc.payload_len, loc.payload_offset) == b"v" * 3000
        finally:
            os.close(other)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once the hold ended


def test_a_rebuild_cut_after_the_damaged_directory_moved_keeps_namespace_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory that cannot be read is moved to lost+found, then rebuilt from the blocks with the names
    RocksDB's repair salvages from it (namespace names live only there). Cut after the move (a kill -9, or
    the disk filling up while the new directory is written: exit 8), the next repair found no directory to
    salvage from and named namespace 'a' recovered-ns-2: its 10 keys read as misses under 'a'."""
    store = tmp_path / "s"
    acked = make_store(store, n=10)
    with blockstore.open(store, durability="sync") as s:
        for i in range(10):
            s.put(b"a%02d" % i, bytes([i]) * 5000, ns="a")
    manifest = sorted((store / "directory").glob("MANIFEST-*"))[-1]
    with open(manifest, "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 8)
    from blockstore.directory import Directory

    def cut(*args: object, **kwargs: object) -> None:
        raise Cut("the rebuild's first directory write")

    monkeypatch.setattr(Directory, "write", cut)
    with pytest.raises(Cut):
        repair(store)
    monkeypatch.undo()
    assert cli.main(["fsck", "--repair", str(store)]) == 1
    assert cli.main(["fsck", str(store)]) == 0
    assert_all_read(store, acked)
    with blockstore.open(store, read_only=True) as s:
        assert s.namespaces() == ["a", "default"]
        assert [s.get(b"a%02d" % i, ns="a") for i in range(10)] == [bytes([i]) * 5000 for i in range(10)]


@pytest.mark.parametrize("left", [20_000, 60_000, 80_000, 100_000])
def test_a_rebuild_on_a_full_disk_stops_before_it_loses_namespace_names(tmp_path: Path, left: int) -> None:
    """The same rebuild with `left` bytes free on an 8 MiB tmpfs: the scratch copy of the damaged directory, or
    RocksDB's repair of it, failed for lack of room and was taken for "nothing to salvage" (a copy cut short
    is a shutil.Error, without an errno); the rebuild went on, and namespace 'a' came back as recovered-ns-2
    (with 80 KB free beside a 50 KB directory). Now repair stops with NoSpace (exit 8) before it changes
    anything, and runs whole once there is room."""
    from test_enospc import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "mnt", "8m") as mnt:
        store = mnt / "s"
        acked = make_store(store, n=10)
        with blockstore.open(store, durability="sync") as s:
            for i in range(60):
                s.put(b"a%02d" % i, bytes([i]) * 5000, ns="a")
        manifest = sorted((store / "directory").glob("MANIFEST-*"))[-1]
        with open(manifest, "r+b") as f:
            f.seek(20)
            f.write(b"\xff" * 8)
        st = os.statvfs(mnt)
        with open(mnt / "fill", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - left))
        first = cli.main(["fsck", "--repair", str(store)])
        os.unlink(mnt / "fill")
        assert first in (1, 8)
        assert cli.main(["fsck", "--repair", str(store)]) in (0, 1)
        assert cli.main(["fsck", str(store)]) == 0
        assert_all_read(store, acked)
        with blockstore.open(store, read_only=True) as s:
            assert s.namespaces() == ["a", "default"]
            assert [s.get(b"a%02d" % i, ns="a") for i in range(60)] == [bytes([i]) * 5000 for i in range(60)]


@pytest.mark.parametrize("durability", ["cache", "sync"])
def test_writes_waiting_when_close_begins_are_refused_not_left_in_an_open_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str) -> None:
    """close() waited for the leader slot behind a thread that kept putting (6.8 s here, 14 s in sync mode, with
    a seal observer that takes 0.3 s, as the remote tier's uploader may); and a put that led after close's last
    seal, before the store counted as closed, was acknowledged into a new block: the store was marked clean
    with that block open (fsck: `unsealed`, exit 4), its cache-mode puts never synced."""
    s = blockstore.open(tmp_path / "s", block_size=64 << 10, durability=durability)
    announce = s._engine.announce_sealed

    def slow_observer(ids: list[int]) -> None:
        time.sleep(0.3)
        announce(ids)

    monkeypatch.setattr(s._engine, "announce_sealed", slow_observer)
    acked: dict[bytes, bytes] = {}
    refused: list[BaseException] = []

    def writer() -> None:
        n = 0
        try:
            while True:
                key, value = b"w%d" % n, b"%d" % n * 500
                s.put(key, value)
                acked[key] = value
                n += 1
        except blockstore.BlockstoreError as exc:
            refused.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    s.close()
    t.join(30)
    assert not t.is_alive() and isinstance(refused[0], blockstore.StoreClosed)
    assert cli.main(["fsck", str(tmp_path / "s")]) == 0
    with blockstore.open(tmp_path / "s", read_only=True) as again:
        assert all(again.get(k) == v for k, v in acked.items())
