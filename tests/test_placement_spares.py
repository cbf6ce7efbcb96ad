"""A relocated cluster (up to a block) that does not fit its partition's open block leaves that block
open as a spare when a quarter of it or more is free, instead of sealing it short, and goes to the
spare it fits best, which the partition then continues (its next records follow the cluster). Sealing
short made SWE-shaped blocks 0.65-0.83 full at seal (docs/compaction.md, "Fill at seal"). A user's
record that does not fit still seals the block (tests/test_store_api.py)."""

from __future__ import annotations

from pathlib import Path

import blockstore
from blockstore.directory import BLOCK_SEALED
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.store import Store

BLOCK = 256 << 10


def _move(s: Store, key: bytes, partition: bytes) -> None:
    """Relocate `key` into `partition`'s open block, as compaction does (one cluster, together)."""
    nid = s.namespace_id("default")
    assert nid is not None
    sfx = key_suffix(nid, SPACE_KV, key)
    loc = s.dir.get_locations([sfx])[0]
    assert loc is not None
    assert s.relocate_many([(sfx, loc, s.read_locations([loc])[0])], partition=partition, together=True) == [True]


def _sealed(s: Store) -> set[int]:
    return {e.block_id for e in s.block_table() if e.state == BLOCK_SEALED}


def test_a_cluster_that_does_not_fit_leaves_a_spare_that_a_later_cluster_fills(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, block_size=BLOCK, max_open_blocks=16, idle_seal_seconds=0) as s:
        s.put_many([(b"r1", b"a" * (100 << 10))], partition="p")
        s.put_many([(b"x", b"b" * (180 << 10))], partition="q")
        s.put_many([(b"y", b"c" * (120 << 10))], partition="q2")
        (r1,) = s.locate_many([b"r1"])
        assert r1 is not None
        home = next(e.partition for e in s.block_table() if e.block_id == r1.block_id)
        before = _sealed(s)
        _move(s, b"x", home)  # does not fit after r1 (156 KiB free): r1's block stays open as a spare
        _move(s, b"y", home)  # does not fit after x (76 KiB free): goes to r1's spare, the best fit
        s.put_many([(b"r4", b"d" * 1000)], partition="p")  # the partition continues where y went
        r1, x, y, r4 = s.locate_many([b"r1", b"x", b"y", b"r4"])
        assert r1 is not None and x is not None and y is not None and r4 is not None
        assert y.block_id == r1.block_id != x.block_id
        assert r4.block_id == y.block_id and r4.offset > y.offset
        assert _sealed(s) == before  # neither move sealed a block short


def test_a_nearly_full_block_is_still_sealed(tmp_path: Path) -> None:
    """Under a quarter of the block free: the cluster seals it as before, no spare."""
    with blockstore.open(tmp_path, block_size=BLOCK, max_open_blocks=16, idle_seal_seconds=0) as s:
        s.put_many([(b"r1", b"a" * (200 << 10))], partition="p")
        s.put_many([(b"x", b"b" * (100 << 10))], partition="q")
        (r1,) = s.locate_many([b"r1"])
        assert r1 is not None
        home = next(e.partition for e in s.block_table() if e.block_id == r1.block_id)
        _move(s, b"x", home)
        assert r1.block_id in _sealed(s)
