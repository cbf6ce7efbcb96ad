"""Copies of shared records (docs/copies.md; invariant 8): the directory value lists every placed copy,
a read takes the copy in a block the request touches anyway, a put or delete retires every copy in
its own batch, every copy change is a compare-and-swap on the whole value, and GC, recovery, fsck and
repair see copies as live exactly while the value names them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import blockstore
from blockstore.compaction import attach, clusters, gc
from blockstore.compaction.affinity import Group
from blockstore.directory import CopyPlace, Location
from blockstore.errors import CorruptionError, FormatVersionError, InvalidArgument
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.reader import choose_places
from blockstore.tools import fsck
from blockstore.tools.repair import repair

COPIES = b"\0compaction/copies"


def _loc(bid: int, off: int, seq: int = 7) -> Location:
    return Location(1, 0, 64, bid, off, 1000, 900, seq, 0xABC, b"meta")


def test_value_without_copies_is_still_version_1_and_round_trips() -> None:
    plain = _loc(3, 4096)
    assert plain.encode()[0] == 1  # what every older build reads
    assert Location.decode(plain.encode()) == plain
    two = plain.with_copy(_loc(9, 8192)).with_copy(_loc(12, 4096))
    raw = two.encode()
    assert raw[0] == 2
    back = Location.decode(raw)
    assert back == two and back.meta == b"meta"
    assert [(p.block_id, p.offset) for p in back.places()] == [(3, 4096), (9, 8192), (12, 4096)]
    assert back.holds(9, 8192) and not back.holds(9, 4096)
    assert back.without(9, 8192).copies == (CopyPlace(12, 4096, 1000, 64, 0),)
    promoted = back.without(3, 4096)  # the primary goes: the first copy takes its place
    assert (promoted.block_id, promoted.offset, promoted.copies) == (9, 8192, (CopyPlace(12, 4096, 1000, 64, 0),))


def test_damaged_copy_lists_are_corruption_not_guesses() -> None:
    raw = _loc(3, 4096).with_copy(_loc(9, 8192)).encode()
    with pytest.raises(CorruptionError):
        Location.decode(raw[:70])  # ends inside the copy list
    with pytest.raises(CorruptionError):
        Location.decode(raw[:56] + b"\x00" + raw[57:])  # version 2 with no copy
    with pytest.raises(FormatVersionError):
        Location.decode(b"\x03" + raw[1:])


def test_reads_take_the_copy_in_a_block_the_request_touches_anyway() -> None:
    shared = _loc(1, 4096).with_copy(_loc(2, 4096))
    other = _loc(2, 9000)
    chosen = choose_places([shared, other, None])
    assert chosen[0] is not None and chosen[0].block_id == 2 and not chosen[0].copies
    assert chosen[1] == other and chosen[2] is None
    # alone, it is read at its primary
    assert choose_places([shared])[0] == shared.primary()
    # two records with copies and no other block: the block that serves both is chosen
    a = _loc(1, 4096).with_copy(_loc(5, 4096))
    b = _loc(2, 4096).with_copy(_loc(5, 8192))
    assert {loc.block_id for loc in choose_places([a, b]) if loc is not None} == {5}


def _store(tmp_path: Path, backend: str) -> blockstore.Store:
    return blockstore.open(tmp_path, block_size=1 << 20, backend=backend)


def _sfx(s: blockstore.Store, key: bytes) -> bytes:
    return key_suffix(s.namespace_id("default"), SPACE_KV, key)  # type: ignore[arg-type]


def _place_copy(s: blockstore.Store, key: bytes) -> Location:
    sfx = _sfx(s, key)
    value = s.dir.get_locations([sfx])[0]
    assert value is not None
    payload = s.read_locations([value.primary()])[0]
    assert s.place_copies([(sfx, value, payload)], partition=COPIES) == [True]
    now = s.dir.get_locations([sfx])[0]
    assert now is not None
    return now


def _clean(path: Path) -> None:
    rep = fsck.check(path, log=False)
    assert [f.line() for f in rep.findings] == []


def _live(s: blockstore.Store) -> dict[int, int]:
    return {e.block_id: e.live_records for e in s.block_table()}


def test_a_copy_is_counted_read_and_retired_by_a_put(tmp_path: Path, backend: str) -> None:
    with _store(tmp_path, backend) as s:
        s.put_many([(b"shared", b"S" * 5000), (b"a", b"A" * 5000)], partition="one")
        value = _place_copy(s, b"shared")
        assert len(value.copies) == 1
        copy_block = value.copies[0].block_id
        assert copy_block != value.block_id and _live(s)[copy_block] == 1
        assert s.get(b"shared") == b"S" * 5000
        s.close()
        _clean(tmp_path)  # reverse entries, block counters and the copy's bytes agree with the value
    with _store(tmp_path, backend) as s:
        assert s.locate_many([b"shared"])[0] == value  # the copy survives a reopen
        s.put(b"shared", b"new")  # a put retires the primary and every copy in one batch
        assert s.get(b"shared") == b"new"
        assert not s.locate_many([b"shared"])[0].copies  # type: ignore[union-attr]
        assert list(s.dir.block_records(copy_block)) == []
        assert _live(s).get(copy_block, 0) == 0
    _clean(tmp_path)


def test_a_delete_retires_every_copy(tmp_path: Path, backend: str) -> None:
    with _store(tmp_path, backend) as s:
        s.put(b"k", b"v" * 3000)
        value = _place_copy(s, b"k")
        assert s.delete(b"k")
        assert s.get(b"k") is None
        assert all(list(s.dir.block_records(p.block_id)) == [] for p in value.places())
    _clean(tmp_path)
    with _store(tmp_path, backend) as s:
        assert s.get(b"k") is None


def test_copy_changes_compare_the_whole_value(tmp_path: Path, backend: str) -> None:
    with _store(tmp_path, backend) as s:
        s.put(b"k", b"v1" * 1000)
        sfx = _sfx(s, b"k")
        stale = s.dir.get_locations([sfx])[0]
        assert stale is not None
        payload = s.read_locations([stale])[0]
        s.put(b"k", b"v2" * 1000)  # overwritten between the read and the copy
        assert s.place_copies([(sfx, stale, payload)], partition=COPIES) == [False]
        assert s.get(b"k") == b"v2" * 1000 and not s.locate_many([b"k"])[0].copies  # type: ignore[union-attr]
        # a copy placed meanwhile changes the value too: a change computed from the older value loses
        before = s.dir.get_locations([sfx])[0]
        assert before is not None
        with_copy = _place_copy(s, b"k")
        assert s.place_copies([(sfx, before, s.read_locations([before])[0])], partition=COPIES) == [False]
        assert s.dir.get_locations([sfx])[0] == with_copy
        with pytest.raises(InvalidArgument):
            s.place_copies([], partition=COPIES, drops=[(sfx, before, before)])  # nothing would be left
    _clean(tmp_path)


def test_gc_drops_copies_instead_of_copying_them(tmp_path: Path, backend: str) -> None:
    with _store(tmp_path, backend) as s:
        s.put_many([(b"k%d" % i, bytes([i]) * 20_000) for i in range(8)], partition="p")
        copied = [_place_copy(s, b"k%d" % i) for i in range(4)]
        copy_block = copied[0].copies[0].block_id
        primary_block = copied[0].block_id
        s.seal_open_blocks()
        entry = next(e for e in s.block_table() if e.block_id == copy_block)
        res = gc.collect(s, entry, gc.MinSeqs(s))
        assert res.copies_dropped == 4 and res.moved == 0
        assert copy_block in s.sync_moves()  # emptied: it goes once a synced directory write names that
        assert [s.get(b"k%d" % i) for i in range(8)] == [bytes([i]) * 20_000 for i in range(8)]
        assert not any(loc.copies for loc in s.locate_many([b"k%d" % i for i in range(8)]))  # type: ignore[union-attr]
        # the primary's block collected while a copy exists: the copy becomes the primary, nothing copied
        copied = [_place_copy(s, b"k%d" % i) for i in range(8)]
        s.seal_open_blocks()
        entry = next(e for e in s.block_table() if e.block_id == primary_block)
        res = gc.collect(s, entry, gc.MinSeqs(s))
        assert res.copies_dropped == 8 and res.moved == 0
        assert primary_block in s.sync_moves()
        now = s.locate_many([b"k%d" % i for i in range(8)])
        assert all(loc is not None and loc.block_id != primary_block and not loc.copies for loc in now)
        assert [s.get(b"k%d" % i) for i in range(8)] == [bytes([i]) * 20_000 for i in range(8)]
    _clean(tmp_path)


def test_fsck_flags_a_copy_whose_bytes_differ_and_repair_keeps_the_key(tmp_path: Path, backend: str) -> None:
    with _store(tmp_path, backend) as s:
        s.put(b"k", b"x" * 10_000)
        value = _place_copy(s, b"k")
    copy = value.at(value.copies[0])
    with open(os.path.join(tmp_path, "blocks", f"{copy.block_id:016x}.blk"), "r+b") as f:
        f.seek(copy.payload_offset + 100)
        f.write(b"y")
    rep = fsck.check(tmp_path, log=False)
    assert any(f.block == copy.block_id for f in rep.findings), [f.line() for f in rep.findings]
    repair(tmp_path)
    _clean(tmp_path)
    with _store(tmp_path, backend) as s:
        assert s.get(b"k") == b"x" * 10_000


def test_a_cluster_borrows_the_records_its_groups_read_elsewhere_within_its_bounds() -> None:
    """Two groups share record s; each cluster is full enough that they cannot merge. The second
    group's cluster borrows s (a copy rides with its next rewrite), within capacity and copies left."""
    g1 = Group(1, (b"a1", b"a2", b"s"), 5.0, 0)
    g2 = Group(2, (b"b1", b"b2", b"s"), 4.0, 0)
    sizes = {b"a1": 300, b"a2": 300, b"s": 200, b"b1": 300, b"b2": 300}
    built = clusters.build([(g1, True), (g2, True)], sizes, 1000)
    owner = {k: c for c in built for k in c.keys}
    assert owner[b"s"] is not owner[b"b1"]  # the tug-of-war copies are for
    clusters.borrow(built, [(g1, True), (g2, True)], sizes, 1000, {k: 1 for k in sizes})
    assert owner[b"b1"].borrowed == [b"s"] and owner[b"b1"].borrowed_bytes == 200
    assert owner[b"s"].borrowed == []
    # no copy left to give, or no room: nothing borrowed
    again = clusters.build([(g1, True), (g2, True)], sizes, 1000)
    clusters.borrow(again, [(g1, True), (g2, True)], sizes, 1000, {k: 0 for k in sizes})
    assert all(not c.borrowed for c in again)
    tight = clusters.build([(g1, True), (g2, True)], sizes, 700)
    clusters.borrow(tight, [(g1, True), (g2, True)], sizes, 700, {k: 1 for k in sizes})
    assert all(not c.borrowed for c in tight)


def test_compaction_places_a_copy_so_each_request_reads_one_block(tmp_path: Path, backend: str) -> None:
    """Two requests share record s and cannot share a block (each is most of one): with max_copies=1
    each ends in one block, s read from the one it touches; an overwrite of s then retires its copy."""
    big = 150_000
    first = [b"a%d" % i for i in range(4)]
    second = [b"b%d" % i for i in range(4)]
    with blockstore.open(tmp_path, block_size=1 << 20, backend=backend) as s:
        for i, k in enumerate([*first, b"s", *second]):  # each in its own stream: scattered
            s.put_many([(k, bytes([i]) * big)], partition=f"p{i}")
        comp = attach(s, {"policy": "full", "max_copies": 1, "min_hits": 1, "relocation_slack": 0,
                          "relocation_budget": 1e9, "gc_invalid_ratio": 0.3}, background=False)
        for _ in range(3):
            for req in ([*first, b"s"], [*second, b"s"]):
                s.get_many(req)
            comp.run_pass()
        placed = comp.totals.copies_placed
        shared = s.locate_many([b"s"])[0]
        assert placed >= 1 and shared is not None and len(shared.copies) == 1
        for req in ([*first, b"s"], [*second, b"s"]):
            assert len({loc.block_id for loc in choose_places(s.locate_many(req)) if loc is not None}) == 1
        assert s.get_many([*first, b"s"]) == [bytes([i]) * big for i in range(5)]
        s.put(b"s", b"new")
        assert s.get(b"s") == b"new" and not s.locate_many([b"s"])[0].copies  # type: ignore[union-attr]
        comp.stop()
    _clean(tmp_path)


def test_copies_racing_writers_and_gc_in_threads_never_serve_old_bytes(tmp_path: Path, backend: str) -> None:
    """A writer overwrites and deletes keys while another thread places copies of them and a third
    drops places and runs GC: every read returns the writer's latest bytes (or a miss after a delete),
    and the store checks clean afterwards (invariant 8 under real concurrency)."""
    keys = [b"k%d" % i for i in range(12)]
    latest: dict[bytes, bytes | None] = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    with blockstore.open(tmp_path, block_size=256 << 10, backend=backend) as s:
        nid = s.namespace_id("default")

        def guard(fn: object) -> object:
            def run() -> None:
                try:
                    fn()  # type: ignore[operator]
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
                    stop.set()
            return run

        def writer() -> None:
            for i in range(400):
                k = keys[i % len(keys)]
                with lock:
                    if i % 7 == 3:
                        s.delete(k)
                        latest[k] = None
                    else:
                        v = b"%d:" % i + bytes([i % 251]) * (2000 + 37 * i)
                        s.put(k, v)
                        latest[k] = v
            stop.set()

        def copier() -> None:
            while not stop.is_set():
                for k in keys:
                    sfx = key_suffix(nid or s.namespace_id("default") or 0, SPACE_KV, k)
                    value = s.dir.get_locations([sfx])[0]
                    if value is None:
                        continue
                    try:
                        payload = s.read_locations([value.primary()])[0]
                    except blockstore.BlockstoreError:
                        continue  # its block went meanwhile
                    if not value.copies:
                        s.place_copies([(sfx, value, payload)], partition=COPIES)
                    else:
                        s.place_copies([], partition=COPIES, drops=[(sfx, value, value.places()[0])])

        def collector() -> None:
            while not stop.is_set():
                for e in s.block_table():
                    if e.state == 2 and e.invalid_ratio > 0.3:
                        gc.collect(s, e, gc.MinSeqs(s))

        def reader() -> None:
            while not stop.is_set():
                with lock:  # the writer's last acknowledged state, read while it cannot change
                    want = [latest.get(k) for k in keys]
                    got = [None if v is None else bytes(v) for v in s.get_many(keys)]
                for k, w, g in zip(keys, want, got):
                    if k in latest:
                        assert g == w, (k, "a read returned other bytes than the last write")

        threads = [threading.Thread(target=guard(f)) for f in (writer, copier, collector, reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert [None if v is None else bytes(v) for v in s.get_many(keys)] == [latest.get(k) for k in keys]
    _clean(tmp_path)
