"""One capacity-eviction pass of the L2 adapter, from the oldest sealed blocks on: plan every record (delete,
or keep by writing it again at the head of the log, eviction.py's value deciding), keep what the pass's budget
allows, then remove the emptied blocks with their keys in one engine call (`Store.evict_blocks`), and, while
payload is still over, the least valuable records of the open blocks. Where the records never read of the oldest
block not emptied cover the rest of the need (and it holds records read too), just enough of them are deleted, with
tombstones, and the block stays (`_trim`; eviction.py says why).

A module of its own because a pass is the longest and most delicate piece of the adapter: it claims keys as a
store or a delete does (in `AdapterState`), must never remove a key a lookup locked or a store is replacing,
and announces what it removed to the listeners exactly once (through the hub and the adapter's delete end).
`EvictionWalk` sees the adapter only through what it is given: the store, the shared state, the eviction
memory, the listener hub and the adapter's two delete steps. When a pass runs is `l2_capacity.py`'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from lmcache.v1.distributed.api import ObjectKey

from blockstore.compaction.gc import MinSeqs
from blockstore.connector.eviction import spare_value, value
from blockstore.connector.l2_keys import NS_PREFIX, decode_object_key, group_by_namespace
from blockstore.connector.l2_listeners import ListenerHub
from blockstore.connector.l2_state import AdapterState, EvictionMemory
from blockstore.connector.l2_tombstones import retire_tombstones
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, BlockEntry, Location
from blockstore.keys import SPACE_KV
from blockstore.store import Store

_log = logging.getLogger("blockstore.connector")

EVICT_OPEN_RECORDS = 4096  # records of open blocks one eviction pass ranks by value (bounds its cost)
EVICT_AHEAD = 64  # a pass frees at least capacity / EVICT_AHEAD (hit rate vs passes: bench/eviction.py)
BUDGET_K = 2  # a pass may move (keep) at most BUDGET_K x the bytes it must free + one block (8: same hit rates)
MOVE_BATCH = 256  # records per relocation call when eviction keeps records (each call is one synced group)

DeleteMarked = Callable[[list[ObjectKey]], tuple[list[ObjectKey], int]]
EndDelete = Callable[[list[ObjectKey], list[tuple[ObjectKey, int]]], None]


@dataclass(slots=True)
class _Keep:
    """A record an eviction pass would keep (write again at the head), with its value (eviction.py)."""

    value: float
    block: int
    ns: str
    key: ObjectKey
    sfx: bytes
    loc: Location
    spare: bool = False  # value <= 0: kept only in the room the pass frees beyond its need (eviction.spare_value)


class EvictionWalk:
    """Runs passes (`evict`); the caller holds the eviction lock, so one pass at a time. `delete_marked` and
    `end_delete` are the adapter's delete steps (delete keys claimed in `deleting`; release, count and announce
    a deletion), so that what a pass removes is accounted for exactly as a delete's removals are."""

    def __init__(self, store: Store, state: AdapterState, memory: EvictionMemory, hub: ListenerHub,
                 delete_marked: DeleteMarked, end_delete: EndDelete) -> None:
        self.store = store
        self._state = state
        self._memory = memory
        self._hub = hub
        self._delete_marked = delete_marked
        self._end_delete = end_delete
        self._min_seqs = MinSeqs(store)
        self._ns_names: dict[int, str | None] = {}  # namespace id -> its name if an lmcache namespace

    def evict(self, excess: int, disk_excess: int, table: list[BlockEntry]) -> int:
        """Free `excess` payload bytes and `disk_excess` bytes of sealed block files: empty sealed blocks oldest
        first (each record deleted or, if worth keeping, written again at the head of the log, within a budget
        of moved bytes so that a pass ends), then, if payload is still over, delete the least valuable records
        of the open blocks. A pass decides first and then writes in batches: the records kept in one put per
        namespace and MOVE_BATCH, then every emptied block with the keys left in it in one engine call
        (`Store.evict_blocks`: one synced directory write, no tombstones). Blocks the engine refuses (a block
        that stays may hold an older version of one of their keys) and blocks something holds lose their
        deleted keys to tombstones, as a delete does. Returns the keys deleted."""
        budget = BUDGET_K * max(excess, disk_excess, self._state.capacity // EVICT_AHEAD) + self.store.block_size
        drop: dict[int, dict[str, list[ObjectKey]]] = {}
        wanted: list[_Keep] = []
        emptied: list[BlockEntry] = []
        known: dict[bytes, ObjectKey] = {}  # key suffix -> key, of every record planned (decoded once)
        moved = 0
        trimmed_keys = 0
        listed: dict[int, tuple[list[tuple[str, ObjectKey, bytes, Location]], int]] = {}  # each block listed once
        try:
            for e in table:  # moves beyond the budget will be dropped, least valuable first: they free payload too,
                over = max(0, moved - budget)  # and their blocks' bytes (else a pass for the block files went on over
                if excess - over <= 0 and disk_excess - over <= 0:  # every block, and evicted most of the cache)
                    break
                if e.state != BLOCK_SEALED:
                    continue
                if disk_excess - over <= 0 and over == 0:
                    # the rest of the need from this block's records never read, oldest first, the block left in
                    # place; more than the need: the spares of the blocks emptied before it keep their room
                    spares = sum(w.loc.payload_len for w in wanted if w.spare)
                    trim = self._trim(e, excess + spares, listed)
                    if trim is not None:
                        trimmed_keys, freed = trim
                        excess -= freed
                        break
                freed, block_moved, blocked = self._plan_block(e, drop.setdefault(e.block_id, {}), wanted, known,
                                                               listed.pop(e.block_id, None))
                excess -= freed
                moved += block_moved
                if not blocked:
                    emptied.append(e)
                    disk_excess -= e.data_end - block_moved  # the file goes; what moves is written again at the head
            # the room freed beyond the need (a block's worth at most: space comes back a block at a time) is
            # held by records that have been read, most recently read first, rather than left empty
            surplus = max(0, min(-excess, -disk_excess))
            keep, trimmed, held = self._keep_within([w for w in wanted if not w.spare], budget, drop)
            self._keep_spares([w for w in wanted if w.spare], min(surplus, budget - sum(
                loc.record_len for items in keep.values() for _k, _s, loc in items)), keep, drop, held)
            excess -= trimmed
            for ns, items in keep.items():
                lost, taken = self._rewrite_at_head(ns, items)
                held |= taken
                for k in lost:  # not kept after all: it goes with its block
                    drop.setdefault(self._home_block(items, k), {}).setdefault(ns, []).append(k)
        except BaseException:
            # nothing deleted yet but what _trim deleted (and released): the keys claimed for deletion are released,
            # else they stayed claimed for ever
            # (missed by lookups, skipped by stores and deletes, their blocks never emptied by a later pass)
            with self._state.lock:
                for by_ns in drop.values():
                    for keys in by_ns.values():
                        self._state.deleting.difference_update(keys)
            raise
        # a block holding a key that a lookup locked or a store claimed since it was planned stays (its keys to
        # delete get tombstones): evicting it whole would remove a locked key, or the record a store is replacing
        # (the store then counts its old bytes as freed a second time)
        emptied = [e for e in emptied if e.block_id not in held]
        emptied_ids = {e.block_id for e in emptied}
        deleted, refused = self._evict_emptied([e.block_id for e in emptied], drop, known)
        for bid, by_ns in drop.items():  # held or refused blocks: their deleted keys need tombstones
            if bid in refused or bid not in emptied_ids:
                for keys in by_ns.values():
                    deleted += len(self._delete_marked(self._still_in(bid, keys))[0])
        if refused:
            self._retire_refused(refused)
        if excess > 0:
            deleted += self._evict_open(excess, [e.block_id for e in table if e.state == BLOCK_OPEN])
        return deleted + trimmed_keys

    def _retire_refused(self, refused: Collection[int]) -> None:
        """Refused blocks that hold nothing live now keep their tombstones: those go as compaction's GC drops
        them (or carried to the tombstone stream), the blocks at the next sync_moves."""
        now_table = {x.block_id: x for x in self.store.block_table()}
        stones = [now_table[bid] for bid in refused
                  if bid in now_table and now_table[bid].tombstones and now_table[bid].live_records == 0]
        if stones:
            retire_tombstones(self.store, self._min_seqs, self._state, stones)
            self.store.sync_moves()

    def _trim(self, e: BlockEntry, need: int,
              listed: dict[int, tuple[list[tuple[str, ObjectKey, bytes, Location]], int]]) -> tuple[int, int] | None:
        """Free `need` payload bytes from sealed block `e`'s records never read (eviction.value <= 0 and no read to
        rank them as spares), oldest first, when it holds more of them than that: each deleted with a tombstone as
        a delete does, the rest of the block left where it is. Emptying the block whole would delete all of them,
        room that stood empty until the stores filled it (the adapter held 0.98-0.99 of its capacity in
        bench/eviction.py, LRU all of it). The block is emptied whole (its keepers and spares written again at the
        head, the file removed) by the first pass its unread records no longer cover. Its dead bytes count against
        the block files' bound as any block's do (`CapacityEviction._disk_excess`; usually the one block eviction
        is emptying): a pass for the block files never trims, it empties blocks whole. Returns (keys deleted, payload freed), or None: the block
        holds no more records never read than the need, or nothing else (a scan, a store-only stream: emptied whole,
        one synced engine call, rather than a tombstone per record; see eviction.py)."""
        records, _foreign = listed[e.block_id] = self._block_records(e.block_id)
        now = time.monotonic()
        with self._state.lock:
            mean = self._state.used / self._state.records if self._state.records else 1.0
            span = self._span(e)
            window = self._memory.returns.window()
            unread: list[tuple[int, str, ObjectKey, int]] = []
            for ns, k, _sfx, loc in records:
                if k in self._state.storing or k in self._state.deleting or self._state.held(k, now):
                    continue
                st = self._memory.stats.get(k)
                if (value(st, loc.payload_len, self._memory.clock, span, mean) <= 0
                        and spare_value(st, self._memory.clock, span, window) is None):
                    unread.append((loc.offset, ns, k, loc.payload_len))
            if len(unread) == len(records) or sum(u[3] for u in unread) <= need:
                return None
            unread.sort(key=lambda u: u[0])
            picked: dict[str, list[ObjectKey]] = {}
            for _off, ns, k, size in unread:
                if need <= 0:
                    break
                self._state.deleting.add(k)
                self._memory.ghost.add(k, self._memory.clock)
                picked.setdefault(ns, []).append(k)
                need -= size
        # claimed now, listed before: a key stored again since is no longer this block's record, and the decision
        # was about the old one (_still_in releases it); one call releases every claim, whatever fails
        gone, freed = self._delete_marked(self._still_in(e.block_id, [k for keys in picked.values() for k in keys]))
        return len(gone), freed

    def _span(self, e: BlockEntry) -> int:
        """The log's span against which recency is measured, with `e` the oldest block (under the lock): the clock's
        advance since it was created (the capacity when that is older than the samples, e.g. written before a
        restart). Remembered for admission (`EvictionMemory.span`)."""
        then = self._memory.history.clock_at(e.created_ns)
        span = self._state.capacity if then is None else max(self.store.block_size, self._memory.clock - then)
        self._memory.span = span
        return span

    def _still_in(self, bid: int, keys: list[ObjectKey]) -> list[ObjectKey]:
        """Of keys claimed for deletion with block `bid`, those the directory still places in it. The others are
        released: a store replaced them after the pass planned and before it claimed them (keys it trims or
        leaves out of the spare room are claimed late), and its decision was about the old record, not the
        acknowledged new one. A failed look-up keeps them all (as before: deleted)."""
        groups, _bad = group_by_namespace(keys)
        stay: list[ObjectKey] = []
        try:
            for ns, items in groups.items():
                locs = self.store.locate_many([kb for _i, kb in items], ns=ns)
                stay += [keys[i] for (i, _kb), loc in zip(items, locs) if loc is not None and loc.block_id == bid]
        except Exception as exc:
            _log.warning("blockstore L2: locating %d key(s) to delete failed (%s); deleting them", len(keys), exc)
            return keys
        staying = set(stay)
        gone_elsewhere = [k for k in keys if k not in staying]
        if gone_elsewhere:
            with self._hub.task_end():
                finals = self._hub.settle(gone_elsewhere)
                with self._state.lock:
                    self._state.deleting.difference_update(gone_elsewhere)
                self._hub.resolve(finals)
        return stay

    @staticmethod
    def _home_block(items: list[tuple[ObjectKey, bytes, Location]], key: ObjectKey) -> int:
        return next(loc.block_id for k, _sfx, loc in items if k == key)

    def _evict_emptied(self, block_ids: list[int], drop: dict[int, dict[str, list[ObjectKey]]],
                       known: dict[bytes, ObjectKey]) -> tuple[int, set[int]]:
        """Remove emptied blocks with the keys still in them (Store.evict_blocks) and account for the keys as
        deleted. Returns (keys deleted, the blocks refused)."""
        if not block_ids:
            return 0, set()
        try:
            done = self.store.evict_blocks(block_ids)
        except Exception as exc:  # nothing removed: the tombstone path deletes them instead
            _log.warning("blockstore L2: evicting %d block(s) failed (%s); deleting their keys", len(block_ids), exc)
            return 0, set(block_ids)
        marked = [k for bid in done.blocks for keys in drop.get(bid, {}).values() for k in keys]
        gone: list[tuple[ObjectKey, int]] = []
        for sfx, loc in done.records:
            k = known.get(sfx)
            if k is not None:
                gone.append((k, loc.payload_len))
                continue
            try:
                if self._lmcache_namespace(int.from_bytes(sfx[:4], "big")) is None or sfx[4] != SPACE_KV:
                    raise ValueError("not an lmcache namespace")
                gone.append((decode_object_key(sfx[5:]), loc.payload_len))
            except ValueError:
                continue  # a record the adapter did not write: a block holding one is never emptied
        self._end_delete(marked, gone)
        with self._state.lock:
            self._state.counters.blocks_evicted += len(done.blocks)
        return len(gone), set(done.refused)

    def _rewrite_at_head(self, ns: str, items: list[tuple[ObjectKey, bytes, Location]]
                         ) -> tuple[list[ObjectKey], set[int]]:
        """Write records worth keeping again at the head of the log (one put per MOVE_BATCH, the namespace's
        block stream), each with a new sequence number: a copy that kept its old one (relocation) would hold
        the engine's eviction floor down, and every later block would need tombstones. The keys are claimed
        as a store claims them, so a store or delete of the same key meanwhile leaves them to this write (a
        delete skips in-flight keys, as it skips locked ones); once claimed, only those the directory still
        places where the pass found them are written (a key deleted or stored again since the pass planned is
        not brought back, nor its new record overwritten with the old). Returns (the keys of batches that
        failed, now claimed for deletion: they go with their block; the blocks of keys a store claimed
        meanwhile: those must stay)."""
        with self._state.lock:  # a key another task claimed is left to it
            mine = [it for it in items if it[0] not in self._state.storing and it[0] not in self._state.deleting]
            taken = {loc.block_id for k, _s, loc in items if k in self._state.storing}
            self._state.storing.update(k for k, _s, _l in mine)
        lost: list[ObjectKey] = []
        kept = 0
        claimed = mine
        try:
            try:
                now = self.store.locate_many([sfx[5:] for _k, sfx, _l in mine], ns=ns) if mine else []
                mine = [it for it, loc in zip(mine, now) if loc is not None and loc.same_place(it[2])]
            except Exception as exc:  # unknown whether they are still there: keep none, they go with their block
                _log.warning("blockstore L2: locating %d record(s) of %s to keep failed (%s); evicting them",
                             len(mine), ns, exc)
                lost += [k for k, _s, _l in mine]
                mine = []
            for start in range(0, len(mine), MOVE_BATCH):
                batch = mine[start : start + MOVE_BATCH]
                try:
                    payloads = self.store.read_locations([loc for _k, _s, loc in batch])
                    self.store.put_many([(sfx[5:], p) for (_k, sfx, _l), p in zip(batch, payloads)], ns=ns,
                                        metas=[loc.meta for _k, _s, loc in batch])
                    kept += len(batch)
                except Exception as exc:
                    _log.warning("blockstore L2: keeping %d record(s) of %s failed (%s); evicting them",
                                 len(batch), ns, exc)
                    lost += [k for k, _s, _l in batch]
        finally:
            with self._hub.task_end():
                finals = self._hub.settle([k for k, _s, _l in claimed])
                with self._state.lock:
                    for k, _s, _l in claimed:
                        self._state.storing.discard(k)
                    self._state.deleting.update(lost)
                    self._state.counters.kept_by_value += kept
                self._hub.resolve(finals)
        return lost, taken

    def _lmcache_namespace(self, ns_id: int) -> str | None:
        """The lmcache namespace of a namespace id (None: another namespace). The names are read from the directory
        again only for an id not seen yet (an id never changes its name; reading them all cost ~0.2 ms a block)."""
        if ns_id not in self._ns_names:
            names = {nid: ns for ns, nid in self.store.dir.namespaces().items()}
            with self._state.lock:
                self._ns_names = {nid: (ns if ns.startswith(NS_PREFIX) else None) for nid, ns in names.items()}
        return self._ns_names.get(ns_id)

    def _block_records(self, bid: int) -> tuple[list[tuple[str, ObjectKey, bytes, Location]], int]:
        """The records the directory names in block `bid` as (namespace, key, suffix, location), and how many
        are not the adapter's (never evicted by it)."""
        pairs = list(self.store.dir.block_records(bid))
        locs = self.store.dir.get_locations([sfx for _off, sfx in pairs])
        out: list[tuple[str, ObjectKey, bytes, Location]] = []
        foreign = 0
        for (off, sfx), loc in zip(pairs, locs):
            if loc is None or loc.block_id != bid or loc.offset != off:
                continue  # moved or deleted since the listing
            ns = self._lmcache_namespace(int.from_bytes(sfx[:4], "big"))
            try:
                if ns is None or sfx[4] != SPACE_KV:
                    raise ValueError("not an lmcache namespace")
                out.append((ns, decode_object_key(sfx[5:]), sfx, loc))
            except ValueError:
                foreign += 1
        return out, foreign

    def _plan_block(self, e: BlockEntry, drop: dict[str, list[ObjectKey]], wanted: list[_Keep],
                    known: dict[bytes, ObjectKey],
                    listed: tuple[list[tuple[str, ObjectKey, bytes, Location]], int] | None = None
                    ) -> tuple[int, int, bool]:
        """Decide for every record of sealed block `e`: delete (value <= 0) or keep (moved to the head; appended
        to `wanted` with its value, for `_keep_within`). Keys to delete are claimed in `deleting`. Returns
        (payload bytes the deletions free, record bytes the moves would write, whether something holds the
        block: a locked or in-flight key, or a record that is not the adapter's)."""
        records, blocked = listed if listed is not None else self._block_records(e.block_id)
        now = time.monotonic()
        freed = moved = 0
        with self._state.lock:
            mean = self._state.used / self._state.records if self._state.records else 1.0
            span = self._span(e)  # recency against the log's span
            window = self._memory.returns.window()  # how long ago a spare may have been read (eviction.ReturnDistances)
            for ns, k, sfx, loc in records:
                known[sfx] = k
                if k in self._state.storing or k in self._state.deleting or self._state.held(k, now):
                    blocked += 1
                    continue
                st = self._memory.stats.get(k)
                v = value(st, loc.payload_len, self._memory.clock, span, mean)
                if v > 0:
                    moved += loc.record_len
                    wanted.append(_Keep(v, e.block_id, ns, k, sfx, loc))
                elif (sv := spare_value(st, self._memory.clock, span, window)) is not None:
                    freed += loc.payload_len  # deleted unless the pass frees more than it needs
                    wanted.append(_Keep(sv, e.block_id, ns, k, sfx, loc, spare=True))
                else:
                    self._state.deleting.add(k)
                    self._memory.ghost.add(k, self._memory.clock)
                    drop.setdefault(ns, []).append(k)
                    freed += loc.payload_len
        return freed, moved, bool(blocked)

    def _keep_within(self, wanted: list[_Keep], budget: int, drop: dict[int, dict[str, list[ObjectKey]]]
                     ) -> tuple[dict[str, list[tuple[ObjectKey, bytes, Location]]], int, set[int]]:
        """The records worth keeping that the pass's budget of moved bytes allows, most valuable first; the rest
        are deleted with their blocks (claimed in `deleting`, added to `drop`). When the oldest blocks hold more
        that is worth keeping than the budget moves, the cache is too small for all of it, and what goes is what
        is worth least, not what the walk reached last. Returns (the keys to keep by namespace, the payload
        bytes the others free, the blocks of keys a lookup locked or a store claimed since: they must stay)."""
        keep: dict[str, list[tuple[ObjectKey, bytes, Location]]] = {}
        trimmed = 0
        moved = 0
        held: set[int] = set()
        now = time.monotonic()
        with self._state.lock:
            for w in sorted(wanted, key=lambda w: -w.value):
                if moved + w.loc.record_len <= budget:
                    moved += w.loc.record_len
                    self._memory.stats.spend(w.key)
                    keep.setdefault(w.ns, []).append((w.key, w.sfx, w.loc))
                    continue
                if self._claim_for_drop(w, now, held, drop):
                    trimmed += w.loc.payload_len
        return keep, trimmed, held

    def _claim_for_drop(self, w: _Keep, now: float, held: set[int], drop: dict[int, dict[str, list[ObjectKey]]]
                        ) -> bool:
        """Claim a record the pass does not keep for deletion with its block (in `deleting`, the ghost and `drop`);
        whether it was claimed here. Under self._state.lock. A key a delete claimed since goes anyway; one a lookup
        locked or a store claimed since holds its block (`held`)."""
        if w.key in self._state.deleting:
            return False
        if w.key in self._state.storing or self._state.held(w.key, now):
            held.add(w.block)  # a promise to a load, or a store replacing it: its block stays
            return False
        self._state.deleting.add(w.key)
        self._memory.ghost.add(w.key, self._memory.clock)
        drop.setdefault(w.block, {}).setdefault(w.ns, []).append(w.key)
        return True

    def _keep_spares(self, spares: list[_Keep], room: int, keep: dict[str, list[tuple[ObjectKey, bytes, Location]]],
                     drop: dict[int, dict[str, list[ObjectKey]]], held: set[int]) -> None:
        """Records not worth keeping that have been read (`eviction.spare_value`), most recently read first, are
        kept (added to `keep`) within `room`: the payload the pass frees beyond its need, a block's worth at most
        (space comes back a whole block at a time), which would otherwise stay empty until the stores fill it.
        The others are deleted with their blocks (claimed in `deleting`, added to `drop`; the walk counted their
        bytes as freed already); a key a lookup locked or a store claimed since holds its block (`held`)."""
        now = time.monotonic()
        with self._state.lock:
            for w in sorted(spares, key=lambda w: -w.value):
                if w.loc.record_len <= room:
                    room -= w.loc.record_len
                    keep.setdefault(w.ns, []).append((w.key, w.sfx, w.loc))
                    continue
                self._claim_for_drop(w, now, held, drop)

    def _evict_open(self, excess: int, open_ids: list[int]) -> int:
        """Payload still over capacity and no sealed block left to empty: delete the least valuable records of
        the open blocks (at most EVICT_OPEN_RECORDS ranked per pass, oldest blocks first). Their space on disk
        comes back when the block, sealed, is emptied by a later pass."""
        candidates: list[tuple[str, ObjectKey, Location]] = []
        for bid in open_ids:
            records, _foreign = self._block_records(bid)
            candidates += [(ns, k, loc) for ns, k, _sfx, loc in records]
            if len(candidates) >= EVICT_OPEN_RECORDS:
                break
        now = time.monotonic()
        picked: dict[str, list[ObjectKey]] = {}
        with self._state.lock:
            mean = self._state.used / self._state.records if self._state.records else 1.0
            mem = self._memory
            ranked = sorted(range(len(candidates)), key=lambda i: (value(
                mem.stats.get(candidates[i][1]), candidates[i][2].payload_len, mem.clock, self._state.capacity, mean),
                i))
            want = excess
            for i in ranked:
                if want <= 0:
                    break
                ns, k, loc = candidates[i]
                if k in self._state.storing or k in self._state.deleting or self._state.held(k, now):
                    continue
                self._state.deleting.add(k)
                self._memory.ghost.add(k, self._memory.clock)
                picked.setdefault(ns, []).append(k)
                want -= loc.payload_len
        deleted = 0
        for keys in picked.values():
            gone, _freed = self._delete_marked(keys)
            deleted += len(gone)
        return deleted
