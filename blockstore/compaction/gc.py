"""Invalid-ratio GC: pick sealed blocks worth reclaiming, copy their live records out, let the engine
delete them once nothing live (and no needed tombstone) is left.

Victims are ranked by the cost-benefit rule of log-structured file systems (Rosenblum & Ousterhout):
benefit/cost = (1 - u) * age / (1 + u), with u the block's utilisation (live/written bytes) and age the
time since it was sealed. Reading the block costs 1, writing its live part back costs u, and the
space freed is 1 - u; old blocks are preferred because their remaining data is cold and unlikely to
die soon on its own, so copying it now is not wasted.

Tombstones: a tombstone must outlive every older record of its key (a directory rebuilt from blocks
would otherwise resurrect them). One is dropped only when no other block holds anything older than it
(footers carry each block's lowest sequence number); otherwise it is carried along with the live
records. Its key written again since also retires it (the newer record wins any rebuild).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockstore import foreground, hooks
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, BlockEntry, Location
from blockstore.errors import CorruptionError, NotFound
from blockstore.keys import SPACE_KV, TOMBSTONE_META, key_suffix
from blockstore.records import BLOCK_HEADER_SIZE, Kind, ScanStop

if TYPE_CHECKING:
    from blockstore.store import Store

GC_PARTITION = b"\0compaction/gc"
COPY_BATCH_BYTES = 2 << 20  # per re-point batch: bounds memory and how long one batch holds the writer
# ...and its record count: a 2 MiB batch of chunk records is ~5,000 records, ~300 ms of Python in one
# relocate_many, during which every foreground get waited a GIL switch interval (5 ms) per C call it made:
# get p99 went from 0.4 ms idle to 13 ms during GC of small records (bench/scaling.py)
COPY_BATCH_RECORDS = 64
_SPACE_OF_META = {v: k for k, v in TOMBSTONE_META.items()}
_log = logging.getLogger("blockstore.compaction")


def benefit_cost(e: BlockEntry, now_ns: int) -> float:
    u = e.live_bytes / e.written_bytes if e.written_bytes else 0.0
    age_s = max(1e-3, (now_ns - (e.sealed_ns or e.created_ns)) / 1e9)
    return (1.0 - u) * age_s / (1.0 + u)


def victims(blocks: list[BlockEntry], threshold: float, now_ns: int | None = None, *,
            idle: Collection[int] = ()) -> list[BlockEntry]:
    """Blocks with φ ≥ threshold, best benefit/cost first: sealed ones, and the open ones in `idle`
    (`OpenIdle`), which the compactor seals before it collects them. Blocks of the compactor's own
    streams qualify like any other (their records die too).

    Why open ones: an open block's dead records stay until it is sealed, and it is sealed only when a
    record does not fit, idle `idle_seal_seconds` or at close. With fewer writing partitions than open
    slots (max_open_blocks 64), blocks of partitions that stopped stay open: SWE-shaped full mode ended
    with 64 of its 71 blocks open and their dead records 0.86 of the live bytes (space 2.48, append-only
    1.89; issue 16, H65). Past φ, a block is a victim at any fill it would reach (its dead bytes stay),
    and collected now its live part is smallest; one still written to is left to fill. An open block of
    tombstones only is left open: sealed, it is a block file GC may not take while they are needed
    (`only_needed_tombstones`; a delete's next tombstone would open another)."""
    now = now_ns or time.time_ns()
    out = [e for e in blocks if e.written_bytes and e.invalid_ratio >= threshold
           and (e.state == BLOCK_SEALED or (e.state == BLOCK_OPEN and e.block_id in idle
                                            and e.total_records > e.tombstones))]
    out.sort(key=lambda e: benefit_cost(e, now), reverse=True)
    return out


class OpenIdle:
    """Which open blocks have stopped growing, counted in GC passes (`note` once per pass): one whose
    written bytes have not changed for more passes than it grew over, and for one at least. A partition
    that finished is idle from the next pass; one that writes on, however slowly, stays busy longer the
    longer it has written. Passes, not wall time: the same replay makes the same choice on any machine."""

    def __init__(self) -> None:
        self.passes = 0
        self._seen: dict[int, tuple[int, int, int]] = {}  # open block -> (written bytes, first pass seen, last grew)

    def note(self, table: list[BlockEntry]) -> set[int]:
        self.passes = n = self.passes + 1
        seen: dict[int, tuple[int, int, int]] = {}
        for e in table:
            if e.state == BLOCK_OPEN:
                written, first, grew = self._seen.get(e.block_id, (e.written_bytes, n, n))
                seen[e.block_id] = (e.written_bytes, first, n if e.written_bytes != written else grew)
        self._seen = seen  # only the blocks open now: bounded by max_open_blocks
        return {bid for bid, (_w, first, grew) in seen.items() if n - grew > grew - first}


@dataclass(slots=True)
class Collected:
    block_id: int
    moved: int = 0
    moved_bytes: int = 0
    lost_race: int = 0  # keys changed while being copied: left as the writer made them
    copies_dropped: int = 0  # places of keys with copies taken out of their values (nothing written)
    tombstones_carried: int = 0
    tombstones_dropped: int = 0
    reclaimed: bool = False
    sealed_open: bool = False  # an open block, sealed for this (victims)
    damaged: bool = False  # a live record here does not verify: the block is left for fsck --repair


class MinSeqs:
    """Each block's lowest sequence number (sealed: from its footer, read once per block; open: from
    memory), and the two lowest of a snapshot of the block table, so the floor under a victim's
    tombstones is O(1) per victim (it copied and scanned the whole table per victim: 4.3 of a 5.4 s
    GC pass with 3,000 blocks, issue 16).

    Why a snapshot is enough: a tombstone may go when no block but its own holds anything older.
    An older record of its key is dead, and dead records are never copied, so it sits in a block
    that existed when the tombstone was written. For a victim already sealed when the snapshot was
    taken, every such block is in the snapshot (those deleted since only make the floor lower: safe).
    A victim sealed after the snapshot may hold newer tombstones: it gets a fresh snapshot.

    One exception to "dead records are never copied": a copy made while its key was live, whose
    compare-and-swap then lost to a delete, stays in its new block as a dead record older than the
    key's tombstone. That block is newer than the snapshot, so any block made since the snapshot also
    gets a fresh one (found by fsck beside a live writer: a dropped tombstone left such a copy as its
    key's newest record on disk, which a rebuild from the blocks would bring back)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sealed: dict[int, int] = {}
        self._snapshot_sealed: frozenset[int] = frozenset()
        self._table: list[BlockEntry] | None = None  # taken, lowest two not computed yet
        self._low: list[tuple[int, int]] = []  # (min seq, block id), the two lowest of the snapshot
        # victims found holding a live record that does not verify (collect), with their live record count
        # then: left alone while it stays (fsck --repair, which fixes them, needs the store closed), not read
        # and warned about every pass, nor counted as GC work (the CLI ran all its 100 passes on one such
        # block); once a write retires a record of it, it is tried again
        self.damaged: dict[int, int] = {}
        self._top = 0  # the snapshot's highest block id: block ids only grow
        self._stones: dict[int, int] = {}  # sealed block -> its lowest tombstone sequence number

    def snapshot(self, table: list[BlockEntry] | None = None) -> None:
        """Take the block table as it is now (a pass's own copy, or a fresh one); the footers of blocks
        not seen before are read when a floor is first asked for."""
        table = self.store.block_table() if table is None else table
        self._table = table
        self._snapshot_sealed = frozenset(e.block_id for e in table if e.state == BLOCK_SEALED)
        self._top = max((e.block_id for e in table), default=0)

    def _blocks_made_since_snapshot(self) -> bool:
        """Open ones are listed; sealed ones are probed above the snapshot's highest id (16 ids, to see
        past a block made and already emptied and reclaimed in between)."""
        if any(b > self._top for b in self.store.open_block_min_seqs()):
            return True
        return any(self.store.has_block(b) for b in range(self._top + 1, self._top + 17))

    def _lowest_two(self) -> list[tuple[int, int]]:
        if self._table is not None:
            table, self._table = self._table, None
            live = {e.block_id for e in table}
            for bid in [b for b in self._sealed if b not in live]:
                del self._sealed[bid]
            for bid in [b for b in self._stones if b not in live]:
                del self._stones[bid]
            opened = self.store.open_block_min_seqs()
            seqs = []
            for bid in live:
                if bid in opened and bid not in self._snapshot_sealed:
                    if opened[bid]:  # 0: nothing appended yet
                        seqs.append((opened[bid], bid))
                else:
                    seqs.append((self.own(bid), bid))  # 0 (an unreadable footer) counts: it may hold anything
            self._low = heapq.nsmallest(2, seqs)
        return self._low

    def lowest_elsewhere(self, exclude: int) -> int:
        if exclude not in self._snapshot_sealed or self._blocks_made_since_snapshot():
            self.snapshot()
        low = min((v for v, b in self._lowest_two() if b != exclude), default=1 << 64)
        opened = self.store.open_block_min_seqs()  # blocks opened since the snapshot (conservative)
        return min([low, *(v for b, v in opened.items() if b != exclude and v)])

    def lowest_tombstone(self, e: BlockEntry) -> int:
        """The lowest sequence number of block `e`'s tombstones (a scan; a sealed block's are kept, as its
        tombstones never change)."""
        got = self._stones.get(e.block_id)
        if got is None:
            try:
                got = min((loc.seq for _s, loc in tombstones(self.store, e)), default=1 << 64)
            except NotFound:
                return 1 << 64
            except CorruptionError:
                return 0  # not all listed: not judged "only needed tombstones"; collect leaves it as damaged
            if e.state == BLOCK_SEALED:
                self._stones[e.block_id] = got
        return got

    def own(self, bid: int) -> int:
        if bid not in self._sealed:
            self._sealed[bid] = self._footer_min(bid)
        return self._sealed[bid]

    def _footer_min(self, bid: int) -> int:
        s = self.store
        try:
            fd = s.backend.open_ro(s.blocks.path(bid))
        except NotFound:
            return 1 << 64
        try:
            f = s.blocks.read_footer(fd)
        finally:
            s.backend.close(fd)
        return 0 if f is None else f.min_seq  # unreadable footer: assume it may hold anything


def seal_for_gc(store: Store, e: BlockEntry, min_seqs: MinSeqs) -> BlockEntry | None:
    """Seal open block `e` (a victim: past the threshold, idle since the previous pass, `victims`); its
    entry as sealed (records appended since the table was read count: the tombstone scan reads up to its
    data_end), or None if it is gone or, sealed, holds nothing dead but tombstones still needed."""
    now = next((x for x in store.seal_blocks([e.block_id]) if x.block_id == e.block_id), None)
    return None if now is None or now.state != BLOCK_SEALED or only_needed_tombstones(now, min_seqs) else now


def only_needed_tombstones(e: BlockEntry, min_seqs: MinSeqs) -> bool:
    """A block whose dead records are all tombstones that still have older records to cover (live
    records beside them or not): collecting it would only copy its live records and carry every tombstone
    into a new block as dead as this one, pass after pass (review H81: an idle store's background
    compactor rewrote two such blocks every pass). Left alone until a tombstone can go or a record dies."""
    if e.total_records != e.live_records + e.tombstones or not e.tombstones:
        return False
    floor = min_seqs.lowest_elsewhere(e.block_id)
    if min_seqs.own(e.block_id) > floor:
        return True
    if not e.live_records:  # tombstones alone: the block's lowest is theirs, and one of them can go
        return False
    # the block's lowest may be a live record's (GC keeps a copied record's sequence number): the tombstones'
    return min_seqs.lowest_tombstone(e) > floor


def records_here(store: Store, bid: int) -> tuple[list[tuple[bytes, Location]], list[tuple[bytes, Location, Location]]]:
    """What block `bid` holds that the directory names: (suffix, location) of records that have no copy,
    to be moved; (suffix, whole value, the place here) of keys with copies (docs/copies.md), whose place
    here is dropped instead (the key stays readable at its other places, and nothing is written). One
    place per key: a second place of a key in the same block waits for the next pass."""
    pairs = list(foreground.stepping(store.dir.block_records(bid)))  # on the background thread, reads go first
    locs = store.dir.get_locations([sfx for _off, sfx in pairs])
    moves: list[tuple[bytes, Location]] = []
    drops: list[tuple[bytes, Location, Location]] = []
    dropping: set[bytes] = set()
    for (off, sfx), loc in foreground.stepping(zip(pairs, locs)):
        if loc is None or not loc.holds(bid, off):
            continue
        if not loc.copies:
            moves.append((sfx, loc))
        elif sfx not in dropping:
            dropping.add(sfx)
            drops.append((sfx, loc, next(p for p in loc.places() if (p.block_id, p.offset) == (bid, off))))
    return moves, drops


def tombstones(store: Store, e: BlockEntry) -> list[tuple[bytes, Location]]:
    """The block's tombstones, found by scanning it (they are in no index: nothing points at them)."""
    s = store
    fd = s.backend.open_ro(s.blocks.path(e.block_id))
    try:
        res = s.backend.scan(fd, BLOCK_HEADER_SIZE, e.data_end, False)
    finally:
        s.backend.close(fd)
    if res.stop == ScanStop.INVALID:  # a record that does not parse hides every tombstone after it
        raise CorruptionError(f"block {e.block_id:016x}: the record at {res.next_offset} does not verify, so its "
                              "tombstones cannot all be listed")
    out = []
    for r in res.records:
        if r.info.kind != Kind.TOMBSTONE:
            continue
        space = _SPACE_OF_META.get(bytes(r.meta), SPACE_KV)
        loc = Location(Kind.TOMBSTONE, r.info.flags, r.info.payload_off, e.block_id, r.offset,
                       r.info.record_len, 0, r.info.seq, 0, bytes(r.meta))
        out.append((key_suffix(r.info.ns, space, r.key), loc))
    return out


def yield_gil() -> None:
    """Let waiting foreground threads run: a pure-Python stretch on this thread would otherwise hold
    the GIL for up to the interpreter's switch interval (5 ms), which is what a reader's p99 sees; on the
    background thread, also wait while a read is in flight (blockstore.foreground)."""
    time.sleep(0.0002)
    foreground.step_aside()


def _batches(items: list[tuple[bytes, Location]], limit: int,
             max_records: int = COPY_BATCH_RECORDS) -> Iterator[list[tuple[bytes, Location]]]:
    cur: list[tuple[bytes, Location]] = []
    size = 0
    for it in items:
        if cur and (size + it[1].record_len > limit or len(cur) >= max_records):
            yield cur
            cur, size = [], 0
        cur.append(it)
        size += it[1].record_len
    if cur:
        yield cur


def collect(store: Store, e: BlockEntry, min_seqs: MinSeqs, *, pace: Callable[[int], None] | None = None,
            to_partition: bool = True) -> Collected:
    """Copy block `e`'s live records (and the tombstones still needed) into the victim's own partition
    (`to_partition`, so they stay with what their partition writes) or into the shared GC stream."""
    res = Collected(e.block_id)
    if min_seqs.damaged.get(e.block_id) == e.live_records:
        res.damaged = True
        return res
    if e.state == BLOCK_OPEN:  # an idle open victim (victims): sealed first
        sealed = seal_for_gc(store, e, min_seqs)
        if sealed is None:
            return res
        e, res.sealed_open = sealed, True
    # hold the block: a writer may empty it meanwhile (the engine then deletes it), and its records
    # must stay readable between listing them and copying them
    with store.hold_blocks([e.block_id]):
        try:
            _copy_out(store, e, min_seqs, res, pace, e.partition if to_partition else GC_PARTITION)
        except NotFound:
            if not store.has_block(e.block_id):  # deleted before we held it: everything in it died meanwhile
                res.lost_race += 1
            else:  # still named, its file gone: damage, left for fsck --repair as a record that does not verify
                _left_damaged(store, e, min_seqs, res, "its file is missing (fsck --repair drops the records it held)")
                return res
    if res.moved == 0 and res.copies_dropped == 0 and res.tombstones_carried == 0 and res.tombstones_dropped == 0:
        store.reclaim_empty_blocks()  # nothing was left to move: no batch deleted it; delete it here
    res.reclaimed = not store.has_block(e.block_id)
    if res.reclaimed:
        hooks.fire("compact.reclaim", "gc", e.block_id)
    return res


def _left_damaged(store: Store, e: BlockEntry, min_seqs: MinSeqs, res: Collected, why: str, *,
                  live: int | None = None) -> None:
    """Block `e` cannot be freed until fsck --repair: nothing more is moved from it (that would spend the write
    budget on a block that stays), and it is left alone, not warned about again, while its live record count
    stays `live` (MinSeqs.damaged): before, each such block was chosen and counted collected every pass."""
    res.damaged = True
    min_seqs.damaged[e.block_id] = e.live_records if live is None else live  # its count once what moved has gone
    _log.warning("GC of block %016x: %s; the block is left for blockstore fsck --repair %s", e.block_id, why,
                 store.path)


def _copy_out(store: Store, e: BlockEntry, min_seqs: MinSeqs, res: Collected,
              pace: Callable[[int], None] | None, partition: bytes) -> None:
    live, copies = records_here(store, e.block_id)
    hooks.fire("compact.scan", "gc", e.block_id, len(live) + len(copies))
    for i in range(0, len(copies), COPY_BATCH_RECORDS):
        drops = copies[i : i + COPY_BATCH_RECORDS]
        done = store.place_copies([], partition=partition, drops=drops)
        res.copies_dropped += sum(done)
        refused = [(sfx, value) for (sfx, value, _here), ok in zip(drops, done) if not ok]
        now = store.dir.get_locations([sfx for sfx, _value in refused]) if refused else []
        # a value still as it was: the drop was refused because no other place of the key reads back verified
        # (place_copies), not lost to a writer; the place here may be the only good copy, so the block stays
        # until fsck --repair, as one whose live record does not verify (it was chosen again every pass)
        kept = sum(1 for (_sfx, value), cur in zip(refused, now) if cur == value)
        res.lost_race += len(refused) - kept
        if kept:
            _left_damaged(store, e, min_seqs, res, f"{kept} record(s) with copies have no other place that reads "
                          "back verified")
            return
    for batch in _batches(live, COPY_BATCH_BYTES):
        foreground.step_aside()
        try:
            payloads = store.read_locations([loc for _s, loc in batch])
        except CorruptionError as exc:
            # a record that does not verify is never copied (its bad bytes would get a fresh checksum), so the
            # block cannot be freed until fsck --repair evacuates it: nothing more is moved from it (that would
            # spend the write budget on a block that stays). The pass goes on with the other victims; it
            # failed here before, pass after pass: one flipped bit stopped GC of every block behind it.
            _left_damaged(store, e, min_seqs, res, f"a live record does not verify ({exc})")
            return
        hooks.fire("compact.copy", "gc", e.block_id, len(batch))
        done = store.relocate_many([(sfx, loc, p) for (sfx, loc), p in zip(batch, payloads)],
                                   partition=partition)
        hooks.fire("compact.repoint", "gc", e.block_id, sum(done))
        for (_sfx, loc), ok in zip(batch, done):
            if ok:
                res.moved += 1
                res.moved_bytes += loc.record_len
            else:
                res.lost_race += 1
        if pace is not None:
            pace(sum(loc.record_len for _s, loc in batch))
        yield_gil()
    if e.tombstones:
        try:
            stones = tombstones(store, e)
        except CorruptionError as exc:
            # its live records, which verify, have moved out (the directory named them: a damaged header does not
            # hide them); the tombstones after the damage cannot be listed, so the block stays for fsck --repair
            _left_damaged(store, e, min_seqs, res, str(exc), live=e.live_records - res.moved - res.copies_dropped)
            return
        floor = min_seqs.lowest_elsewhere(e.block_id)
        # needed while anything older may exist somewhere: carried; otherwise retired without a copy
        keep = [(sfx, loc, b"") for sfx, loc in stones if floor < loc.seq]
        drop = [(sfx, loc) for sfx, loc in stones if floor >= loc.seq]
        done = store.relocate_many(keep, partition=partition, drop_tombstones=drop)
        res.tombstones_carried = sum(done)
        res.tombstones_dropped = len(stones) - res.tombstones_carried
