"""Placement keeps blocks full however many partitions write at once (issue 16): at seal, blocks hold on
average >= 90 % of the block size with 10 or 10,000 partitions writing interleaved (idle seals off),
where 380 partitions competing for 16 open blocks used to make block files of two records each."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import blockstore
from blockstore.directory import BLOCK_SEALED

BLOCK = 256 << 10  # the seal rule keeps 2 pages free for the footer: 3 % of such a block


def _sealed_fill(s: blockstore.Store) -> tuple[float, int]:
    sealed = [e for e in s.block_table() if e.state == BLOCK_SEALED]
    return sum(e.data_end for e in sealed) / (len(sealed) * BLOCK), len(sealed)


@pytest.mark.parametrize("partitions", [10, 10_000])
def test_blocks_are_full_at_seal_however_many_partitions_write(tmp_path: Path, partitions: int) -> None:
    rng = random.Random(partitions)
    model: dict[bytes, bytes] = {}
    with blockstore.open(tmp_path, block_size=BLOCK, max_open_blocks=16, idle_seal_seconds=0) as s:
        for i in range(6000):
            part = f"p{rng.randrange(partitions)}"
            n = 1 if rng.random() < 0.7 else 3  # lone writes and small batches, as agents save memories
            items = [(b"k%d-%d" % (i, j), rng.randbytes(rng.randint(200, 3000))) for j in range(n)]
            s.put_many(items, partition=part)
            model.update(items)
        fill, sealed = _sealed_fill(s)
        assert sealed >= 40, sealed  # ~15 MB in 256 KiB blocks: the figure is over many seals
        assert fill >= 0.9, f"sealed blocks are {fill:.0%} full on average"
        # open blocks at most max_open_blocks: no block per partition
        assert len(s.block_table()) <= sealed + 16
    with blockstore.open(tmp_path) as s:
        keys = list(model)
        assert [bytes(v) if v is not None else None for v in s.get_many(keys)] == [model[k] for k in keys]


def test_a_partition_that_takes_over_a_block_is_named_by_it(tmp_path: Path) -> None:
    """With every open slot taken, a new partition writing several records goes on filling the least
    recently written open block (no seal), and the block's entry names the partition writing it now."""
    with blockstore.open(tmp_path, block_size=BLOCK, max_open_blocks=2, idle_seal_seconds=0) as s:
        s.put_many([(b"a1", b"x" * 100), (b"a2", b"x" * 100)], partition="a")
        s.put_many([(b"b1", b"x" * 100), (b"b2", b"x" * 100)], partition="b")
        before = {e.block_id for e in s.block_table()}
        s.put_many([(b"c1", b"x" * 100), (b"c2", b"x" * 100)], partition="c")
        table = s.block_table()
        assert {e.block_id for e in table} == before and all(e.state != BLOCK_SEALED for e in table)
        assert sorted(e.partition for e in table) == [b"default\0b", b"default\0c"]
        assert s.locate_many([b"a1"])[0].block_id == s.locate_many([b"c1"])[0].block_id  # type: ignore[union-attr]
