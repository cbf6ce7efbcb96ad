"""Affinity relocation: a group of records read together that sits in more blocks than its bytes need
is rewritten together, in temporal (sequence) order, into the relocation stream, so the next request
for it touches one block and reads one contiguous run. Records are taken out of any block, including
ones GC would not pick; what they leave behind is dead space GC reclaims later.

A record shared by several groups (a system prompt, a popular document, a hot file) has one copy: the
first group to rewrite it claims it, and later groups leave it where it is. Otherwise each group's
rewrite would pull it away from the last one, and relocation would never settle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockstore import hooks
from blockstore.errors import NotFound
from blockstore.records import BLOCK_HEADER_SIZE

if TYPE_CHECKING:
    from blockstore.directory import Location
    from blockstore.store import Store

    from .affinity import Group

RELOCATION_PARTITION = b"\0compaction/relocate"


@dataclass(slots=True)
class GroupLayout:
    """Where a group's live records are now."""

    live: list[tuple[bytes, Location]]
    blocks: int
    needed: int  # blocks its bytes need at the least
    bytes: int

    @property
    def scattered(self) -> bool:
        return self.blocks > self.needed


def placement(store: Store, group: Group, claimed: Callable[[bytes], bool] | None = None) -> GroupLayout:
    """The group's live records, leaving out those `claimed` says another group owns."""
    locs = store.dir.get_locations(list(group.keys))
    live = [(k, loc) for k, loc in zip(group.keys, locs)
            if loc is not None and (claimed is None or not claimed(k))]
    size = sum(loc.record_len for _k, loc in live)
    usable = store.block_size - BLOCK_HEADER_SIZE - 8192
    return GroupLayout(live, len({loc.block_id for _k, loc in live}), max(1, -(-size // usable)), size)


@dataclass(slots=True)
class Relocated:
    gid: int
    moved: int = 0
    moved_bytes: int = 0
    lost_race: int = 0
    blocks_before: int = 0


def main_block(where: GroupLayout) -> int:
    """The block holding most of the group's bytes."""
    per: dict[int, int] = {}
    for _k, loc in where.live:
        per[loc.block_id] = per.get(loc.block_id, 0) + loc.record_len
    return max(per, key=lambda b: per[b])


def relocate(store: Store, group: Group, where: GroupLayout, *, partition: bytes = RELOCATION_PARTITION,
             stragglers_only: bool = False) -> Relocated:
    """Rewrite the group's live records together (one batch: one block unless it needs more) into
    `partition`; with `stragglers_only`, only those outside its main block."""
    res = Relocated(group.gid, blocks_before=where.blocks)
    live = sorted(where.live, key=lambda kl: kl[1].seq)  # temporal order inside the group
    if stragglers_only:
        home = main_block(where)
        live = [(k, loc) for k, loc in live if loc.block_id != home]
    hooks.fire("compact.scan", "relocate", group.gid, len(live))
    # hold the sources: a writer may empty one meanwhile, and the engine would delete it under us
    with store.hold_blocks([loc.block_id for _k, loc in live]):
        try:
            payloads = store.read_locations([loc for _k, loc in live])
        except NotFound:
            # a source went before we held it: the records it held were rewritten or deleted meanwhile
            # (lost races); the ones still where we found them are copied
            now = store.dir.get_locations([k for k, _loc in live])
            still = [(k, loc) for (k, loc), cur in zip(live, now) if cur is not None and cur.same_place(loc)]
            res.lost_race = len(live) - len(still)
            live = still
            try:
                payloads = store.read_locations([loc for _k, loc in live])
            except NotFound:
                res.lost_race += len(live)
                return res
        hooks.fire("compact.copy", "relocate", group.gid, len(live))
        done = store.relocate_many([(k, loc, p) for (k, loc), p in zip(live, payloads)],
                                   partition=partition, together=True)
    hooks.fire("compact.repoint", "relocate", group.gid, sum(done))
    for (_k, loc), ok in zip(live, done):
        if ok:
            res.moved += 1
            res.moved_bytes += loc.record_len
        else:
            res.lost_race += 1
    return res
