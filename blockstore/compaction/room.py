"""GC on a disk short of room: victim by victim, each one's source deleted before the next is copied.

A pass copies the live records of all its victims and only then makes the moves durable and deletes the blocks
they emptied (one synced directory write a pass, `Store.sync_moves`: issue 16's batching, kept on a roomy
disk). On a disk the store filled itself the room there is (the reserve the first NoSpace gave up: one block +
4 MiB, at most a sixteenth of the file system) holds one victim's copies, not a pass's: `blockstore compact`
stopped with NoSpace having freed nothing (review H85). While the disk is low (`reserve.low_free_bytes`, read
once a pass), each victim's moves are made durable and the blocks they emptied deleted (the same durable proof
as at the end of a pass) before the next victim is copied, and a victim whose live bytes do not fit what is
free then waits, smaller ones going first. A NoSpace during a roomy pass (the disk filled meanwhile) turns the
pass low the same way, and the victim is tried once more if that freed a block. Relocation waits while the
disk is low: it adds bytes and frees none until GC runs."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from blockstore.errors import NoSpace
from blockstore.reserve import free_bytes, low_free_bytes

from . import gc

if TYPE_CHECKING:
    from blockstore.directory import BlockEntry
    from blockstore.store import Store

# beyond a victim's live bytes: new blocks' headers and footers, page slack, the directory's log of the moves
SLACK = 256 << 10


class Room:
    """One pass's view of the disk (made at its start)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.low = low_free_bytes(store.path, store.block_size) is not None
        self.refused: BlockEntry | None = None  # the victim with the fewest live bytes left for want of room
        self.free = 0  # free bytes when it was refused
        self.freed = 0  # blocks this pass's GC freed (settled, or deleted as their last record moved)
        self.stopped = False  # a NoSpace after blocks were freed: the pass's GC ends there, and reports them

    def settle(self) -> list[int]:
        """Make the moves so far durable and delete the blocks they emptied (nothing pending: no write)."""
        return self.store.sync_moves()

    def fits(self, e: BlockEntry) -> bool:
        """On a low disk: whether victim `e`'s live records fit what is free (call `settle` first)."""
        if not self.low:
            return True
        try:
            free = free_bytes(self.store.path)
        except OSError:
            return True
        if e.live_bytes + SLACK <= free:
            return True
        if self.refused is None or e.live_bytes < self.refused.live_bytes:
            self.refused, self.free = e, free
        return False

    def collect(self, e: BlockEntry, min_seqs: gc.MinSeqs, *, pace: Callable[[int], None] | None, to_partition: bool,
                reclaimed: Callable[[list[int]], None]) -> gc.Collected | None:
        """gc.collect of victim `e`; on a low disk only once the blocks earlier victims emptied are gone (`reclaimed`
        is told of them) and only if `e` fits what is free then (None: left for want of room). A NoSpace makes the
        pass low; if settling then freed a block, `e` is tried once more; else the pass's GC ends: with `full` if it
        freed nothing, else quietly (None from here on), its report saying what it did."""
        if self.stopped:
            return None
        if self.low:
            gone = self.settle()
            self.freed += len(gone)
            reclaimed(gone)
            if not self.fits(e):
                return None
        for attempt in (1, 2):
            try:
                res = gc.collect(self.store, e, min_seqs, pace=pace, to_partition=to_partition)
                self.freed += res.reclaimed
                return res
            except NoSpace as exc:
                self.low, gone = True, self.settle()
                self.freed += len(gone)
                reclaimed(gone)
                if not gone or attempt == 2:
                    if not self.freed:
                        raise self.full(exc) from exc
                    self.stopped = True  # not "could free nothing": blocks before this victim went
                    return None
        raise AssertionError("unreachable")

    def full(self, cause: NoSpace | None = None) -> NoSpace:
        """The NoSpace of a pass that could free nothing: how much room the smallest victim needs, what to delete."""
        e = self.refused
        if e is not None:
            need = (f"{e.live_bytes + SLACK:,} bytes free to copy the live records of block {e.block_id:016x} "
                    f"({e.live_bytes:,} live bytes, the fewest of the blocks it would collect) before it can delete "
                    f"that block, and {self.free:,} are free")
        else:
            need = f"more room than is free to copy the live records of one block ({cause})"
        return NoSpace(errno.ENOSPC, f"No space left on device (ENOSPC) -- compaction of store {self.store.path!r} "
                       f"could free nothing: GC needs {need}. Free space on the file system holding the store "
                       "(delete records through the API, so that more of each block is dead, or remove files "
                       "elsewhere on it) and run compaction again; every record is intact")
