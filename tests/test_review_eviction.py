"""Review (H7) of Store.evict_blocks beside the remote tier: eviction's sequence-number floor reads each
staying block's footer, and a block whose local copy was dropped has no local footer, so it counted as
holding any sequence number: with one dropped block in the store, every eviction was refused (the L2
adapter then falls back to tombstones). The footer is now read before the drop (tiering.py), for the
session; across a reopen it is unknown again (a proposal to H5 reads it from the object)."""

from __future__ import annotations

import os
from pathlib import Path

from test_review_tiering import CopyFetcher

import blockstore

BLOCK = 64 << 10


def test_eviction_of_the_oldest_block_is_not_refused_because_a_newer_one_was_dropped(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    fetch = CopyFetcher(tmp_path / "objects")
    with blockstore.open(tmp_path / "s", block_size=BLOCK) as s:
        s.set_block_fetcher(fetch)
        for j in range(3):
            s.put_many([(f"b{j}-{i}".encode(), os.urandom(9000)) for i in range(5)])
            s.seal_open_blocks()
        blocks_of = [sorted({loc.block_id for loc in s.locate_many([f"b{j}-{i}".encode() for i in range(5)])
                             if loc is not None}) for j in range(3)]
        for bid in blocks_of[1]:  # newer blocks dropped: their records are all newer than b0's
            s.mark_block_remote(bid, fetch.keep(s, bid))
            assert s.drop_local_copy(bid) > 0
        out = s.evict_blocks(blocks_of[0])  # the oldest: every record below what stays
        assert sorted(out.blocks) == blocks_of[0] and not out.refused, out
        assert s.get(b"b0-0") is None and s.get(b"b1-0") is not None  # the dropped block's keys still read
