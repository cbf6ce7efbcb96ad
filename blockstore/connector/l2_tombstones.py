"""Tombstones that an eviction pass leaves behind: when the engine refuses to evict a block whole, its deleted
keys get tombstones, and a block holding nothing live but tombstones stays until they can go. Each is dropped
when no other block of records can hold anything older (`data_floor`), else carried to the namespace's stream
of tombstones (blocks of nothing else).

A module of its own because it is the one place the adapter's eviction reasons about sequence numbers and the
engine's floor; it needs only the store, the blocks' lowest sequence numbers (`MinSeqs`) and the counters.
"""

from __future__ import annotations

import logging

from blockstore.compaction.gc import MinSeqs, tombstones
from blockstore.connector.l2_state import AdapterState
from blockstore.directory import BlockEntry, Location
from blockstore.store import Store

_log = logging.getLogger("blockstore.connector")

TOMBSTONE_STREAM = b"\0tombstones"  # partition suffix of the blocks that carried tombstones go to


def data_floor(store: Store, min_seqs: MinSeqs, exclude: set[int]) -> int:
    """The lowest sequence number of any block not in `exclude` that has held a record other than a tombstone
    (footers for sealed blocks, read once each; the engine for open ones). A tombstone older than every
    such block covers no record that is left: it can go. Blocks of nothing but tombstones are left out:
    they hold no record a tombstone must cover, and counting the old sequence numbers that carried
    tombstones keep would pin the floor for ever (found by tests/test_adapter_capacity.py: 27,000 carries
    and 100 drops in 640 stores)."""
    opened = store.open_block_min_seqs()
    low = 1 << 64
    for e in store.block_table():
        if e.block_id in exclude or e.total_records == e.tombstones:
            continue
        seq = opened.get(e.block_id) if e.block_id in opened else min_seqs.own(e.block_id)
        if seq:
            low = min(low, seq)
    return low


def retire_tombstones(store: Store, min_seqs: MinSeqs, state: AdapterState, blocks: list[BlockEntry]) -> None:
    """These blocks hold nothing live any more: their tombstones are what keeps them. Each is dropped when
    no other block of records can hold anything older (`data_floor`: every block being emptied here is
    left out too, as it goes at the same sync), else carried to the namespace's stream of tombstones (blocks
    of nothing else, which the floor leaves out); the blocks go at the next sync_moves."""
    ids = [e.block_id for e in blocks]
    try:
        with store.hold_blocks(ids):
            floor = data_floor(store, min_seqs, set(ids))
            carry: dict[bytes, list[tuple[bytes, Location, bytes]]] = {}
            drop: dict[bytes, list[tuple[bytes, Location]]] = {}
            for e in blocks:
                part = e.partition if e.partition.endswith(TOMBSTONE_STREAM) else e.partition + TOMBSTONE_STREAM
                for sfx, loc in tombstones(store, e):
                    if floor < loc.seq:
                        carry.setdefault(part, []).append((sfx, loc, b""))
                    else:
                        drop.setdefault(part, []).append((sfx, loc))
            carried = 0
            for part in {*carry, *drop}:
                carried += sum(store.relocate_many(carry.get(part, []), partition=part,
                                                   drop_tombstones=drop.get(part, [])))
            dropped = sum(len(v) for v in drop.values())
    except Exception as exc:  # gone meanwhile (compaction collected it) or unreadable: GC's job then
        _log.debug("blockstore L2: tombstones of blocks %s not retired: %s", ids, exc)
        return
    with state.lock:
        state.counters.tombstones_carried += carried
        state.counters.tombstones_dropped += dropped
