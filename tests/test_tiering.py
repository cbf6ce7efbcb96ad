"""The engine's seams for the object-store tier (blockstore/tiering.py), without an object store: seal
observers, the remote flag, dropping a local copy only once flagged, the read fallback through a fetcher
(verified as a local read), recovery and fsck that know the flag, and `durability="remote"`'s wait.
The same seams on a real SeaweedFS cluster: tests/test_remote_tier.py."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

import blockstore
from blockstore import RemoteNotConfirmed
from blockstore.directory import BLOCK_SEALED, BlockEntry
from blockstore.errors import ChecksumMismatch, CorruptionError, InvalidArgument, IOErrorBS
from blockstore.tools.fsck import check

BLOCK = 64 << 10


def _values(n: int, size: int = 3000) -> dict[bytes, bytes]:
    return {f"k{i:04d}".encode(): os.urandom(size) for i in range(n)}


class CopyFetcher:
    """Stands in for the object store: block files copied aside before their local copies are dropped;
    serves byte ranges of them and counts the calls (one per coalesced run)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[tuple[int, list[tuple[int, int]]]] = []
        self.flip_at: int | None = None  # a byte offset inside the block file to return corrupted

    def keep(self, store: blockstore.Store, bid: int) -> bytes:
        name = f"obj-{bid:016x}".encode()
        shutil.copyfile(store.blocks.path(bid), self.folder / name.decode())
        return name

    def __call__(self, bid: int, name: bytes, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls.append((bid, list(ranges)))
        raw = (self.folder / name.decode()).read_bytes()
        out = []
        for start, end in ranges:
            piece = bytearray(raw[start:end])
            if self.flip_at is not None and start <= self.flip_at < end:
                piece[self.flip_at - start] ^= 0xFF
            out.append(bytes(piece))
        return out


def test_block_entry_keeps_its_remote_name_and_old_entries_decode() -> None:
    e = BlockEntry(7, BLOCK_SEALED, b"part", written_bytes=5, remote_name=b"blocks/n/7-abc")
    assert BlockEntry.decode(7, e.encode()) == e
    plain = BlockEntry(7, BLOCK_SEALED, b"part")
    assert BlockEntry.decode(7, plain.encode()).remote_name == b""
    with pytest.raises(CorruptionError):
        BlockEntry.decode(7, e.encode()[:-1])  # the name cut short


def test_seal_observers_hear_rotation_explicit_seals_and_close(tmp_path: Path) -> None:
    seen: list[int] = []
    s = blockstore.open(tmp_path / "s", block_size=BLOCK)
    s.add_seal_observer(seen.append)
    s.put_many(list(_values(40).items()))  # 120 KB into 64 KiB blocks: rotations
    rotated = list(seen)
    assert rotated and all(s.has_block(b) for b in rotated)
    sealed_now = s.seal_open_blocks()
    assert sealed_now and seen[len(rotated):] == sealed_now
    states = {e.block_id: e.state for e in s.block_table()}
    assert all(states[b] == BLOCK_SEALED for b in seen)
    s.put(b"late", b"x" * 100)
    n = len(seen)
    s.close()
    assert len(seen) == n + 1  # the close sealed the block holding "late"
    with pytest.raises(InvalidArgument):
        blockstore.open(tmp_path / "t").add_seal_observer("not callable")  # type: ignore[arg-type]


def test_drop_local_copy_only_when_flagged_and_read_back_through_the_fetcher(tmp_path: Path) -> None:
    vals = _values(30)
    fetch = CopyFetcher(tmp_path)
    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK, durability="sync") as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        table = s.block_table()
        bid = table[0].block_id
        with pytest.raises(InvalidArgument, match="no confirmed remote copy"):
            s.drop_local_copy(bid)  # nothing flags it: its file is the only copy
        assert s.has_local_copy(bid)
        name = fetch.keep(s, bid)
        assert s.mark_block_remote(bid, name)
        assert s.mark_block_remote(bid, name)  # idempotent
        assert not s.mark_block_remote(10**9, b"nope")  # a block that does not exist: nothing recorded
        size = os.path.getsize(s.blocks.path(bid))
        assert s.drop_local_copy(bid) == size
        assert not s.has_local_copy(bid) and s.drop_local_copy(bid) == 0
        in_dropped = [k for k, loc in zip(vals, s.locate_many(list(vals))) if loc is not None and loc.block_id == bid]
        assert in_dropped
        with pytest.raises(IOErrorBS, match="dropped .* no remote tier"):
            s.get_many(in_dropped)  # no fetcher attached: says what happened and what to do
        s.set_block_fetcher(fetch)
        got = s.get_many(in_dropped)
        assert [bytes(g) for g in got] == [vals[k] for k in in_dropped]
        assert len(fetch.calls) == 1 and len(fetch.calls[0][1]) == 1  # neighbours: one coalesced range
        assert s.get(in_dropped[0]) == vals[in_dropped[0]]
        loc = s.locate_many([in_dropped[1]])[0]
        assert loc is not None
        assert bytes(s.read_locations([loc])[0]) == vals[in_dropped[1]]  # compaction's path too
        fetch.flip_at = loc.payload_offset + 10
        with pytest.raises(ChecksumMismatch):
            s.get_many(in_dropped)  # a corrupt object: an error, never wrong bytes
        with pytest.raises(ChecksumMismatch):
            s.read_locations([loc])
        fetch.flip_at = None
    # the flag and the dropped copy survive a reopen and a recovery; fsck calls neither damage
    rep = check(path)
    assert not rep.findings, [f.message for f in rep.findings]
    assert any("dropped" in n and name.decode() in n for n in rep.notes), rep.notes
    with blockstore.open(path, block_size=BLOCK) as s:
        assert not s.has_local_copy(bid) and s.block_table()[0].remote_name == name
        s.set_block_fetcher(fetch)
        assert [bytes(g) for g in s.get_many(list(vals))] == list(vals.values())
        s.abandon()  # as kill -9 leaves it
    with blockstore.open(path, block_size=BLOCK) as s:
        assert s.recovery_report is not None and not s.recovery_report["missing_blocks"]
        s.set_block_fetcher(fetch)
        assert [bytes(g) for g in s.get_many(list(vals))] == list(vals.values())
    assert not check(path).findings


def test_mark_block_remote_refuses_an_open_block(tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s", block_size=BLOCK) as s:
        s.put(b"a", b"1")
        bid = s.block_table()[0].block_id
        with pytest.raises(InvalidArgument, match="not sealed"):
            s.mark_block_remote(bid, b"x")
        with pytest.raises(InvalidArgument):
            s.mark_block_remote(bid, b"")


class Confirmer:
    """A stand-in remote tier: confirms each sealed block on its own thread (or never, when stalled)."""

    def __init__(self, store: blockstore.Store) -> None:
        self.store = store
        self.stalled = threading.Event()
        self.confirmed: list[int] = []

    def __call__(self, bid: int) -> None:
        if not self.stalled.is_set():
            threading.Thread(target=self._confirm, args=(bid,)).start()

    def _confirm(self, bid: int) -> None:
        if self.store.mark_block_remote(bid, f"obj-{bid}".encode()):
            self.confirmed.append(bid)


def test_remote_durability_waits_for_confirmation_and_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with pytest.raises(InvalidArgument, match="remote_timeout"):
        blockstore.open(path, durability="remote", remote_timeout=-1)
    with blockstore.open(path, durability="remote", block_size=BLOCK, remote_seal_seconds=0.05,
                         remote_timeout=0.5) as s:
        with pytest.raises(InvalidArgument, match="no remote tier"):
            s.put(b"first", b"v")
        assert s.get(b"first") is None  # refused before anything was written
        tier = Confirmer(s)
        s.add_seal_observer(tier)
        s.put(b"k1", b"v1")  # returns only once its block is sealed and confirmed
        table = {e.block_id: e for e in s.block_table()}
        loc = s.locate_many([b"k1"])[0]
        assert loc is not None and table[loc.block_id].remote_name == f"obj-{loc.block_id}".encode()
        assert s.delete(b"k1")  # a delete waits too
        assert all(e.remote_name for e in s.block_table())
        tier.stalled.set()  # the object store stops answering
        with pytest.raises(RemoteNotConfirmed, match="durable locally"):
            s.put(b"k2", b"v2")
        assert s.get(b"k2") == b"v2"  # durable locally, readable, queued
        tier.stalled.clear()
        pending = [e.block_id for e in s.block_table() if not e.remote_name]
        for bid in pending:
            tier(bid)
        s.put(b"k3", b"v3")  # the queue drains: later puts are confirmed again
    with blockstore.open(path) as s:  # reopened in cache mode: nothing is lost
        assert s.get(b"k2") == b"v2" and s.get(b"k3") == b"v3" and s.get(b"k1") is None


def test_remote_puts_from_many_threads_each_return_only_once_their_block_is_confirmed(tmp_path: Path) -> None:
    unconfirmed_at_ack: list[bytes] = []
    with blockstore.open(tmp_path / "s", durability="remote", block_size=BLOCK, remote_seal_seconds=0.01,
                         remote_timeout=20.0) as s:
        s.add_seal_observer(Confirmer(s))

        def writer(t: int) -> None:
            for i in range(15):
                key = f"t{t}-{i}".encode()
                s.put(key, os.urandom(2000), partition=f"p{t % 3}")
                loc = s.locate_many([key])[0]
                table = {e.block_id: e for e in s.block_table()}
                if loc is None or not table[loc.block_id].remote_name:
                    unconfirmed_at_ack.append(key)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert unconfirmed_at_ack == []
        assert len(list(s.iter_keys())) == 90


def test_restore_local_copy_checks_the_bytes_and_reads_go_local_again(tmp_path: Path) -> None:
    vals = _values(20)
    fetch = CopyFetcher(tmp_path)
    with blockstore.open(tmp_path / "s", block_size=BLOCK) as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        bid, other = s.block_table()[0].block_id, s.block_table()[1].block_id
        with pytest.raises(InvalidArgument, match="never dropped"):
            s.restore_local_copy(bid, b"")
        name = fetch.keep(s, bid)
        s.mark_block_remote(bid, name)
        s.mark_block_remote(other, fetch.keep(s, other))
        s.drop_local_copy(bid)
        s.set_block_fetcher(fetch)
        good = (tmp_path / name.decode()).read_bytes()
        with pytest.raises(CorruptionError):
            s.restore_local_copy(bid, good[:-1])  # short
        with pytest.raises(CorruptionError):  # another block's bytes
            s.restore_local_copy(bid, (tmp_path / f"obj-{other:016x}").read_bytes()[: len(good)].ljust(len(good),
                                                                                                      b"\0"))
        assert not s.has_local_copy(bid)
        assert s.restore_local_copy(bid, good)
        assert s.has_local_copy(bid) and not s.restore_local_copy(bid, good)  # already there
        fetch.calls.clear()
        assert [bytes(v) for v in s.get_many(list(vals))] == list(vals.values())
        assert fetch.calls == []  # read from the local disk again
    assert not check(tmp_path / "s").findings
