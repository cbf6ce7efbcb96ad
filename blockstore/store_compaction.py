"""The compaction seams of `Store` (a base class of it): moves and copies, each a compare-and-swap in
the group commit (docs/format.md §5.2, docs/copies.md). blockstore.compaction uses them; nothing here
can lose a live record: a change whose old value is gone writes nothing."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from blockstore import logs
from blockstore.directory import BlockEntry, Location
from blockstore.errors import CorruptionError, InvalidArgument, NotFound
from blockstore.mutations import copy_mutations, relocation_mutations
from blockstore.records import Buffer
from blockstore.validate import check_bool
from blockstore.writer import WriteEngine

_log = logs.get("compaction")


class CompactionSeams:
    """Relocation and copies over the Store's group commit."""

    _engine: WriteEngine
    _check_open: Callable[..., None]
    read_locations: Callable[[Sequence[Location]], list[memoryview]]

    def relocate_many(self, moves: Sequence[tuple[bytes, Location, Buffer]], *, partition: bytes,
                      together: bool = False, drop_tombstones: Sequence[tuple[bytes, Location]] = (),
                      copies: Sequence[tuple[bytes, Location, Buffer]] = ()) -> list[bool]:
        """Copy records to the open block of `partition` and re-point each key only if the directory
        still names its old place, in the atomic batch that updates both blocks' counters: the
        compare-and-swap compaction is built on (docs/format.md §5.2). `moves` are (directory key
        suffix, the location read, its verified payload), as `Directory.block_records` and
        `read_locations` give them. Returns, per move, whether it happened (False: the key was
        overwritten or deleted meanwhile, and stays so). A tombstone's move (empty payload) carries it,
        keeping its sequence number, unless the key was written again since. `drop_tombstones` retires
        tombstones without a copy (the caller proved no older record of the key is left anywhere).
        `together=True` keeps the moves in one block (a fresh one if the open block cannot take all).
        `copies`: copies placed with the moves, in the same block (see `place_copies`); their results
        follow the moves'."""
        self._check_open(write=True)
        if not isinstance(partition, (bytes, bytearray)):
            raise InvalidArgument(f"relocate_many: partition must be bytes, not {type(partition).__name__}")
        check_bool("together", together)
        muts = relocation_mutations(moves, bytes(partition), together, drop_tombstones)
        if copies:
            added = copy_mutations(copies, (), bytes(partition))
            if together and muts and moves:
                muts[0].group_need += added[0].group_need
                added[0].group_need = 0
            muts = muts[: len(moves)] + added + muts[len(moves) :]
        if not muts:
            return []
        self._engine.submit(muts)
        return [bool(m.result) for m in muts[: len(moves) + len(copies)]]

    def seal_blocks(self, block_ids: Collection[int]) -> list[BlockEntry]:
        """Seal these open blocks now, whatever their size (one synced directory write); returns the
        entries of those sealed, as the block table holds them after the seal (an id that is not an open
        block is ignored; an empty one is deleted instead). Compaction's GC takes an open block past its
        invalid ratio that has stopped growing (docs/compaction.md, "Dead records in open blocks"): GC
        takes sealed blocks only. Entries, not ids: a copy of the whole table per block sealed made the
        cost grow with the store."""
        self._check_open(write=True)
        eng = self._engine
        sealed = eng.seal_open_blocks(1 << 63, only=frozenset(int(b) for b in block_ids))
        with eng.state_lock:
            return [eng.table[b].copy() for b in sealed if b in eng.table]

    def place_copies(self, adds: Sequence[tuple[bytes, Location, Buffer]], *, partition: bytes,
                     drops: Sequence[tuple[bytes, Location, Location]] = ()) -> list[bool]:
        """Extra copies of shared records (docs/copies.md). `adds`: (key suffix, its whole current value,
        the verified payload) each written once more to `partition`'s open block (one block, as
        `together`) and added to the value; `drops`: (key suffix, its whole current value, one of its
        places) taken out of the value, writing nothing. Each is a compare-and-swap on the whole value,
        copies included: True per change (adds first) if the value was unchanged, else nothing happened.
        A drop is also refused (False) when no other place of the key reads back verified: the place
        dropped may hold the only good copy (bit rot in the others), and GC deletes its block once it
        is dropped; kept, the key is re-derived from it by `fsck --repair` (docs/copies.md)."""
        self._check_open(write=True)
        if not isinstance(partition, (bytes, bytearray)):
            raise InvalidArgument(f"place_copies: partition must be bytes, not {type(partition).__name__}")
        sound = [self._another_place_verifies(value, here) for _sfx, value, here in drops]
        muts = copy_mutations(adds, [d for d, ok in zip(drops, sound) if ok], bytes(partition))
        if muts:
            self._engine.submit(muts)
        done = iter([bool(m.result) for m in muts])
        return [next(done) for _ in adds] + [ok and next(done) for ok in sound]

    def _another_place_verifies(self, value: Location, here: Location) -> bool:
        others = [p for p in value.places() if (p.block_id, p.offset) != (here.block_id, here.offset)]
        if not others:
            return True  # dropping the last place: copy_mutations refuses it (InvalidArgument)
        for place in others:
            try:
                self.read_locations([place])
            except (CorruptionError, NotFound):
                continue
            return True
        _log.warning("kept the place %016x:%d of a record: none of its other places reads back verified "
                     "(run blockstore fsck --repair)", here.block_id, here.offset)
        return False
