"""The write engine (docs/format.md §3): what the group-commit leader does with a group.

The leader (leader.py) applies a group in four steps: plan (each record's block and sequence number,
deletes and compare-and-swap moves decided against the directory), append (one backend call per block,
synced when the group must be durable), publish (one directory batch), adopt (in-memory state follows
what committed; emptied blocks go). A put is acknowledged only after its bytes and its directory entry
are written (and in `sync` mode, durable).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockstore import foreground, hooks
from blockstore.blocklife import BlockLifecycle
from blockstore.blocks import OpenBlock
from blockstore.directory import BLOCK_SEALED, BlockEntry, DirectoryBatch, Location
from blockstore.errors import BlockstoreError, NoSpace
from blockstore.keys import (
    block_key,
    chunk_session_key_strict,
    key_suffix,
    namespace_id_key,
    namespace_key,
    session_key,
    suffix_ns_id,
)
from blockstore.mutations import COPY_ADD, COPY_DROP, Mutation, retired_places, value_after
from blockstore.records import AppendRecord, Kind, aligned_flags, record_layout

_log = logging.getLogger("blockstore")


@dataclass(slots=True)
class Planned:
    """The records of one group that go to one open block, in order."""

    block: OpenBlock
    records: list[AppendRecord] = field(default_factory=list)


@dataclass(slots=True)
class GroupPlan:
    """What the plan step decided for a group; the append and publish steps carry it out."""

    batch: DirectoryBatch
    created_ns: dict[str, int]  # namespaces this group creates (published only once it commits)
    current: dict[bytes, Location | None]  # each key suffix's location, updated as the group's records land
    seq: int  # the next sequence number once the group's records have theirs
    planned: dict[int, Planned] = field(default_factory=dict)  # by block id
    tails: dict[int, int] = field(default_factory=dict)  # each planned block's tail after the group
    placed: list[tuple[Mutation, bytes, OpenBlock, AppendRecord]] = field(default_factory=list)
    retired_tombstones: list[int] = field(default_factory=list)  # old blocks of tombstone moves
    dropped: list[tuple[Mutation, bytes]] = field(default_factory=list)  # copies dropped (no record written)
    moves: bool = False  # compaction moves: durable whatever the mode
    deletes: bool = False  # a delete is durable when it returns, whatever the mode
    overwrites: bool = False  # an overwrite's new bytes are synced before the directory names them


def takes_effect(m: Mutation, suffix: bytes, plan: GroupPlan, live_after: dict[bytes, bool],
                 touched: set[bytes]) -> bool:
    """Whether a mutation of the group writes a record; sets `m.result` for deletes and moves.
    `live_after`: whether each key is live after the group's mutations so far; `touched`: keys a put or
    delete of the group changed."""
    if m.expected is not None and m.expected.kind == Kind.TOMBSTONE:
        # a tombstone leaves its old block (compaction): carried only while the key stays
        # deleted, since a newer put supersedes every older record anyway
        plan.retired_tombstones.append(m.expected.block_id)
        m.result = not m.drop and suffix not in touched and not live_after[suffix]
        return bool(m.result)
    if m.copy_op:
        # a copy added or dropped: compare-and-swap on the whole value, copies included (docs/copies.md);
        # one compaction change per key in a group (a second would compare with the same old value)
        cur = plan.current[suffix]
        m.result = suffix not in touched and cur is not None and cur == m.expected
        touched.add(suffix)
        if m.result and m.copy_op == COPY_DROP:
            plan.dropped.append((m, suffix))  # writes no record: staged before the group's records
            return False
        return bool(m.result)
    if m.expected is not None:
        # compare-and-swap: move only if the directory still names the old place (invariant 3;
        # Badger issue 2310 resurrected deleted keys by skipping this check)
        cur = plan.current[suffix]
        m.result = suffix not in touched and cur is not None and cur.same_place(m.expected)
        touched.add(suffix)
        return bool(m.result)
    if m.kind == Kind.TOMBSTONE:
        m.result = live_after[suffix]
        if not m.result:
            return False  # deleting a missing key writes nothing
    touched.add(suffix)
    return True


class WriteEngine(BlockLifecycle):
    """The engine behind a writable Store: group commit over the block lifecycle (blocklife.py)."""

    seal_observers: list[Callable[[int], None]]  # called with each block id once its seal is committed
    # called (with the state lock held) with the entries each commit put in the block table: the remote
    # tier's waits track the blocks not yet confirmed this way, at a cost per commit, not per table size
    table_observer: Callable[[dict[int, BlockEntry]], None] | None = None
    # the durability the last writer ran under (the MANIFEST's, set before load_state): what recovery holds a crashed session to
    last_durability: str | None = None

    def close_writes(self) -> BlockstoreError | None:
        """The writing part of a close, with the leader slot held: seal every open block, make everything
        durable, mark the store clean. None if all of it happened, else the first error (the store is then
        not marked clean, and the next open recovers it)."""
        with self.slot.exclusive(last=True):
            self.settle_failed_commit()  # before a footer goes where a replayed commit put records
            sealing = [ob.entry.block_id for ob in list(self._placement.open.values()) + self._placement.retired]
            failed = self.seal_all()
            self.dir.flush()
            if failed is None:
                b = DirectoryBatch()
                b.put_meta("clean", 1)
                self.dir.write(b, force_sync=True)
        with self.state_lock:
            sealed = [bid for bid in sealing if bid in self.table and self.table[bid].state == BLOCK_SEALED]
        self.announce_sealed(sealed)
        return failed

    def announce_sealed(self, block_ids: list[int]) -> None:
        """Tell the seal observers (the remote tier's uploader) about blocks whose seal just committed.
        An observer's exception is logged, never raised into the write that sealed the block."""
        for bid in block_ids:
            for observe in list(getattr(self, "seal_observers", ())):
                try:
                    observe(bid)
                except Exception:
                    _log.exception("seal observer failed for block %016x", bid)

    def seal_open_blocks(self, up_to: int, only: frozenset[int] | None = None) -> list[int]:
        """Seal every open block with an id <= `up_to` now, whatever its size and age (remote durability:
        a put waits for its block's upload, so its block must not wait to fill). One synced directory
        write; returns the blocks sealed. `only`: just those of them (compaction's GC of idle open blocks)."""
        self.check_open(write=True)
        with self.slot.exclusive():
            self.settle_failed_commit()
            obs = [ob for ob in list(self._placement.open.values()) + self._placement.retired
                   if ob.entry.block_id <= up_to and (only is None or ob.entry.block_id in only)]
            if not obs:
                return []
            batch = DirectoryBatch()
            entries: dict[int, BlockEntry] = {}
            for ob in obs:
                self._seal(ob, batch, entries)
            for e in entries.values():
                batch.put_block(e)
            self.dir.write(batch, force_sync=True)
            # committed: the blocks leave rotation (a failure above leaves them open, to be sealed later)
            gone = {id(ob) for ob in obs}
            self._placement.open = {k: v for k, v in self._placement.open.items() if id(v) not in gone}
            self._placement.retired = [ob for ob in self._placement.retired if id(ob) not in gone]
            with self.state_lock:
                self.table.update(entries)
                if self.table_observer is not None:
                    self.table_observer(entries)
            for ob in obs:
                self._close_fd(ob)
            empty = [bid for bid, e in entries.items() if self.reclaimable(e)]
            if empty:
                self.delete_blocks(empty)
        sealed = [bid for bid in entries if bid not in empty]
        self.announce_sealed(sealed)
        return sealed

    def submit(self, muts: list[Mutation]) -> None:
        """Group commit: queue, and either lead a group or wait for a leader to apply ours."""
        self.slot.submit(muts, self._apply, lambda: self.check_open(write=True))

    # ---- the leader's work ----

    def _apply(self, muts: list[Mutation]) -> None:
        to_seal: list[OpenBlock] = []
        try:
            self._apply_group(muts, to_seal)
        except BaseException as exc:
            # blocks taken out of rotation but not sealed: seal them at close (or recovery does)
            self._placement.retired.extend(ob for ob in to_seal if ob not in self._placement.retired)
            if isinstance(exc, NoSpace):
                raise self.no_space(exc) from exc
            raise

    def no_space(self, exc: NoSpace, *, closing: bool = False) -> NoSpace:
        """The NoSpace a caller sees: what happened and what to do (it used to name neither)."""
        if "free space" in str(exc):
            return exc  # explained already
        code = errno.EDQUOT if exc.errno == errno.EDQUOT or "quota" in str(exc).lower() else errno.ENOSPC
        state = "over its disk quota (EDQUOT)" if code == errno.EDQUOT else "full (ENOSPC)"
        if closing:
            then = ("close() could not finish: the store is closed but not marked clean, and the next open "
                    "recovers it (nothing acknowledged is lost); free space before reopening it")
        else:
            then = ("this write failed and was not acknowledged, and every write acknowledged before it is intact; "
                    "free space there and retry: the store resumes writing by itself once there is room (no reopen "
                    "needed)")
        return NoSpace(code, f"{exc.strerror or exc} -- the filesystem holding store {self.path!r} is {state}: {then}")

    def settle_failed_commit(self) -> None:
        """The last group's directory write failed, yet RocksDB may hold its batch whole (a WAL sync that
        failed after the write), and the reopen that resumes the directory replays it. Before anything is
        appended again (an append at the restored tail would overwrite records the directory names),
        resume the directory and look: if the batch is there, adopt what it committed (its records were
        never acknowledged, but they are stored now); else forget it."""
        u = self._unsure
        if u is None:
            return
        self.dir.resume()  # NoSpace while the disk is still full: nothing is appended, the next write looks
        bid, staged, post, created_ns, seq, bytes_put, bytes_written, entries = u
        raw = self.dir.get(block_key(bid))
        self._unsure = None
        if raw != staged:  # the entry as the failed batch put it (a group of copy drops only changes no record count)
            return
        _log.warning("%s: a directory write reported as failed was found committed after the directory "
                     "was reopened; its %d bytes of records are kept", self.path, bytes_written)
        for ob, tail, e, lo, hi, n in post:
            ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records = tail, e, lo, hi, n
        with self.state_lock:
            self.ns_ids.update(created_ns)
            self.next_seq = max(self.next_seq, seq)
            self.bytes_put_total += bytes_put
            self.bytes_written_total += bytes_written
            self.table.update(entries)
            if self.table_observer is not None:
                self.table_observer(entries)

    def _apply_group(self, muts: list[Mutation], to_seal: list[OpenBlock]) -> None:
        """Apply one group: plan (blocks, sequence numbers, compare-and-swap), append (one backend call
        per block), publish (one directory batch), then update the in-memory state it committed."""
        self.settle_failed_commit()
        hooks.fire("write.begin")
        plan = self._plan_group(muts, to_seal)
        placements = self._append_group(plan)
        hooks.fire("write.appended")
        self._publish_group(plan, placements, to_seal)

    def _plan_group(self, muts: list[Mutation], to_seal: list[OpenBlock]) -> GroupPlan:
        """Pick each record's block, rotating full and idle blocks out (into `to_seal`), and assign
        sequence numbers; decide each delete and move against the directory as it is now."""
        batch = DirectoryBatch()
        ns_ids, created_ns = self._resolve_namespaces(muts, batch)
        suffixes = [m.suffix or key_suffix(ns_ids[m.ns], m.space, m.key) for m in muts]
        unique = list(dict.fromkeys(suffixes))
        plan = GroupPlan(batch, created_ns, dict(zip(unique, self.dir.get_locations(unique))), self.next_seq)
        to_seal.extend(self._placement.idle_blocks())
        live_after: dict[bytes, bool] = {s: plan.current[s] is not None for s in plan.current}
        touched: set[bytes] = set()  # keys a put or delete of this group changed
        pending_need = 0  # a relocation set's size, carried to its first move that wins its CAS
        per_partition = Counter(m.partition for m in muts if m.expected is None)
        for m, suffix in zip(muts, suffixes):
            pending_need = max(pending_need, m.group_need)
            if not takes_effect(m, suffix, plan, live_after, touched):
                continue
            plen = len(m.payload)  # type: ignore[arg-type]
            need = max(len(m.key) + len(m.meta) + plen, pending_need)
            pending_need = 0
            ob = self._placement.block_for(m.partition, need, plan.tails, to_seal, batch, moved=m.expected is not None,
                                 lone=m.expected is None and per_partition[m.partition] == 1)
            tail = plan.tails.get(ob.entry.block_id, ob.tail)
            _poff, rlen = record_layout(tail, len(m.key), len(m.meta), plen, aligned_flags(plen))
            plan.tails[ob.entry.block_id] = tail + rlen
            nid = suffix_ns_id(suffix)
            if m.expected is not None:  # a relocated copy keeps its sequence number: same record, new place
                rec = AppendRecord(m.kind, nid, m.key, m.meta, m.payload, m.expected.seq, m.payload_xxh3)
            else:
                rec = AppendRecord(m.kind, nid, m.key, m.meta, m.payload, plan.seq, m.payload_xxh3)
                plan.seq += 1
            plan.planned.setdefault(ob.entry.block_id, Planned(ob)).records.append(rec)
            plan.placed.append((m, suffix, ob, rec))
            live_after[suffix] = m.kind != Kind.TOMBSTONE
        # Moves (compaction) are durable whatever the mode: their source is deleted once the directory
        # names the copy, and what a clean close made durable must not become volatile again.
        plan.moves = any(m.expected is not None for m in muts)
        # A delete is durable when it returns, whatever the mode: in cache mode a power cut may lose
        # recent puts, but never bring back a key whose delete was acknowledged (docs/durability).
        plan.deletes = any(m.kind == Kind.TOMBSTONE and m.expected is None and m.result for m in muts)
        # An overwrite's new bytes are synced before the directory batch names them, in cache mode
        # too: the kernel may write the directory's WAL back before the block's pages, and a power
        # cut must then leave the key with its new value or its old one, never neither (found by
        # tests/power_loss.py). The directory write itself stays unsynced: losing it keeps the old value.
        plan.overwrites = any(m.expected is None and m.kind != Kind.TOMBSTONE and plan.current[s] is not None
                              for m, s, _ob, _rec in plan.placed)
        return plan

    def _append_group(self, plan: GroupPlan) -> dict[int, list[Any]]:
        """Write: one backend call per block; it ends with that block's fdatasync when the group must
        be durable. The placements (where each record landed) by block id."""
        placements: dict[int, list[Any]] = {}
        sync = self.durability == "sync" or plan.moves or plan.deletes or plan.overwrites
        for bid, pl in plan.planned.items():
            ob = pl.block
            try:
                pls, _end = self.backend.append(ob.fd, ob.tail, pl.records, sync)
            except BlockstoreError as exc:
                # NoSpace keeps the block in rotation at its last good tail (the next append overwrites
                # the failed bytes): retiring it opened a new block file, holding its descriptor, for
                # every retry while the disk stayed full
                if not isinstance(exc, NoSpace):
                    self._placement.retire(ob)
                raise
            placements[bid] = pls
        return placements

    def _group_entry(self, entries: dict[int, BlockEntry], bid: int, to_seal: list[OpenBlock]) -> BlockEntry:
        """The block entry this group changes, copied once per group."""
        if bid not in entries:
            entries[bid] = self.table[bid].copy() if bid in self.table else self._placement.open_entry(bid, to_seal)
        return entries[bid]

    def _stage_records(self, plan: GroupPlan, placements: dict[int, list[Any]], entries: dict[int, BlockEntry],
                       to_seal: list[OpenBlock]) -> tuple[int, int]:
        """Stage each placed record in the batch: its location, the old one dead, both blocks' counters,
        the chunk session index. Returns (logical bytes put, bytes appended)."""
        batch, current, now = plan.batch, plan.current, time.time_ns()
        bytes_put = bytes_written = 0
        for m, suffix in plan.dropped:  # first: a later put of the key in the group retires what is left
            old = current[suffix]
            assert old is not None and m.place is not None
            self._retire_places(m, old, entries, to_seal, batch)
            kept = current[suffix] = old.without(m.place.block_id, m.place.offset)
            batch.put_location(suffix, kept)
            if (kept.block_id, kept.offset) != (old.block_id, old.offset):  # a copy is the primary: its block
                self._group_entry(entries, kept.block_id, to_seal).live_logical_bytes += len(m.key) + kept.payload_len  # (even the same one) takes the key's bytes
        index: dict[int, int] = {bid: 0 for bid in plan.planned}
        for m, suffix, ob, rec in plan.placed:
            foreground.step_aside()  # a background leader pauses while a read is in flight (foreground.py)
            bid = ob.entry.block_id
            p = placements[bid][index[bid]]
            index[bid] += 1
            old = current[suffix]
            e = self._group_entry(entries, bid, to_seal)
            e.written_bytes += p.record_len
            e.total_records += 1
            e.data_end = p.offset + p.record_len
            e.last_append_ns = now
            e.partition = ob.entry.partition  # a block taken over by another partition names its new writer
            bytes_written += p.record_len
            self._retire_places(m, old, entries, to_seal, batch)
            if old is not None and old.kind == Kind.CHUNK and m.expected is None:
                batch.delete(chunk_session_key_strict(suffix, old))
            if m.kind == Kind.TOMBSTONE:
                e.tombstones += 1
                batch.delete_location(suffix, None)
                current[suffix] = None
            else:
                plen = len(m.payload)  # type: ignore[arg-type]
                loc = value_after(m, old, Location(m.kind, p.flags, p.payload_off, bid, p.offset, p.record_len,
                                                   plen, rec.seq, p.payload_xxh3, m.meta))
                batch.put_location(suffix, loc)
                current[suffix] = loc
                e.live_bytes += p.record_len
                e.live_records += 1
                if m.copy_op != COPY_ADD:  # logical bytes count once per key, in its primary's block
                    e.live_logical_bytes += len(m.key) + plen
                if m.expected is None:
                    bytes_put += len(m.key) + plen
                if m.chunk_index is not None:
                    user, session, ts, cid = m.chunk_index
                    batch.put(session_key(suffix_ns_id(suffix), user, session, ts, cid), b"")
            ob.min_seq = min(ob.min_seq or rec.seq, rec.seq)
            ob.max_seq = max(ob.max_seq, rec.seq)
            ob.records += 1
        return bytes_put, bytes_written

    def _retire_places(self, m: Mutation, old: Location | None, entries: dict[int, BlockEntry],
                       to_seal: list[OpenBlock], batch: DirectoryBatch) -> None:
        """The old value's places `m` retires turn dead in their blocks (a put or delete: all, invariant 8)."""
        for gone in retired_places(m, old):
            oe = self._group_entry(entries, gone.block_id, to_seal)
            oe.live_bytes -= gone.record_len
            oe.live_records -= 1
            if old is not None and (gone.block_id, gone.offset) == (old.block_id, old.offset):
                oe.live_logical_bytes -= len(m.key) + gone.payload_len  # counted in the primary's block only
            batch.forget_place(gone)

    def _publish_group(self, plan: GroupPlan, placements: dict[int, list[Any]], to_seal: list[OpenBlock]) -> None:
        """Write the group's one directory batch (new locations, old ones dead, block counters, counters,
        the footers of blocks rotated out), then adopt what it committed."""
        planned, batch = plan.planned, plan.batch
        # Everything below changes in-memory block state before the directory write, which can still
        # fail: keep what to restore, so failed records never count (they are dead bytes past the tail).
        saved = [(pl.block, pl.block.tail, pl.block.entry, pl.block.min_seq, pl.block.max_seq, pl.block.records)
                 for pl in planned.values()] + [(ob, ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records)
                                                 for ob in to_seal]
        entries: dict[int, BlockEntry] = {}
        try:
            bytes_put, bytes_written = self._stage_records(plan, placements, entries, to_seal)
            for bid in plan.retired_tombstones:
                e = self._group_entry(entries, bid, to_seal)
                e.tombstones = max(0, e.tombstones - 1)
            for bid, pl in planned.items():
                pl.block.tail = plan.tails[bid]
                pl.block.entry = self._group_entry(entries, bid, to_seal)
            # seal what rotated out (footer after its last records, before the batch names them)
            for ob in to_seal:
                self._seal(ob, batch, entries)
                self._placement.open = {k: v for k, v in self._placement.open.items() if v is not ob}
            for e in entries.values():
                batch.put_block(e)
            batch.put_meta("next_seq", plan.seq)
            batch.put_meta("next_block", self._placement.next_block)
            batch.put_meta("bytes_put", self.bytes_put_total + bytes_put)
            batch.put_meta("bytes_written", self.bytes_written_total + bytes_written)
            unnamed = self._placement.unnamed
            for bid in unnamed:
                if not self.blocks.exists(bid):
                    batch.delete_block(bid)
            hooks.fire("write.before_directory")
            self._write_group_batch(plan, saved, entries, bytes_put, bytes_written)
        except BaseException:
            for ob, tail, e, lo, hi, n in saved:
                ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records = tail, e, lo, hi, n
            raise
        hooks.fire("write.committed")
        self._adopt_group(plan, entries, unnamed, bytes_put, bytes_written, to_seal)

    def _write_group_batch(self, plan: GroupPlan, saved: list[Any], entries: dict[int, BlockEntry],
                           bytes_put: int, bytes_written: int) -> None:
        # An overwrite's synced record may sit in a block file made this session whose name is not
        # durable yet: a later synced directory write (or the WAL written back) makes the entry durable,
        # a power cut loses the file, recovery forgets the block and drops the key's entry, and the
        # key reads absent while its old value is intact on disk (found by tests/power_loss.py). So
        # blocks/ is fsynced first, as for moves and deletes (once per new block file).
        if self.durability != "sync" and (plan.moves or plan.deletes or (
                plan.overwrites and any(b >= self._names_durable_below for b in plan.planned))):
            names_below = self._placement.next_block
            self.backend.dir_sync(self.blocks.folder)  # a block file created for them, too
            self._names_durable_below = names_below
        try:
            self.dir.write(plan.batch, force_sync=plan.deletes)
        except BlockstoreError:
            if entries:  # what it would have committed, for settle_failed_commit (copies dropped only: no record)
                first = next(iter(plan.planned or entries))
                self._unsure = (first, entries[first].encode(),
                                [(ob, ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records) for ob, *_ in saved],
                                dict(plan.created_ns), plan.seq, bytes_put, bytes_written, dict(entries))
            raise

    def _adopt_group(self, plan: GroupPlan, entries: dict[int, BlockEntry], unnamed: frozenset[int],
                     bytes_put: int, bytes_written: int, to_seal: list[OpenBlock]) -> None:
        """The group committed: the in-memory state follows, and blocks it emptied go."""
        with self.state_lock:
            self.ns_ids.update(plan.created_ns)  # only now: a failed batch must not leave a phantom namespace
            self.next_seq = plan.seq
            self.bytes_put_total += bytes_put
            self.bytes_written_total += bytes_written
            self.table.update(entries)
            if self.table_observer is not None:
                self.table_observer(entries)
        self._placement.unnamed = self._placement.unnamed - unnamed
        for ob in to_seal:
            self._close_fd(ob)
        sealed = [ob.entry.block_id for ob in to_seal]
        to_seal.clear()
        for bid, e in entries.items():
            if self.reclaimable(e):
                if plan.moves and self.durability != "sync":
                    # the copies are durable, the directory batch naming them is not yet: the source
                    # goes only after a synced directory write (sync_moves, or close)
                    self._reclaim_after_sync.add(bid)
                    continue
                try:
                    self.delete_block(bid)
                except BlockstoreError:
                    pass  # the group is committed; an empty block left behind is reclaimed at close
        if sealed:
            self.announce_sealed([bid for bid in sealed if self.block_named(bid)])

    def _resolve_namespaces(self, muts: list[Mutation], batch: DirectoryBatch) -> tuple[dict[str, int], dict[str, int]]:
        """(id of every namespace the group names, the ones this group creates). A delete never creates
        a namespace: in one that does not exist it gets id 0, which names nothing, so it is a miss."""
        out: dict[str, int] = {}
        created: dict[str, int] = {}
        for m in muts:
            if m.ns in out or m.suffix is not None:
                continue
            nid = self.ns_ids.get(m.ns)
            if nid is None and m.kind == Kind.TOMBSTONE and not any(
                    x.ns == m.ns and x.kind != Kind.TOMBSTONE for x in muts):
                continue
            if nid is None:
                nid = self.next_ns
                self.next_ns += 1  # never reused, even if this batch fails
                batch.put(namespace_key(m.ns), nid.to_bytes(4, "little"))
                batch.put(namespace_id_key(nid), m.ns.encode())
                batch.put_meta("next_ns", self.next_ns)
                created[m.ns] = nid
            out[m.ns] = nid
        for m in muts:
            if m.suffix is None and m.ns not in out:
                out[m.ns] = 0
        return out, created
