"""Eviction's sequence floor (blocklife.BlockLifecycle.evict_blocks): the lowest sequence number of any record
other than a tombstone in the blocks that stay, at a cost that follows the work, not the block table.

- Each sealed block's (lowest, highest) sequence number is what its footer says. A seal in this session records
  them (no footer read later) and writes the lowest into the directory beside the block (`block_min_seq/<id>`,
  a counter, in the seal's own batch, deleted with the block), so a block whose local file the remote tier
  dropped keeps its number across a reopen. Without either (blocks sealed before, or by recovery, then
  dropped), the number is unknown: 0, anything, and every eviction is refused while that block stays.
- The floor is a heap of (lowest sequence number, block) of the blocks that may hold a record other than a
  tombstone, built at the first eviction after an open (footers read once each), kept by seals; entries of
  blocks gone or holding nothing but tombstones are dropped when they reach the top. A floor pops only the
  blocks it excludes and the stale entries above the answer.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from blockstore import logs
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, DirectoryBatch
from blockstore.errors import NotFound
from blockstore.keys import meta_key

if TYPE_CHECKING:
    from blockstore.blocklife import BlockLifecycle

_log = logs.get("blocks")
NO_FLOOR = 1 << 64  # the floor when no block that stays holds a record other than a tombstone


def min_seq_name(block_id: int) -> str:
    """The directory counter that keeps a sealed block's lowest sequence number."""
    return f"block_min_seq/{block_id:016x}"


MIN_SEQ_PREFIX = min_seq_name(0)[:-16]


def min_seq_block(name: str) -> int | None:
    """The block a `min_seq_name` counter is of (None: not such a name; fsck reads names from a damaged directory)."""
    digits = name[len(MIN_SEQ_PREFIX):]
    if not name.startswith(MIN_SEQ_PREFIX) or len(digits) != 16:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


class SeqFloor:
    """The floor's state for one engine; called under its leader slot (evictions, seals, deletions)."""

    def __init__(self, life: BlockLifecycle) -> None:
        self.life = life
        self._seqs: dict[int, tuple[int, int]] = {}  # sealed blocks' (lowest, highest) sequence numbers
        self._heap: list[tuple[int, int]] | None = None  # built at the first floor after an open

    def reset(self) -> None:
        """The table was loaded again (an open): the heap is rebuilt from it when next needed."""
        self._heap = None

    def sealed(self, block_id: int, min_seq: int, max_seq: int, batch: DirectoryBatch) -> None:
        self._seqs[block_id] = (min_seq, max_seq)
        batch.put_meta(min_seq_name(block_id), min_seq)
        if self._heap is not None:
            heapq.heappush(self._heap, (min_seq, block_id))

    def deleted(self, block_id: int, batch: DirectoryBatch) -> None:
        """The block leaves the table in `batch`: its counter goes with it (its heap entry, when at the top)."""
        self._seqs.pop(block_id, None)
        batch.delete(meta_key(min_seq_name(block_id)))

    def footer_seqs(self, bid: int) -> tuple[int, int]:
        """A sealed block's (lowest, highest) sequence number, read once: from its footer, else (no local file)
        the lowest from the directory and the highest unknown; (0, NO_FLOOR), i.e. anything, if neither."""
        seqs = self._seqs.get(bid)
        if seqs is None:
            life = self.life
            try:
                fd = life.backend.open_ro(life.blocks.path(bid))
            except NotFound:
                low = life.dir.get_meta(min_seq_name(bid))
                return (0, NO_FLOOR) if low is None else (low, NO_FLOOR)
            try:
                footer = life.blocks.read_footer(fd)
            finally:
                life.backend.close(fd)
            seqs = (0, NO_FLOOR) if footer is None else (footer.min_seq, footer.max_seq)
            if footer is None:  # recovery left every sealed block with a footer that verifies: this is damage
                _log.warning("%s: sealed block %016x has no footer that verifies: its sequence numbers are unknown, so "
                             "evict_blocks refuses every block while it stays; run blockstore fsck --repair %s",
                             life.path, bid, life.path)
            self._seqs[bid] = seqs
        return seqs

    def floor(self, exclude: set[int]) -> int:
        """The lowest sequence number of any record other than a tombstone in a block not in `exclude`: open
        blocks from memory, sealed ones from the heap. Blocks of nothing but tombstones are left out: a
        tombstone older than an evicted record is a delete the record already superseded."""
        life = self.life
        low = NO_FLOOR
        for bid, seq in life._placement.min_seqs().items():
            if bid not in exclude and seq:
                low = min(low, seq)
        heap = self._index()
        skipped: list[tuple[int, int]] = []
        with life.state_lock:
            while heap:
                seq, bid = heap[0]
                e = life.table.get(bid)
                if e is None or (e.state == BLOCK_SEALED and e.total_records == e.tombstones):
                    heapq.heappop(heap)  # gone, or nothing but tombstones: for good
                elif bid in exclude:
                    skipped.append(heapq.heappop(heap))  # being evicted now: back in the heap if refused
                else:
                    low = min(low, seq)
                    break
            for item in skipped:
                heapq.heappush(heap, item)
        return low

    def _index(self) -> list[tuple[int, int]]:
        """The heap, built at the first call after an open: each sealed block's lowest sequence number, 0 for a
        block left open that no open block stands for (none after recovery)."""
        if self._heap is None:
            life = self.life
            opened = life._placement.min_seqs()
            with life.state_lock:
                entries = list(life.table.items())
            heap: list[tuple[int, int]] = []
            for bid, e in entries:
                if bid in opened:
                    continue  # min_seqs() stands for it; sealed() adds it once sealed
                if e.state == BLOCK_OPEN:
                    if e.total_records:
                        heap.append((0, bid))
                elif e.total_records != e.tombstones:
                    heap.append((self.footer_seqs(bid)[0], bid))
            heapq.heapify(heap)
            self._heap = heap
        return self._heap
