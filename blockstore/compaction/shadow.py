"""Shadow of a relocation: what rewriting a cluster would do to the blocks of the requests that read it.

A cluster's rewrite helps the requests that read its records together and can hurt the others: a
record that several requests read (a document's chunk that many sessions retrieve, a file many tasks
open) leaves the block where its usual neighbours stay, so each request that reads it with them now
touches one block more (issue 16, `workspaces`: document chunks sat in 1.31 blocks a request without
relocation and in 1.53 with it). Before a cluster moves, the latest requests that read any of its
records (the tracker's groups while none has been seen) are counted in blocks before and after the
move, with one reader more for each record several groups read and each neighbour it was written
beside (WriteNeighbours: the readers to come); a record whose move costs those readers as much as it
saves stays where it is, and a cluster whose move saves the requests seen nothing is left alone. No constant of a workload
enters: only the requests observed and where their records are.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from blockstore import foreground

if TYPE_CHECKING:
    from blockstore.directory import Location
    from blockstore.store import Store

    from .affinity import AffinityTracker, Group

Reader = tuple[Sequence[bytes], float]  # a group's keys and its weight (the tracker's score)


def blocks_read(keys: Iterable[bytes], places: Mapping[bytes, Sequence[int]]) -> int:
    """Blocks a request for `keys` touches, where `places` lists each live record's blocks (its primary
    first, then its copies): as `reader.choose_places` reads them, on block ids only."""
    touched: set[int] = set()
    multi: list[Sequence[int]] = []
    for k in keys:
        p = places.get(k)
        if not p:
            continue
        if len(p) == 1:
            touched.add(p[0])
        else:
            multi.append(p)
    while multi:
        rest = [p for p in multi if not any(b in touched for b in p)]
        if not rest:
            break
        votes = Counter(b for p in rest for b in p)
        touched.add(max(votes, key=lambda b: votes[b]))
        multi = rest
    return len(touched)


def readers(tracker: AffinityTracker, ranked: Sequence[tuple[Group, bool]]) -> list[Reader]:
    """Whose blocks a move is judged by: the latest requests, each once (the same request seen n times is
    one reader of weight n: the same sums, for a fraction of the work); the groups (weighted by their
    score) only while none has been seen since the store opened."""
    recent = Counter(tracker.recent())
    if recent:
        return [(keys, float(n)) for keys, n in recent.items()]
    return [(g.keys, tracker.weight(g)) for g, _due in ranked]


class Shadow:
    """Where the records of one pass's groups are, kept current as the pass moves clusters, and the
    groups that read each record."""

    def __init__(self, readers: Sequence[Reader], places: dict[bytes, list[int]]) -> None:
        self.places = places
        self.readers = list(readers)
        self.observed = len(self.readers)  # readers past these are the prior's (WriteNeighbours)
        self._by_key: dict[bytes, list[int]] = {}
        for i, (keys, _w) in enumerate(readers):
            foreground.step_aside()  # planning is Python: on the background thread, reads go first
            for k in keys:
                if k in places:
                    self._by_key.setdefault(k, []).append(i)
        self._next_block = -1  # ids for blocks a move writes (negative: never a real block id)

    def add_reader(self, keys: Sequence[bytes], weight: float, places: Mapping[bytes, list[int]]) -> None:
        """One more reader (with the places of its records the shadow did not know)."""
        for k in keys:
            if k not in self.places:
                self.places[k] = places[k]
        i = len(self.readers)
        self.readers.append((keys, weight))
        for k in keys:
            self._by_key.setdefault(k, []).append(i)

    def new_block(self) -> int:
        self._next_block -= 1
        return self._next_block

    def _blocks(self, i: int, moving: Container[bytes], dest: int) -> int:
        """Blocks reader `i` touches once `moving` are in block `dest` (their other places dropped: a move
        rewrites the primary, GC drops copies)."""
        keys = self.readers[i][0]
        if not any(k in moving for k in keys):
            return blocks_read(keys, self.places)
        return blocks_read(keys, {k: [dest] if k in moving else self.places.get(k, ()) for k in keys})

    def _cost(self, readers: Iterable[int], moving: Container[bytes], dest: int) -> float:
        return sum(self.readers[i][1] * self._blocks(i, moving, dest) for i in readers)

    def saving(self, moving: Collection[bytes], dest: int, *, observed: bool = False) -> float:
        """Weighted blocks the readers of `moving` save (negative: lose) if those records move to `dest`;
        with `observed`, only the requests seen count (not the prior's readers)."""
        readers = {i for k in moving for i in self._by_key.get(k, ()) if not observed or i < self.observed}
        return self._cost(readers, (), dest) - self._cost(readers, moving, dest)

    def worth_moving(self, moving: Sequence[bytes], dest: int, sweeps: int = 3) -> list[bytes]:
        """The records of `moving` worth moving to `dest`: a record is left where it is when its readers
        touch no more blocks with it staying than with it moving (it buys them nothing, or pulls it away
        from neighbours other groups read it with), one at a time while the others move; then nothing
        unless the rest saves the requests seen blocks (the prior's readers only take records out; a
        single record may move: a straggler joining its cluster's block)."""
        keep = dict.fromkeys(k for k in moving if k in self.places)
        for _ in range(sweeps):
            dropped = False
            for k in list(keep):
                foreground.step_aside()  # planning is Python: on the background thread, reads go first
                readers = self._by_key.get(k, ())
                with_k = self._cost(readers, keep, dest)
                del keep[k]
                if self._cost(readers, keep, dest) > with_k:
                    keep[k] = None  # its readers need it moved
                else:
                    dropped = True
            if not dropped:
                break
        out = list(keep)
        return out if out and self.saving(out, dest, observed=True) > 0 else []

    def moved(self, keys: Iterable[bytes], dest: int) -> None:
        for k in keys:
            if k in self.places:
                self.places[k] = [dest]


class WriteNeighbours:
    """The prior for readers not seen yet: a record is read with the records written beside it (a
    document's chunks, ingested in one batch, sit side by side). For each record given, one reader of
    it and each live record next to it in its block (the reverse index, offset order) joins the
    shadow, so a move that pulls the record away from a neighbour that stays costs one request's
    block, and the observed requests must outweigh it. Each block's index is read once per pass."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._blocks: dict[int, list[tuple[int, bytes]]] = {}
        self._done: set[bytes] = set()

    def add_to(self, seen: Shadow, records: Sequence[tuple[bytes, Location]]) -> None:
        pairs: list[tuple[bytes, bytes, int, int]] = []
        for k, loc in records:
            foreground.step_aside()
            if k in self._done:
                continue
            self._done.add(k)
            recs = self._blocks.get(loc.block_id)
            if recs is None:
                recs = self._blocks[loc.block_id] = list(self.store.dir.block_records(loc.block_id))
            at = _index(recs, loc.offset)
            for j in (at - 1, at + 1):
                if at >= 0 and 0 <= j < len(recs):
                    pairs.append((k, recs[j][1], loc.block_id, recs[j][0]))
        if not pairs:
            return
        now = self.store.dir.get_locations([n for _k, n, _b, _o in pairs])
        for (k, n, bid, off), cur in zip(pairs, now):
            if cur is not None and cur.holds(bid, off):  # the index names dead places too
                seen.add_reader((k, n), 1.0, {n: [p.block_id for p in cur.places()]})


def _index(recs: Sequence[tuple[int, bytes]], offset: int) -> int:
    """Where the record at `offset` is in a block's (offset, key) list; -1 when it is not listed."""
    i = bisect.bisect_left(recs, (offset,))
    return i if i < len(recs) and recs[i][0] == offset else -1
