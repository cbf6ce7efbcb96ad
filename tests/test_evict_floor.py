"""Eviction's sequence floor (blockstore/seqfloor.py; issue 16):

- the floor equals the one computed the slow way (every block of the table: open blocks' lowest sequence
  numbers, sealed blocks' footers read from disk, blocks of nothing but tombstones left out) after any history
  of puts, overwrites, deletes, relocations, evictions and reopens;
- its cost follows the work: with hundreds of sealed blocks, a floor looks at the blocks it excludes and
  those gone since, not at the table, and no footer is read again for a block sealed in this session;
- a block whose local copy the remote tier dropped keeps its lowest sequence number across a reopen (a
  directory counter written at its seal, deleted with it): eviction of older blocks is not refused for it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from compaction_helpers import value
from test_review_tiering import CopyFetcher

import blockstore
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.seqfloor import NO_FLOOR, min_seq_name
from blockstore.store import Store

BLOCK = 64 << 10
SIZE = 8000  # four records a block


def _open(path: Path) -> Store:
    return blockstore.open(path, create=True, block_size=BLOCK, durability="cache")


def _floor_the_slow_way(s: Store, exclude: set[int]) -> int:
    """What the floor was before its index: every block of the table, footers read from the files."""
    eng = s._engine
    opened = eng._placement.min_seqs()
    low = NO_FLOOR
    for bid, e in list(eng.table.items()):
        if bid in exclude:
            continue
        if bid in opened or e.state == BLOCK_OPEN:
            seq = opened.get(bid, 0)
            if not seq and e.total_records == 0:
                continue
        elif e.total_records == e.tombstones:
            continue
        else:
            fd = eng.backend.open_ro(eng.blocks.path(bid))
            try:
                footer = eng.blocks.read_footer(fd)
            finally:
                eng.backend.close(fd)
            seq = 0 if footer is None else footer.min_seq
        low = min(low, seq)
    for bid, seq in opened.items():
        if bid not in exclude and seq:
            low = min(low, seq)
    return low


def _check_floor(s: Store, rng: random.Random) -> None:
    sealed = sorted(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
    for exclude in (set(), set(sealed[: rng.randint(0, len(sealed))]), set(rng.sample(sealed, len(sealed) // 2))):
        with s._engine.slot.exclusive():
            assert s._engine.seq_floor.floor(exclude) == _floor_the_slow_way(s, exclude), sorted(exclude)


def test_the_indexed_floor_equals_the_slow_one_through_a_random_history(tmp_path: Path) -> None:
    rng = random.Random(15)
    p = tmp_path / "s"
    s = _open(p)
    live: set[bytes] = set()
    try:
        for step in range(400):
            r = rng.random()
            k = b"k%d" % rng.randrange(120)
            if step % 100 == 99:
                s.close()
                s = _open(p)
            elif r < 0.6:
                s.put_many([(k, value(k, step, rng.choice((3000, SIZE))))], partition=rng.choice((None, None, "p1")))
                live.add(k)
            elif r < 0.67:
                s.delete(k)
                live.discard(k)
            elif r < 0.72 and k in live:
                nid = s.namespace_id("default")
                assert nid is not None
                [loc] = s.locate_many([k])
                assert loc is not None
                [payload] = s.read_locations([loc])
                s.relocate_many([(key_suffix(nid, SPACE_KV, k), loc, payload)], partition=b"moves")
            elif r < 0.85:
                sealed = sorted(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
                out = s.evict_blocks(sealed[: rng.randint(1, max(1, len(sealed)))])
                live -= {sfx[5:] for sfx, _loc in out.records}
            if step % 7 == 0:
                _check_floor(s, rng)
    finally:
        s.close()


class _CountingTable(dict[int, Any]):
    """The block table, counting the entries looked at: by id, or all of them in a walk."""

    gets = 0

    def get(self, key: int, default: Any = None) -> Any:
        _CountingTable.gets += 1
        return super().get(key, default)

    def items(self) -> Any:
        _CountingTable.gets += len(self)
        return super().items()

    def values(self) -> Any:
        _CountingTable.gets += len(self)
        return super().values()


def test_a_floor_costs_the_blocks_it_excludes_not_the_table(tmp_path: Path, monkeypatch: Any) -> None:
    s = _open(tmp_path / "s")
    try:
        for i in range(4 * 300):  # ~300 sealed blocks
            k = b"k%d" % i
            s.put_many([(k, value(k, 1, SIZE))])
        eng = s._engine
        sealed = sorted(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
        assert len(sealed) >= 250
        reads: list[int] = []
        real_read_footer = eng.blocks.read_footer
        monkeypatch.setattr(eng.blocks, "read_footer", lambda fd: reads.append(fd) or real_read_footer(fd))
        assert s.evict_blocks(sealed[:2]).blocks == sealed[:2]
        assert reads == []  # sealed in this session: the seal recorded what the footer says
        eng.table = _CountingTable(eng.table)
        for n in (1, 3, 8):
            victims = sorted(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)[:n]
            _CountingTable.gets = 0
            with eng.slot.exclusive():
                floor = eng.seq_floor.floor(set(victims))
            assert _CountingTable.gets <= n + 4, (n, _CountingTable.gets)  # the excluded, one more, stale ones
            assert floor == _floor_the_slow_way(s, set(victims))
            assert s.evict_blocks(victims).blocks == victims
    finally:
        s.close()


def test_a_dropped_block_does_not_stop_eviction_after_a_reopen(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    fetch = CopyFetcher(tmp_path / "objects")
    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        for j in range(3):
            s.put_many([(f"b{j}-{i}".encode(), value(b"%d" % i, j, SIZE)) for i in range(6)])
            s.seal_open_blocks()
        blocks_of = [sorted({loc.block_id for loc in s.locate_many([f"b{j}-{i}".encode() for i in range(6)])
                             if loc is not None}) for j in range(3)]
        s.set_block_fetcher(fetch)
        for bid in blocks_of[1]:  # newer blocks dropped: their records are all newer than b0's
            s.mark_block_remote(bid, fetch.keep(s, bid))
            assert s.drop_local_copy(bid) > 0
    with blockstore.open(path, block_size=BLOCK) as s:  # the footers of the dropped blocks are not on disk
        s.set_block_fetcher(fetch)
        assert all(s.dir.get_meta(min_seq_name(bid)) for bid in blocks_of[1])
        out = s.evict_blocks(blocks_of[0])
        assert sorted(out.blocks) == blocks_of[0] and not out.refused, out
        assert s.get(b"b0-0") is None and s.get(b"b1-0") is not None
        assert all(s.dir.get_meta(min_seq_name(bid)) is None for bid in blocks_of[0])  # gone with their blocks
        out = s.evict_blocks(blocks_of[2])  # newer than a dropped block that stays: its number says so
        assert out.refused == blocks_of[2]
