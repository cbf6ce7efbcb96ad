"""Block lifecycle: the block table in memory, loading it at open, sealing, and deleting blocks that
hold nothing live on durable proof (invariant 4); the store's write engine (writer.py) builds on it.

A block is named in the directory (synced) before its file exists, sealed with a footer when it rotates
out or at close, marked `reclaiming` in a synced directory write before its file is unlinked, and
forgotten once the file is gone. Cache mode syncs what a deletion could otherwise lose first.

Eviction (`evict_blocks`, a cache's capacity path) removes sealed blocks with every key the directory still places
in them, in one synced directory write, no tombstones: a key goes only when no block that stays can hold an older
record of it, and only records the directory places in the evicted blocks are touched (its docstring says why).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockstore import hooks, logs, metrics
from blockstore.backend import Backend
from blockstore.blocks import BlockFiles, OpenBlock, block_file_name
from blockstore.directory import (
    BLOCK_OPEN,
    BLOCK_RECLAIMING,
    BLOCK_SEALED,
    BlockEntry,
    Directory,
    DirectoryBatch,
    Location,
)
from blockstore.errors import BlockstoreError, CorruptionError, FormatVersionError, NotFound
from blockstore.keys import chunk_session_key_strict
from blockstore.leader import LeaderSlot
from blockstore.placement import OpenBlocks
from blockstore.records import FORMAT_VERSION, Kind
from blockstore.recovery import recover
from blockstore.seqfloor import SeqFloor

_log = logs.get("blocks")
# Evicted blocks' `reclaiming` entries are dropped once this many wait (dropping costs a sync of blocks/;
# an entry left is finished by any later deletion, the close or the next open)
FORGET_RECLAIMED_EVERY = 64


@dataclass(slots=True)
class Evicted:
    """What `evict_blocks` did: the blocks it removed, the keys that went with them (key suffix, location),
    and the blocks it left (not sealed, gone, or with a key older versions of which may stay: tombstones)."""

    blocks: list[int] = field(default_factory=list)
    records: list[tuple[bytes, Location]] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)


class BlockLifecycle:
    """The engine's state (block table, counters, namespaces) and the block lifecycle. Mutated by the
    group-commit leader only (or with the leader slot held); `state_lock` guards what readers and
    statistics look at (table, counters, ns_ids)."""

    def __init__(self, *, path: str, read_only: bool, durability: str, backend: Backend, directory: Directory,
                 blocks: BlockFiles, store_id: int, placement: OpenBlocks, check_open: Callable[..., None]) -> None:
        self.path = path
        self.read_only = read_only
        self.durability = durability
        self.backend = backend
        self.dir = directory
        self.blocks = blocks
        self.store_id = store_id
        self._placement = placement
        self.check_open = check_open
        self.slot = LeaderSlot()
        self.state_lock = threading.Lock()  # guards table, ns_ids, counters
        self.table: dict[int, BlockEntry] = {}
        self.ns_ids: dict[str, int] = {}
        self.next_seq = self.next_ns = 1
        self.bytes_put_total = self.bytes_written_total = 0
        self.recovery_report: dict[str, Any] | None = None
        self._sealed_unsynced: set[int] = set()
        self._reclaim_after_sync: set[int] = set()  # sources emptied by moves, waiting for a synced directory
        self._reclaiming: set[int] = set()  # marked reclaiming in the directory; entry dropped once the file is gone
        self._unsure: tuple[Any, ...] | None = None  # a group whose directory write failed (settle_failed_commit)
        self._names_durable_below = 0  # cache mode: block files with a lower id have durable names (blocks/ fsynced)
        self.seq_floor = SeqFloor(self)  # eviction's floor and the sealed blocks' sequence numbers (seqfloor.py)

    def block_named(self, bid: int) -> bool:
        with self.state_lock:
            return bid in self.table

    def io_counters(self) -> tuple[int, int]:
        with self.state_lock:
            return self.bytes_put_total, self.bytes_written_total

    def load_state(self, fresh: bool) -> None:
        d = self.dir
        if fresh:
            b = DirectoryBatch()
            for name in ("next_seq", "next_block", "next_ns"):
                b.put_meta(name, 1)
            b.put_meta("format_version", FORMAT_VERSION)
            b.put_meta("bytes_put", 0)
            b.put_meta("bytes_written", 0)
            b.put_meta("clean", 1)
            b.put_meta("store_id", self.store_id)
            d.write(b, force_sync=True)
        version = d.get_meta("format_version") or 0
        if version > FORMAT_VERSION:
            raise FormatVersionError(f"directory format version {version} is newer than this build ({FORMAT_VERSION})")
        # before anything acts on its entries: another store's directory put here once made this open finish
        # "reclaims" of block ids it marked (deleting this store's files of those ids), read every key as a miss
        owner = d.get_meta("store_id")
        if owner is not None and owner != self.store_id:
            raise CorruptionError(f"{self.dir.path} is another store's directory (store {owner}; MANIFEST.json and the "
                                  f"block headers name store {self.store_id}); nothing was changed; run `blockstore "
                                  f"fsck --repair {self.path}` to rebuild it from the block files")
        self.ns_ids = d.namespaces()
        self.table = d.load_blocks()
        reclaiming = [bid for bid, e in self.table.items() if e.state == BLOCK_RECLAIMING]
        for bid in reclaiming:
            del self.table[bid]
        if reclaiming and not self.read_only:
            self._finish_reclaims(reclaiming)
        unclean = d.get_meta("clean") != 1
        left_open = any(e.state == BLOCK_OPEN for e in self.table.values())
        if not self.read_only:
            self._refuse_unnamed_block_files(set(self.table) | set(reclaiming))
        if not self.read_only and (unclean or left_open):
            self.recovery_report = recover(self, full=unclean)
            self.table = {bid: e for bid, e in d.load_blocks().items() if e.state != BLOCK_RECLAIMING}
            for bid, e in list(self.table.items()):
                if self.reclaimable(e):  # an open block whose records had all died before the crash
                    self.delete_block(bid)
        self.next_seq = d.get_meta("next_seq") or 1
        self._placement.next_block = d.get_meta("next_block") or 1
        self.next_ns = d.get_meta("next_ns") or 1
        self.bytes_put_total = d.get_meta("bytes_put") or 0
        self.bytes_written_total = d.get_meta("bytes_written") or 0
        if not self.read_only:
            b = DirectoryBatch()
            b.put_meta("clean", 0)
            if owner is None:  # a directory made before it named its store: adopted (the checks above passed)
                b.put_meta("store_id", self.store_id)
            # recovery after a power cut in cache mode verifies the blocks made from here on
            b.put_meta("session_first_block", self._placement.next_block)
            d.write(b, force_sync=True)

    def _refuse_unnamed_block_files(self, named: set[int]) -> None:
        """Blocks are named in the directory (synced) before their files exist, so a block file the directory does not
        name means the directory lost writes (a lost or truncated WAL, an old copy put back): writing on would reuse
        sequence numbers the lost records hold, and recovery would cut acknowledged records at stale committed ends.
        One listdir per writable open."""
        unnamed = sorted(set(self.blocks.list_files()) - named)
        if unnamed:
            raise CorruptionError(
                f"{self.path}: {len(unnamed)} block file(s) the directory does not name "
                f"({', '.join(block_file_name(b) for b in unnamed[:8])}): the directory lost writes; "
                f"run `blockstore fsck --repair {self.path}` (it rebuilds what the blocks hold)")

    def _finish_reclaims(self, block_ids: list[int]) -> None:
        """Blocks marked reclaiming before a crash: the durable mark is the proof that nothing in them is
        live, so their files go, then their entries."""
        for bid in block_ids:
            if self.blocks.exists(bid):
                self.blocks.delete(bid)
        self.backend.dir_sync(self.blocks.folder)
        b = DirectoryBatch()
        for bid in block_ids:
            b.delete_block(bid)
        self.dir.write(b, force_sync=True)

    def seal_all(self) -> BlockstoreError | None:
        """Seal every open and retired block; None if all of them are sealed and durable, else the
        first error (the others are attempted anyway)."""
        errors: list[BlockstoreError] = []
        batch = DirectoryBatch()
        for ob in list(self._placement.open.values()) + self._placement.retired:
            try:
                self._seal(ob, batch)
                self.backend.sync(ob.fd)
            except BlockstoreError as exc:
                errors.append(exc)
            finally:
                self._close_fd(ob)
        self._placement.open.clear()
        self._placement.retired.clear()
        # cache mode seals rotated blocks without fdatasync: a clean close must not leave any block
        # unsynced, or a power loss after it would go unnoticed (recovery is skipped when clean)
        for bid in sorted(self._sealed_unsynced):
            try:
                fd = self.backend.open(self.blocks.path(bid), False)
            except NotFound:
                continue  # reclaimed since
            try:
                self.backend.sync(fd)
            except BlockstoreError as exc:
                errors.append(exc)
            finally:
                self.backend.close(fd)
        self._sealed_unsynced.clear()
        try:
            self.backend.dir_sync(self.blocks.folder)  # the block files' names, too
        except BlockstoreError as exc:
            errors.append(exc)
        self.dir.write(batch, force_sync=True)
        for bid, e in list(self.table.items()):
            if self.reclaimable(e):
                self.delete_block(bid)
        if self._reclaiming:
            b = DirectoryBatch()
            self._forget_reclaimed(b)
            self.dir.write(b, force_sync=True)
        return errors[0] if errors else None

    def _seal(self, ob: OpenBlock, batch: DirectoryBatch, entries: dict[int, BlockEntry] | None = None) -> None:
        self.blocks.seal(ob)
        if self.durability == "cache":
            self._sealed_unsynced.add(ob.entry.block_id)  # made durable by close(), before "clean"
        e = (entries or {}).get(ob.entry.block_id) or self.table.get(ob.entry.block_id) or ob.entry
        e = e.copy()
        e.state = BLOCK_SEALED
        e.sealed_ns = time.time_ns()
        e.data_end = ob.tail
        self.seq_floor.sealed(e.block_id, ob.min_seq, ob.max_seq, batch)  # what its footer says
        _log.info("%s: sealed block %016x (%d bytes of records)", self.path, e.block_id, ob.tail)
        if metrics.enabled:
            metrics.sealed_done(ob.tail)
        if entries is not None:
            entries[e.block_id] = e
        else:
            batch.put_block(e)
            self.table[e.block_id] = e

    def _close_fd(self, ob: OpenBlock) -> None:
        try:
            self.backend.close(ob.fd)
        except BlockstoreError:
            pass

    def settle_failed_commit(self) -> None:
        """Adopt or forget the group whose directory write failed (WriteEngine's); called with the leader slot held
        before entries are written from the table, else the settle later overwrites them with the group's copies."""

    def reclaimable(self, e: BlockEntry) -> bool:
        return e.state == BLOCK_SEALED and e.live_records == 0 and e.tombstones == 0

    def delete_block(self, bid: int) -> None:
        """Delete a block that holds nothing live, on durable proof (invariant 4): its entry is marked `reclaiming` in a
        synced directory write first, then the file is unlinked (now, or when its last reader lets go), then the entry
        goes (at the next deletion, close or open). A crash in between leaves a `reclaiming` entry, and the next open
        finishes the job; a file the directory does not name is never deleted."""
        self.delete_blocks([bid])

    def delete_blocks(self, bids: list[int]) -> None:
        """delete_block for several blocks at the cost of one: one sync of dirty blocks and one synced directory write
        for all of them (a compaction pass empties many; per block, the syncs were most of a pass's time)."""
        for bid in bids:
            hooks.fire("block.delete", bid)
        self._sync_dirty_blocks()
        b = DirectoryBatch()
        with self.state_lock:
            for bid in bids:
                e = self.table.get(bid)
                if e is not None:
                    e = e.copy()
                    e.state = BLOCK_RECLAIMING
                    b.put_block(e)
                    self.seq_floor.deleted(bid, b)
        self._forget_reclaimed(b)
        self.dir.write(b, force_sync=True)
        with self.state_lock:
            for bid in bids:
                self.table.pop(bid, None)
                self._reclaiming.add(bid)
        for bid in bids:
            self.blocks.delete(bid)

    def _sync_dirty_blocks(self) -> None:
        """Cache mode, before a block file is deleted: make this session's unsynced block data (open and retired blocks,
        blocks sealed unsynced) and the block files' names durable. What emptied the block can be such data: a newer
        put that let compaction drop the key's tombstone (then deleted with its block), or an overwrite. Lost to a
        power cut after the unlink, it leaves the key's older record on disk with nothing newer: the directory has no
        entry for it (fsck: `unreferenced`), and a rebuild from blocks brings a deleted key back (found by
        tests/power_loss.py). Deletions are rare (a compaction pass, a delete that empties a block), so the cost is
        small."""
        if self.durability == "sync":
            return
        for ob in list(self._placement.open.values()) + self._placement.retired:
            self.backend.sync(ob.fd)
        for sid in sorted(self._sealed_unsynced):
            try:
                fd = self.backend.open(self.blocks.path(sid), False)
            except NotFound:
                self._sealed_unsynced.discard(sid)  # reclaimed since
                continue
            try:
                self.backend.sync(fd)
            finally:
                self.backend.close(fd)
            self._sealed_unsynced.discard(sid)
        names_below = self._placement.next_block  # 0 while an open finishes reclaims
        self.backend.dir_sync(self.blocks.folder)
        self._names_durable_below = max(self._names_durable_below, names_below)

    def _forget_reclaimed(self, batch: DirectoryBatch) -> None:
        """Drop the entries of reclaimed blocks whose files are gone (the unlink waits for readers). The unlinks are made
        durable first (cache mode does not fsync blocks/ at each one): else a power cut brings back a file whose entry
        is gone, which the next open cannot account for (tests/power_loss.py)."""
        gone = [rid for rid in list(self._reclaiming) if not self.blocks.exists(rid)]
        if gone and not self.blocks.sync:
            self.backend.dir_sync(self.blocks.folder)
        for rid in gone:
            batch.delete_block(rid)
            self._reclaiming.discard(rid)

    def sync_moves(self) -> list[int]:
        """Make the directory durable (one synced write) and delete the blocks that moves emptied since the last call.
        Compaction calls it once per pass: moves are then durable at a cost of one directory sync per pass rather than
        one per batch. Returns the blocks deleted."""
        self.check_open(write=True)
        with self.slot.exclusive():
            pending = set(self._reclaim_after_sync)
            if not pending:
                return []
            b = DirectoryBatch()
            b.put_meta("bytes_written", self.bytes_written_total)
            # a failed write (or deletion) keeps them pending: cleared first, they waited for close
            self.dir.write(b, force_sync=True)
            gone = [bid for bid in sorted(pending) if bid in self.table and self.reclaimable(self.table[bid])]
            if gone:
                self.delete_blocks(gone)
            self._reclaim_after_sync -= pending
            return gone

    def reclaim_empty_blocks(self) -> list[int]:
        """Delete sealed blocks that hold nothing live and no tombstone (recovery can leave such a
        block: one that was open at a crash and whose records had all died). Returns their ids."""
        self.check_open(write=True)
        with self.slot.exclusive():
            gone = [bid for bid, e in list(self.table.items()) if self.reclaimable(e)]
            if gone:
                self.delete_blocks(gone)
            return gone

    # ---- eviction (a cache's capacity path) ----

    def evict_blocks(self, block_ids: Sequence[int]) -> Evicted:
        """Remove sealed blocks and every key whose current location is in one of them, in one synced directory write
        (locations, reverse entries, chunk session entries, blocks marked `reclaiming`), then unlink the files (now,
        or when their last reader lets go). No tombstone is written.

        Why no tombstone is needed: a tombstone exists to cover older records of its key. A key is removed here only
        if its record's sequence number is below the floor: the lowest sequence number of any record (tombstones
        aside) in every block that stays, open blocks included, taken under the leader slot so that no write lands
        meanwhile. Every older record of the key has a lower sequence number (relocated copies keep theirs), so none
        is left on disk: fsck finds nothing unreferenced and a rebuild from the blocks cannot bring the key back. A
        block holding a record at or above the floor is refused whole (its keys need tombstones: the caller deletes
        them), and so is a block that is not sealed. A block's tombstones go with it when every record it holds (its
        footer's highest sequence number) is below the floor: whatever older records they cover are in blocks evicted
        with it (the rule compaction's GC drops tombstones by).

        Why nothing live is lost: under the leader slot the directory is what every write left it, and only keys it
        places in these blocks go (compare-and-swap on the location: a key overwritten or relocated since the caller
        chose the blocks has left them and stays). A relocation racing this call loses its compare-and-swap and writes
        nothing. A crash before the synced write changes nothing; after it, the `reclaiming` marks make the next open
        finish the unlinks (the proof that nothing in the blocks is live is durable), which is also why the unlinks
        may follow after the leader slot is released. Unsynced data of other blocks needs no sync first: no record
        removed here has an older version anywhere that such data could have superseded."""
        self.check_open(write=True)
        out = Evicted()
        with self.slot.exclusive():
            self.settle_failed_commit()  # else a group settled later puts its copies of these entries back
            hooks.fire("evict.begin", list(block_ids))
            chosen: dict[int, list[tuple[bytes, Location]]] = {}
            for bid in dict.fromkeys(block_ids):
                records = self._evictable_records(bid)
                if records is None:
                    out.refused.append(bid)
                else:
                    chosen[bid] = records
            while chosen:  # a refused block stays, so it may lower the floor under the others
                floor = self.seq_floor.floor(set(chosen))
                late = [bid for bid, recs in chosen.items() if any(loc.seq >= floor for _s, loc in recs)
                        or (self._tombstones_in(bid) and self.seq_floor.footer_seqs(bid)[1] >= floor)]
                if not late:
                    break
                for bid in late:
                    out.refused.append(bid)
                    del chosen[bid]
            if chosen:
                self._write_eviction(chosen, out)
        for bid in out.blocks:  # outside the slot: writers need not wait for the file system to free extents
            self.blocks.delete(bid)
        return out

    def _evictable_records(self, bid: int) -> list[tuple[bytes, Location]] | None:
        """(key suffix, location) of every key the directory places in block `bid`, or None when the block cannot be
        evicted (not sealed, a chunk record whose session entry cannot be named)."""
        with self.state_lock:
            e = self.table.get(bid)
            if e is None or e.state != BLOCK_SEALED:
                return None
        pairs = list(self.dir.block_records(bid))
        locs = self.dir.get_locations([sfx for _off, sfx in pairs])
        records = [(sfx, loc) for (off, sfx), loc in zip(pairs, locs)
                   if loc is not None and loc.block_id == bid and loc.offset == off]
        if any(loc is not None and loc.copies and loc.holds(bid, off) for (off, _sfx), loc in zip(pairs, locs)):
            return None  # a key with placed copies (docs/copies.md): its copies' blocks would keep counting it
        for sfx, loc in records:
            if loc.kind == Kind.CHUNK:
                try:
                    chunk_session_key_strict(sfx, loc)
                except CorruptionError:
                    return None
        return records

    def _tombstones_in(self, bid: int) -> bool:
        with self.state_lock:
            e = self.table.get(bid)
            return e is None or e.tombstones > 0

    def _footer_seqs(self, bid: int) -> tuple[int, int]:
        """A sealed block's (lowest, highest) sequence number (seqfloor.SeqFloor.footer_seqs); the remote tier reads
        it before it drops a block's local copy."""
        return self.seq_floor.footer_seqs(bid)

    def _write_eviction(self, chosen: dict[int, list[tuple[bytes, Location]]], out: Evicted) -> None:
        """The synced directory write that removes the keys and marks the blocks reclaiming (the caller unlinks the files
        once it has let the slot go: the durable mark already proves them dead, and an entry whose file is still there
        is only forgotten after the file is gone)."""
        b = DirectoryBatch()
        with self.state_lock:
            for bid, records in chosen.items():
                for sfx, loc in records:
                    b.delete_location(sfx, loc)
                    if loc.kind == Kind.CHUNK:
                        b.delete(chunk_session_key_strict(sfx, loc))
                e = self.table[bid].copy()
                e.state = BLOCK_RECLAIMING
                b.put_block(e)
                self.seq_floor.deleted(bid, b)
        if len(self._reclaiming) >= FORGET_RECLAIMED_EVERY:
            self._forget_reclaimed(b)  # a sync of blocks/ first: once per so many blocks, not per eviction
        self.dir.write(b, force_sync=True)
        hooks.fire("evict.written", list(chosen))
        with self.state_lock:
            for bid in chosen:
                self.table.pop(bid, None)
                self._reclaiming.add(bid)
                self._sealed_unsynced.discard(bid)
                self._reclaim_after_sync.discard(bid)
        for bid, records in chosen.items():
            out.blocks.append(bid)
            out.records += records
