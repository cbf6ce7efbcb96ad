"""Affinity relocation: a cluster of records read together (clusters.py: the tracker's groups merged
into disjoint sets that fit one block) that sits in more blocks than its bytes need is rewritten
together, in temporal (sequence) order, into one block of the relocation stream, so the next request
for any of its groups touches one block and reads one contiguous run. Records are taken out of any
block, including ones GC would not pick; what they leave behind is dead space GC reclaims later.
Clusters are disjoint, so a record shared by several groups moves with the cluster they all joined
and relocation never pulls a record back and forth between them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockstore import foreground, hooks
from blockstore.directory import BLOCK_SEALED
from blockstore.errors import CorruptionError, NotFound
from blockstore.records import BLOCK_HEADER_SIZE

if TYPE_CHECKING:
    from blockstore.directory import BlockEntry, Location
    from blockstore.store import Store

    from .policy import Policy

_log = logging.getLogger("blockstore.compaction")

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


def usable_bytes(block_size: int) -> int:
    """What one block holds of record bytes, as relocation counts it (header and a margin left out)."""
    return block_size - BLOCK_HEADER_SIZE - 8192


def layout(live: list[tuple[bytes, Location]], block_size: int) -> GroupLayout:
    """Where these live records are, and the least blocks their bytes need."""
    foreground.step_aside()  # planning calls it per cluster and group: on the background thread, reads go first
    size = sum(loc.record_len for _k, loc in live)
    return GroupLayout(live, len({loc.block_id for _k, loc in live}), max(1, -(-size // usable_bytes(block_size))),
                       size)


def hole_cost(where: GroupLayout, table: Mapping[int, BlockEntry], policy: Policy) -> float:
    """Bytes a move of `where`'s records costs: what it writes, plus, for each source block that stays,
    `policy.relocation_hole_cost` (the weight) x the copy GC will make to reclaim the hole it leaves. GC
    collects a block once its dead share reaches `gc_invalid_ratio` (the threshold), so a block left with
    live share u' is collected at u_c = min(u', 1 - threshold), and reclaiming one dead byte there copies
    u_c / (1 - u_c) live bytes (LFS's cost of cleaning). A record taken out of a sealed block already past
    the threshold costs nothing: GC copies it anyway, and the move takes the place of that copy. Without
    GC, holes are never collected and cost nothing in writes (they stay as dead space). Weight 0: the
    bytes alone, as before the weight existed."""
    weight, threshold = policy.relocation_hole_cost, policy.gc_invalid_ratio if policy.gc else None
    if not weight:
        return float(where.bytes)
    out: dict[int, int] = {}
    for _k, loc in where.live:
        out[loc.block_id] = out.get(loc.block_id, 0) + loc.record_len
    cost = 0.0
    for bid, m in out.items():
        e = table.get(bid)
        if threshold is None or e is None or not e.written_bytes:
            cost += m
        elif e.state == BLOCK_SEALED and e.invalid_ratio >= threshold:
            continue
        else:
            u_c = min(max(0.0, (e.live_bytes - m) / e.written_bytes), 1.0 - threshold)
            cost += m * (1.0 + weight * u_c / (1.0 - u_c))
    return cost


def placement(store: Store, keys: Sequence[bytes]) -> GroupLayout:
    """The live records of `keys` (looked up now) and where they are."""
    locs = store.dir.get_locations(list(keys))
    return layout([(k, loc) for k, loc in zip(keys, locs) if loc is not None], store.block_size)


@dataclass(slots=True)
class Relocated:
    gid: int
    moved: int = 0
    moved_bytes: int = 0
    lost_race: int = 0
    blocks_before: int = 0
    copied: int = 0  # copies placed with the cluster (docs/copies.md)
    copied_bytes: int = 0


def main_block(where: GroupLayout) -> int:
    """The block holding most of the group's bytes."""
    per: dict[int, int] = {}
    for _k, loc in where.live:
        per[loc.block_id] = per.get(loc.block_id, 0) + loc.record_len
    return max(per, key=lambda b: per[b])


def relocate(store: Store, gid: int, where: GroupLayout, *, partition: bytes = RELOCATION_PARTITION,
             stragglers_only: bool = False, borrowed: Sequence[tuple[bytes, Location]] = ()) -> Relocated:
    """Rewrite the live records of cluster `gid` together (one batch: one block unless it needs more)
    into `partition`; with `stragglers_only`, only those outside its main block. `borrowed`: records
    other clusters own that this one's groups read (key, whole value): a copy of each goes with it."""
    res = Relocated(gid, blocks_before=where.blocks)
    live = sorted(where.live, key=lambda kl: kl[1].seq)  # temporal order inside the group
    if stragglers_only:
        home = main_block(where)
        live = [(k, loc) for k, loc in live if loc.block_id != home]
        borrowed = [(k, v) for k, v in borrowed if all(p.block_id != home for p in v.places())]
    if borrowed:
        # as they are now: a cluster rewritten earlier in the pass may have moved them (a copy computed from
        # the value read at the pass's start would lose its compare-and-swap); one copied meanwhile is left
        now = store.dir.get_locations([k for k, _v in borrowed])
        borrowed = [(k, cur) for (k, v), cur in zip(borrowed, now) if cur is not None and len(cur.copies) <= len(v.copies)]
    done = _with_copies(store, gid, live, borrowed, partition) if borrowed else None
    if done is not None:  # moved and copied in one group commit
        for (_k, v), ok in zip(borrowed, done[len(live):]):
            res.copied += ok
            res.copied_bytes += v.record_len if ok else 0
        _count(res, live, done)
        return res
    hooks.fire("compact.scan", "relocate", gid, len(live))
    # hold the sources: a writer may empty one meanwhile, and the engine would delete it under us
    with store.hold_blocks([loc.block_id for _k, loc in live]):
        try:
            payloads = store.read_locations([loc for _k, loc in live])
        except CorruptionError as exc:
            # a record that does not verify is never copied (its bad bytes would get a fresh checksum): the
            # cluster stays as it is and the pass goes on (it failed here, every pass that chose the cluster)
            _log.warning("relocation of group %016x left as it is: a record does not verify (%s); run "
                         "blockstore fsck --repair %s", gid, exc, store.path)
            return res
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
            except CorruptionError:
                return res  # as above
        hooks.fire("compact.copy", "relocate", gid, len(live))
        done = store.relocate_many([(k, loc, p) for (k, loc), p in zip(live, payloads)],
                                   partition=partition, together=True)
    _count(res, live, done)
    return res


def _count(res: Relocated, live: list[tuple[bytes, Location]], done: Sequence[bool]) -> None:
    hooks.fire("compact.repoint", "relocate", res.gid, sum(done[: len(live)]))
    for (_k, loc), ok in zip(live, done):
        if ok:
            res.moved += 1
            res.moved_bytes += loc.record_len
        else:
            res.lost_race += 1


def _with_copies(store: Store, gid: int, live: list[tuple[bytes, Location]], borrowed: Sequence[tuple[bytes, Location]],
                 partition: bytes) -> list[bool] | None:
    """Move `live` and place a copy of each `borrowed` record, in one group commit into one block: the
    moves' results, then the copies'. None, with nothing written, when a source went meanwhile (the
    caller then moves without copies, through its lost-race path)."""
    hooks.fire("compact.scan", "relocate", gid, len(live) + len(borrowed))
    with store.hold_blocks([loc.block_id for _k, loc in live] + [v.block_id for _k, v in borrowed]):
        try:
            payloads = store.read_locations([loc for _k, loc in live] + [v.primary() for _k, v in borrowed])
        except (NotFound, CorruptionError):
            return None  # the caller reads the moves again without the copies (and leaves a record that does not verify)
        hooks.fire("compact.copy", "relocate", gid, len(live) + len(borrowed))
        moves = [(k, loc, p) for (k, loc), p in zip(live, payloads)]
        copies = [(k, v, p) for (k, v), p in zip(borrowed, payloads[len(live):])]
        return store.relocate_many(moves, partition=partition, together=True, copies=copies)
