"""GC's floor under a victim's tombstones must see every block that can hold an older record of the key
(issue 16's once-per-pass snapshot of the block table, and the race fsck found beside a live writer).

A copy made while its key was live, whose compare-and-swap then lost to a delete, is a dead record older
than the key's tombstone, in a block made after the floor's snapshot. If that block is sealed before a
victim is judged, it is neither in the snapshot nor open: the floor must still count it, or the
tombstone goes and the dead copy becomes the key's newest record on disk (a rebuild from the blocks
would bring the key back)."""

from __future__ import annotations

from pathlib import Path

import pytest

import blockstore
from blockstore.compaction.gc import MinSeqs
from blockstore.directory import BLOCK_SEALED
from blockstore.keys import SPACE_KV, key_suffix


def test_the_floor_counts_a_block_made_and_sealed_after_its_snapshot(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with blockstore.open(tmp_path / "s", create=True, block_size=64 << 10) as s:
        s.put_many([(b"old", b"o" * 8000)], partition="b")
        for i in range(40):  # newer records fill the partition's blocks: "old"'s block is sealed
            s.put_many([(b"newer-%d" % i, b"n" * 8000)], partition="b")
        [loc] = s.locate_many([b"old"])
        assert loc is not None
        table = {e.block_id: e for e in s.block_table()}
        assert table[loc.block_id].state == BLOCK_SEALED
        floor = MinSeqs(s)
        floor.snapshot()
        # the compactor copies "old" (live when read) out of its block into a block of its own, made after
        # the snapshot; say the key is deleted meanwhile: the copy is a dead record at "old"'s sequence number
        nid = s.namespace_id("default")
        assert nid is not None
        [payload] = s.read_locations([loc])
        assert s.relocate_many([(key_suffix(nid, SPACE_KV, b"old"), loc, payload)], partition=b"copies") == [True]
        [made] = [e.block_id for e in s.block_table() if e.block_id not in table]
        # ... and that block is sealed before the next victim is judged: it is no longer among the open blocks
        opened = s.open_block_min_seqs()
        monkeypatch.setattr(s, "open_block_min_seqs", lambda: {b: v for b, v in opened.items() if b != made})
        # with "old"'s own block gone (GC's victim), the copy is the only older record of the key left
        assert floor.lowest_elsewhere(loc.block_id) <= loc.seq, "the floor missed the block made since its snapshot"
