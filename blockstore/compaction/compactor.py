"""The compactor: learns affinity from the store's reads, and in passes relocates scattered clusters (groups
read together, merged while they fit a block: clusters.py) and garbage-collects blocks past the
invalid-ratio threshold, within write budgets, paced to a copy rate.

It runs as a background thread inside the store's process (`blockstore.open(..., compaction="full")`)
or one pass at a time (`blockstore compact PATH`). Every move goes through the engine's compare-and-swap
(`Store.relocate_many`), so a key written or deleted while it is being copied stays as the writer left
it; the engine deletes a block once nothing live is left in it and no reader holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from blockstore import hooks, metrics
from blockstore.directory import BLOCK_OPEN, BlockEntry, DirectoryBatch
from blockstore.errors import BlockstoreError, InvalidArgument, NoSpace, StoreClosed
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.reader import choose_places

from . import clusters, counters, gc, relocation, shadow
from .affinity import AffinityJudge, AffinityTracker, Group
from .pacing import ForegroundPacing, Pacer
from .policy import Policy, resolve
from .report import PassReport
from .room import Room

if TYPE_CHECKING:
    from blockstore.directory import Location
    from blockstore.store import Store

_log = logging.getLogger("blockstore.compaction")
BUG_RETRY_S = 60.0  # the background thread's pause after a pass failed with an unexpected exception
MAX_GROUPS_PER_PASS = 1024  # the most valuable groups clustered per pass (bounds a pass's cost)
# A paced (background) pass plans relocation again only after this many times its last planning took:
# planning is Python holding the GIL, and a foreground that never pauses makes groups due again within
# a 10 ms pass interval (measured, shared-tenants trace: up to 370 ms a plan, 0.47 of 0.65 s busy)
PLAN_SPACING = 20
PLAN_WAIT_MAX_S = 0.2  # ... but never waits longer than this (relocation must keep up with what is read)


@dataclass(slots=True)
class _Move:
    """A planned move: cluster, records, where to, blocks saved (shadow.py) per byte of cost (hole_cost), cost."""

    cluster: clusters.Cluster
    where: relocation.GroupLayout
    partition: bytes
    value: float
    dest: int  # the block the shadow puts it in (negative: a block the move writes anew)
    cost: float


class Compactor:
    def __init__(self, store: Store, policy: Policy, *, judge: AffinityJudge | None = None) -> None:
        self.store = store
        self.policy = policy
        self.tracker = AffinityTracker(max_groups=policy.max_groups, max_group_keys=policy.max_group_keys,
                                       max_keys=policy.max_tracked_keys, max_group_bytes=store.block_size // 2,
                                       judge=judge)
        self.tracker.load(store.dir)
        self._flushed_counters: bytes | None = None  # the counters as the directory holds them
        self._load_counters()
        self._min_seqs = gc.MinSeqs(store)
        self._clusters: list[tuple[int, tuple[bytes, ...]]] = []  # the last pass's clusters (clusters.build)
        self._open: dict[bytes, int] = {}  # this pass's open block of each partition (where moves land)
        self._pass_lock = threading.Lock()  # one pass at a time (background thread or a caller)
        self._plan_after = 0.0  # monotonic time before which a paced pass plans no relocation
        self.hole_debt = 0.0  # holes' GC copy charged to relocation's budget (hole_cost; not persisted)
        self._open_idle = gc.OpenIdle()  # open blocks that stopped growing: GC victims too (gc.victims)
        self.pacing = ForegroundPacing(store.recent_reads)  # the foreground's idle reads, the last pass's rate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last_error: str | None = None
        self._failed_at = -1  # `passes` when a background pass last failed: failing until a pass succeeds after it
        self.totals = PassReport()
        store.add_read_observer(self._observe_read)
        self._learns_from_reads = True

    # ---- lifecycle ----

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="blockstore-compactor", daemon=True)
            self._thread.start()

    def stop(self, flush: bool = True) -> None:
        """Stop the thread after its current batch; persist what was learned (unless `flush=False`, or the
        store is read-only: a planning or inspecting opener has nothing of its own to write)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._learns_from_reads:
            self.store.remove_read_observer(self._observe_read)
        if flush and not self.store.read_only:
            self.flush()

    def flush(self) -> None:
        self.tracker.flush(self.store.dir)
        b = DirectoryBatch()
        totals = counters.encode(self.gc_bytes, self.relocated_bytes, self.reclaimed, self.groups_moved,
                                 self.read_bytes)
        if totals != self._flushed_counters:
            b.put(counters.KEY, totals)
        if not b.empty:  # a pass that did nothing writes nothing (issue 17: a no-op compact grew the directory)
            self.store.dir.write(b)
        self._flushed_counters = totals

    def _load_counters(self) -> None:
        vals, self._flushed_counters = counters.load(self.store.dir)
        self.gc_bytes, self.relocated_bytes, self.reclaimed, self.groups_moved, self.read_bytes = vals

    def _loop(self) -> None:
        self.pacing.background_thread(self._stop, self.policy.interval_s)  # CPU priority below the foreground's
        wait = self.policy.interval_s
        while not self._stop.wait(wait):
            wait = self.policy.interval_s
            try:
                self.run_pass(pace=True)
                self.flush()
            except StoreClosed:
                return
            except BlockstoreError as exc:  # a full disk, an I/O error: retried next interval
                self.last_error, self._failed_at = str(exc), self.passes
                _log.warning("compaction pass failed: %s", exc)
            except Exception as exc:  # a bug: kept for status with its traceback, never the thread's end (the
                # store would grow unreclaimed with nothing to say why); retried after BUG_RETRY_S, not spun on
                self.last_error, self._failed_at = f"{type(exc).__name__}: {exc}", self.passes
                _log.exception("compaction pass failed unexpectedly; retrying in %.0f s", BUG_RETRY_S)
                wait = max(BUG_RETRY_S, self.policy.interval_s)

    # ---- hints and observations (the explicit affinity seams for callers) ----

    def hint(self, keys: list[bytes], *, ns: str = "default", weight: float = 1.0) -> None:
        """Tell the compactor these KV keys of namespace `ns` are used together."""
        nid = self.store.namespace_id(ns)
        if nid is not None:
            self.tracker.hint([key_suffix(nid, SPACE_KV, k) for k in keys], weight)

    def learn_from_lookups(self) -> None:
        """Stop learning co-access from the store's reads; the caller reports each request's lookup with
        `observe_lookup` instead. For a tiered cache (the LMCache connector) whose lookups name a
        request's whole prefix while a load reads only what the tier above lacked: counting both would
        credit every request twice."""
        self.store.remove_read_observer(self._observe_read)
        self._learns_from_reads = False

    @property
    def learns_from_reads(self) -> bool:
        return self._learns_from_reads

    @property
    def damaged_blocks(self) -> frozenset[int]:
        """Victims GC left for `fsck --repair` (a live record that does not verify, or the file missing)."""
        return frozenset(self._min_seqs.damaged)

    def observe_lookup(self, found: Sequence[tuple[str, Sequence[bytes], Sequence[Location | None]]]) -> None:
        """One request's lookup, as (namespace, KV keys, their locations from `Store.locate_many`) per
        namespace: one co-access observation, as a read observer makes of one batched read."""
        suffixes: list[bytes] = []
        locs: list[Location | None] = []
        for ns, keys, located in found:
            if not any(loc is not None for loc in located):
                continue
            nid = self.store.namespace_id(ns)
            if nid is not None:
                suffixes += [key_suffix(nid, SPACE_KV, k) for k in keys]
                locs += located
        self._observe_read(suffixes, locs)

    def _observe_read(self, suffixes: Sequence[bytes], locs: Sequence[Location | None]) -> None:
        """One request: learned from, and its bytes refill relocation's budget (budget_left)."""
        self.read_bytes += sum(loc.record_len for loc in locs if loc is not None)
        self.tracker.observe(suffixes, locs)

    # ---- work ----

    def budget_left(self, spent: float, fraction: float, *, reads: bool = False, relocated: bool = False) -> float:
        """What a budget of `fraction` x the bytes users put allows beyond `spent`; with `reads`, plus
        the policy's `relocation_read_budget` x the bytes observed requests read. Relocation's refills
        with reads as well as writes: a store that is read keeps earning moves, and a reopened store
        relocates again once it is read (with the writes alone, a read-mostly store spent its budget
        once and relocated nothing after). With `relocated` (GC's), the bytes relocation rewrote count
        as put: every byte it moved left a dead one behind, which GC must be able to reclaim."""
        per_read = self.policy.relocation_read_budget if reads else 0.0
        if fraction == float("inf") or per_read == float("inf"):
            return float("inf")
        base = self.store.io_counters()[0] + (self.relocated_bytes if relocated else 0)
        return fraction * base + per_read * self.read_bytes - spent

    def run_pass(self, *, dry_run: bool = False, pace: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> PassReport:
        """One pass: relocate scattered groups that are due, then GC victims past the threshold."""
        with self._pass_lock:
            started = time.monotonic()
            rep = PassReport(dry_run=dry_run)
            pacer = self.pacing.pacer(self.policy.rate_mb_s * 1e6, self._stop) if pace else None
            try:
                room = Room(self.store)  # a low disk: GC victim by victim, relocation waits (room.py)
                if self.policy.relocation and not room.low and (pacer is None or time.monotonic() >= self._plan_after):
                    self._relocate(rep, dry_run, pacer, progress)
                if self.policy.gc:
                    self._collect(rep, dry_run, pacer, progress, room)
                if not dry_run:
                    # one synced directory write makes the pass's moves durable; the blocks they emptied go now
                    self._reclaimed(rep, self.store.sync_moves())
                self.passes += 1
            finally:  # a failed pass too: the switch interval is the whole process's (and the thread rests now)
                self.pacing.pass_done(pacer)
            if not dry_run:
                for name in ("relocated_groups", "relocated_records", "relocated_bytes", "gc_blocks", "gc_records",
                             "gc_bytes", "reclaimed_blocks", "lost_races", "tombstones_carried", "tombstones_dropped",
                             "copies_placed", "copies_dropped", "skipped_budget", "skipped_budget_relocation",
                             "skipped_shadow", "skipped_room"):
                    setattr(self.totals, name, getattr(self.totals, name) + getattr(rep, name))
                if metrics.enabled:
                    metrics.compaction_pass_done(time.monotonic() - started, rep.gc_bytes, rep.relocated_bytes)
                if rep.did_work or rep.reclaimed_blocks:
                    _log.info("%s: compaction pass: relocated %d group(s) (%d records, %d bytes); GC copied %d "
                              "block(s) (%d records, %d bytes); reclaimed %d block(s); %d lost race(s); %d "
                              "skipped over budget", self.store.path, rep.relocated_groups, rep.relocated_records,
                              rep.relocated_bytes, rep.gc_blocks, rep.gc_records, rep.gc_bytes,
                              rep.reclaimed_blocks, rep.lost_races, rep.skipped_budget)
            return rep

    def run_until_idle(self, *, max_passes: int = 100, dry_run: bool = False,
                       progress: Callable[[str, int, int], None] | None = None) -> PassReport:
        total = PassReport(dry_run=dry_run)
        for _ in range(1 if dry_run else max_passes):
            try:
                rep = self.run_pass(dry_run=dry_run, progress=progress)
            except NoSpace as exc:  # a disk still short after passes that freed some (room.py): what they did stands
                if not total.did_work and not total.reclaimed_blocks:
                    raise
                total.stopped = str(exc)
                break
            for name, value in asdict(rep).items():
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(total, name, getattr(total, name) + value)
            total.planned_groups += rep.planned_groups
            total.planned_victims += rep.planned_victims
            total.skipped_budget = rep.skipped_budget  # what the last pass still had to leave (not a sum)
            total.skipped_budget_relocation = rep.skipped_budget_relocation
            total.skipped_room = rep.skipped_room
            if not rep.did_work:
                break
        if not dry_run:
            self.flush()
        return total

    def _relocate(self, rep: PassReport, dry_run: bool, pacer: Pacer | None,
                  progress: Callable[[str, int, int], None] | None) -> None:
        """Rewrite each due cluster (clusters.py) that sits in more blocks than its bytes need (plus the slack),
        less the records whose move would not pay (shadow.py), into one block, the moves saving most blocks per
        byte of cost first (relocation.hole_cost), within the relocation budget, which pays holes too."""
        planning = time.monotonic()
        ranked = self.tracker.ranked(MAX_GROUPS_PER_PASS, self.policy.min_hits)
        if not ranked:
            return
        keys = list(dict.fromkeys(k for g, _due in ranked for k in g.keys))
        locs = {k: loc for k, loc in zip(keys, self.store.dir.get_locations(keys)) if loc is not None}
        sizes = {k: loc.record_len for k, loc in locs.items()}
        built = clusters.build(ranked, sizes, relocation.usable_bytes(self.store.block_size), self._clusters)
        if not dry_run:
            self._clusters = [(c.gid, tuple(c.keys)) for c in built]
        if self.policy.max_copies:
            clusters.borrow(built, ranked, sizes, relocation.usable_bytes(self.store.block_size),
                            {k: self.policy.max_copies - len(loc.copies) for k, loc in locs.items()})
        moves = self._plan_moves(ranked, [c for c in built if c.due], locs, rep, dry_run)
        if pacer is not None:
            self._plan_after = time.monotonic() + min(PLAN_SPACING * (time.monotonic() - planning), PLAN_WAIT_MAX_S)
        for i, m in enumerate(moves):
            if self._stop.is_set():
                return
            if pacer is not None:
                gc.yield_gil()
            spent = self.relocated_bytes + self.hole_debt + (rep.planned_bytes if dry_run else 0)
            left = self.budget_left(spent, self.policy.relocation_budget, reads=True)
            if left <= 0:
                rep.skipped_budget += len(moves) - i
                rep.skipped_budget_relocation += len(moves) - i
                return
            if progress is not None:
                progress("relocate", i, len(moves))
            if max(m.where.bytes, m.cost) > left:
                rep.skipped_budget += 1
                rep.skipped_budget_relocation += 1
                continue
            # copies ride along with a rewrite that happens anyway, while the budget covers them (measured: copies
            # that made a cluster due spent it on rewrites buying less than those they displaced; docs/copies.md)
            c = m.cluster
            borrowed = [(k, locs[k]) for k in c.borrowed] if m.where.bytes + c.borrowed_bytes <= left else []
            # no copy into the block the move lands in where the record has a place (stragglers joining it; H35)
            borrowed = [(k, v) for k, v in borrowed if all(p.block_id != m.dest for p in v.places())]
            rep.planned_groups.append(c.gid)
            rep.planned_bytes += m.where.bytes + sum(v.record_len for _k, v in borrowed)
            if dry_run:
                continue
            res = relocation.relocate(self.store, c.gid, m.where, partition=m.partition, borrowed=borrowed)
            self.tracker.settled(c.gids, persist=True)
            self.relocated_bytes += res.moved_bytes + res.copied_bytes
            self.hole_debt += max(0.0, m.cost - m.where.bytes) * res.moved_bytes / max(1, m.where.bytes)
            rep.copies_placed += res.copied
            self.groups_moved += 1
            rep.relocated_groups += 1
            rep.relocated_records += res.moved
            rep.relocated_bytes += res.moved_bytes
            rep.lost_races += res.lost_race
            if pacer is not None:
                pacer(res.moved_bytes)

    def _plan_moves(self, ranked: Sequence[tuple[Group, bool]], todo: Sequence[clusters.Cluster],
                    locs: dict[bytes, Location], rep: PassReport, dry_run: bool) -> list[_Move]:
        """The moves worth making among the due clusters, the most blocks saved per byte first. A cluster
        none of whose due groups is scattered, or whose move the shadow says saves nothing, is settled
        (not due again until it is read `min_hits` more times)."""
        if not todo:
            return []
        if self.budget_left(self.relocated_bytes + self.hole_debt, self.policy.relocation_budget, reads=True) <= 0:
            rep.skipped_budget += len(todo)  # nothing planned or settled: they stay due for the next budget
            rep.skipped_budget_relocation += len(todo)
            return []
        groups = {g.gid: g for g, _due in ranked}
        due = {g.gid for g, is_due in ranked if is_due}
        seen = shadow.Shadow(shadow.readers(self.tracker, ranked), {k: [p.block_id for p in loc.places()] for k, loc in locs.items()})
        fan_in: dict[bytes, set[int]] = {}  # the groups that read each record
        for g, _due in ranked:
            for k in g.keys:
                fan_in.setdefault(k, set()).add(g.gid)
        table = {e.block_id: e for e in self.store.block_table()}
        self._open = {e.partition: e.block_id for e in table.values() if e.state == BLOCK_OPEN}
        prior = shadow.WriteNeighbours(self.store)
        out: list[_Move] = []
        for cluster in todo:
            where = relocation.layout([(k, locs[k]) for k in cluster.keys], self.store.block_size)
            mine = set(cluster.keys)
            skip = not any(self._scattered(groups[gid], locs, mine) for gid in cluster.gids if gid in due)
            if not skip:
                # a record several groups read has readers to come that no request has shown yet: they
                # are expected to read it with the records it was written beside (shadow.WriteNeighbours)
                prior.add_to(seen, [(k, loc) for k, loc in where.live if len(fan_in.get(k, ())) > 1])
                part, dest, moving = self._shadowed(where, table, seen)
                if moving is None:
                    rep.skipped_shadow += 1
                    skip = True
                else:
                    saved = seen.saving([k for k, _loc in moving.live], dest)
                    seen.moved([k for k, _loc in moving.live], dest)
                    cost = relocation.hole_cost(moving, table, self.policy)
                    out.append(_Move(cluster, moving, part, saved / max(1.0, cost), dest, cost))
            if skip and not dry_run:
                self.tracker.settled(cluster.gids, persist=False)  # together already, or not worth it
        out.sort(key=lambda m: -m.value)
        return out

    def _scattered(self, group: Group, locs: dict[bytes, Location], cluster: set[bytes]) -> bool:
        """Whether rewriting `cluster` would buy the group a block: its live records sit in more blocks than
        their bytes need plus the slack, and its records in this cluster in more than one. A cluster is
        judged by its requests, not as a whole: one whose groups each read one block stays put however
        its records spread (clusters that shift by a record would be rewritten pass after pass), and one
        that holds its part of a scattered group in one block already is left too (the group is spread
        over other clusters: rewriting this one moved bytes for nothing)."""
        keys = [k for k in group.keys if k in locs]
        # each record where a read of the group finds it: a record with copies counts in one of its blocks
        live = [(k, loc) for k, loc in zip(keys, choose_places([locs[k] for k in keys])) if loc is not None]
        where = relocation.layout(live, self.store.block_size)
        inside = {loc.block_id for k, loc in live if k in cluster}
        return where.blocks > where.needed + self.policy.relocation_slack and len(inside) > 1

    def _shadowed(self, where: relocation.GroupLayout, table: dict[int, BlockEntry],
                  seen: shadow.Shadow) -> tuple[bytes, int, relocation.GroupLayout | None]:
        """Where a scattered cluster goes (partition, and the block in the shadow) and which of its records
        move there: those whose move saves the requests that read them blocks (shadow.py); None when
        none does."""
        part, stragglers = self._destination(where, table)
        home = relocation.main_block(where) if stragglers else None
        entry = table.get(home) if home is not None else None
        # stragglers join their main block when it is open in the partition they go to; else a block anew
        joins = entry is not None and entry.state == BLOCK_OPEN and entry.partition == part
        # else the partition's open block while it has the room (the engine keeps a move together there)
        room = table.get(self._open.get(part, 0))
        fits = room is not None and room.data_end + where.bytes <= self.store.block_size - 8192
        dest = home if joins and home is not None else room.block_id if fits and room else seen.new_block()
        live = [(k, loc) for k, loc in where.live if loc.block_id != home]
        keep = set(seen.worth_moving([k for k, _loc in live], dest))
        if not keep:
            return part, dest, None
        # a whole cluster's rewrite takes the records already in that block too: it keeps them in
        # temporal (sequence) order
        keep |= {k for k, loc in live if loc.block_id == dest}
        return part, dest, relocation.layout([(k, loc) for k, loc in live if k in keep], self.store.block_size)

    def _destination(self, where: relocation.GroupLayout, table: dict[int, BlockEntry]) -> tuple[bytes, bool]:
        """Where a scattered cluster goes, and whether only its records outside its main block move. When
        its main block is still open with room for the rest, the rest joins it there: a cluster that
        gained a record since its last rewrite costs that record, not the cluster again. (Only when
        that block holds most of it: else the whole cluster is rewritten, in sequence order.)"""
        home = table.get(relocation.main_block(where))
        part = relocation.RELOCATION_PARTITION
        if self.policy.copy_to == "partition" and home is not None:
            part = home.partition
        if self.policy.stragglers_only:
            return part, True
        if home is None or home.state != BLOCK_OPEN or self.policy.copy_to != "partition":
            return part, False
        rest = sum(loc.record_len for _k, loc in where.live if loc.block_id != home.block_id)
        return part, rest <= where.bytes - rest and rest <= self.store.block_size - home.data_end - 8192

    def _reclaimed(self, rep: PassReport, gone: list[int]) -> None:
        for bid in gone:
            hooks.fire("compact.reclaim", "gc", bid)
        rep.reclaimed_blocks += len(gone)
        self.reclaimed += len(gone)

    def _collect(self, rep: PassReport, dry_run: bool, pacer: Pacer | None,
                 progress: Callable[[str, int, int], None] | None, room: Room) -> None:
        # one copy of the block table per pass: victims and the tombstone floor (MinSeqs) both use it
        table = self.store.block_table()
        self._min_seqs.snapshot(table)
        chosen = gc.victims(table, self.policy.gc_invalid_ratio, idle=self._open_idle.note(table))
        planned_gc = 0  # a dry run's planned copies, counted against the budget as real ones would be
        for i, e in enumerate(chosen):
            if self._stop.is_set():
                return
            if pacer is not None:
                gc.yield_gil()
            if progress is not None:
                progress("gc", i, len(chosen))
            if e.state != BLOCK_OPEN and gc.only_needed_tombstones(e, self._min_seqs):  # open: gc.collect
                continue
            if e.live_bytes > self.budget_left(self.gc_bytes + planned_gc, self.policy.gc_budget, relocated=True):
                rep.skipped_budget += 1
                continue
            rep.planned_victims.append(e.block_id)
            rep.planned_bytes += e.live_bytes
            rep.planned_gc_bytes += e.live_bytes
            if dry_run:
                planned_gc += e.live_bytes
                continue
            res = room.collect(e, self._min_seqs, pace=pacer, to_partition=self.policy.copy_to == "partition",
                               reclaimed=lambda gone: self._reclaimed(rep, gone))
            if res is None:  # left for want of room
                rep.skipped_room += 1
                continue
            self.gc_bytes += res.moved_bytes
            rep.gc_blocks += not res.damaged  # a block left for fsck --repair is no work done
            rep.gc_records += res.moved
            rep.gc_bytes += res.moved_bytes
            rep.lost_races += res.lost_race
            rep.tombstones_carried += res.tombstones_carried
            rep.tombstones_dropped += res.tombstones_dropped
            rep.copies_dropped += res.copies_dropped
            if res.reclaimed:
                self.reclaimed += 1
                rep.reclaimed_blocks += 1
        if room.refused is not None and not rep.gc_blocks and not rep.reclaimed_blocks:
            raise room.full()  # nothing fits what is free: say how much room it needs

    # ---- reporting ----

    def status(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "running": self._thread is not None and self._thread.is_alive(),
            "passes": self.passes,
            "groups_tracked": len(self.tracker),
            "keys_tracked": self.tracker.key_count(),
            "requests_observed": self.tracker.requests,
            "gc_bytes_total": self.gc_bytes,
            "relocated_bytes_total": self.relocated_bytes,
            "blocks_reclaimed_total": self.reclaimed,
            "groups_relocated_total": self.groups_moved,
            "last_error": self.last_error, "failing": self.last_error is not None and self._failed_at == self.passes,
        }


def attach(store: Store, spec: str | Policy | dict[str, Any] | None, *, judge: AffinityJudge | None = None,
           background: bool = True) -> Compactor:
    """What `blockstore.open(..., compaction=spec)` calls: a compactor bound to the store, started."""
    if isinstance(spec, dict) and "background" in spec:
        spec = dict(spec)
        background = spec.pop("background")
        if not isinstance(background, bool):  # bool("false") is True: a str here ran the thread it meant to stop
            raise InvalidArgument(f"compaction setting background must be true or false, got {background!r}")
    c = Compactor(store, resolve(spec), judge=judge)
    if background:
        c.start()
    return c
