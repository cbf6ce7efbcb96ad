"""What the kill -9, power-loss and fault loops share to exercise placement across namespaces. Not a test module.

A loop's workload writes into every namespace of `NAMESPACES` (each one a tenant with its own lineages:
placement_choice.py), small records and large ones (1/16 of the loop's block or more: where a namespace's
reads draw among its many small records, its large records go to a second lineage, `large_lineage(ns)`,
and this is what lets the loops see that they did), and reads the small records of a namespace drawn at
random (`draw`), which is the evidence placement takes that decision on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from blockstore import Store
from blockstore.placement_choice import large_lineage

# three tenants: the default namespace (the store's first, whose lineage continues the block its last partition
# wrote) and two more
NAMESPACES = ("default", "t1", "t2")
LARGE_DIV = 16  # a record of block_size // LARGE_DIV bytes or more is large (placement_choice._LARGE_DIV)


def large_size(block_size: int) -> int:
    """The smallest record placement treats as large in a store of this block size."""
    return block_size // LARGE_DIV


def large_lineage_blocks(s: Store) -> tuple[int, int]:
    """(blocks, bytes written in them) of the store's blocks whose partition is a namespace's lineage of
    large records: nonzero once some namespace's reads put its large records apart."""
    parts = {large_lineage(ns.encode()) for ns in s.namespaces()}
    found = [e for e in s.block_table() if e.partition in parts]
    return len(found), sum(e.written_bytes for e in found)


def draw(rng: random.Random, small_keys: Sequence[bytes], n: int) -> list[bytes]:
    """A request of `n` of a namespace's small records drawn at random: large records interleaved with the
    small ones spread such requests over many blocks, so placement sends the namespace's large records to a
    lineage of their own."""
    return rng.sample(list(small_keys), min(n, len(small_keys)))
