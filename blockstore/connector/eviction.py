"""What the L2 adapter's capacity eviction knows and decides: the value of a record, from a bounded cache of
per-key read statistics, and the log walk that frees whole blocks (issue 16).

The rule is the KV-reuse seed's: value = relevance x recency x reuse - size.

- reuse: reads (lookup hits) since the record was written or last kept by eviction, capped at MAX_REUSE;
  each time eviction keeps a record it spends one (S3-FIFO's main queue, Yang et al., SOSP '23), so a record
  read once long ago does not stay for ever;
- recency: 0.5 ** (age / (RECENCY_HALF_LIFE x span)), age counted in payload bytes stored since the last read
  (a clock that moves with the work, not with wall time) and span the clock's advance since the block being
  emptied was created (`ClockHistory`): the cache's real turnover, which records kept at the head stretch
  beyond capacity_bytes. Relative to it, "read within the last turnover" means the same whatever is kept:
  a fixed horizon of half the capacity kept records of conversations that had ended for two turnovers, and
  lost to LRU on multi-turn traces (bench/eviction.py: 0.95-0.96 of LRU's hit rate; relative, 0.98-0.99,
  the rest is whole-block eviction's lower occupancy);
- relevance: 1 if the last lookup that found the record found every key before it too (LMCache loads only
  the hit prefix of a request, so a hit behind a miss is not used), RELEVANCE_BEHIND_MISS otherwise;
- size: SIZE_WEIGHT x size / mean record size, so among records of equal use the larger goes first and a
  record never read (reuse 0) always has a negative value.

Eviction walks the log oldest block first (a log-structured cache: space comes back a whole block at a time,
without GC). Each record of the oldest block is either deleted (value <= 0) or, if worth keeping, written again
at the head of the log (a put of the same bytes with a new sequence number, the key claimed as a store claims it,
so a concurrent store or delete is left to it); then the emptied blocks go with the keys still in them in one
engine call (`Store.evict_blocks`: one synced directory write, no tombstones, safe because the engine removes a
key only when no block that stays can hold an older record of it). A kept record is not relocated with its old
sequence number: such a copy would hold that floor down and every later block would need tombstones. A block
the engine refuses loses its keys to tombstones (a delete), and once it holds only tombstones they are dropped
when no other block can hold anything older (the rule compaction's GC uses), else carried to the head. So
the disk stays within capacity with any compaction setting, including none.

Records never read go one by one (`l2_evict_walk._trim`): when the oldest block that is not emptied whole holds
more records never read than a pass needs, and holds records that were read too, the pass deletes just enough of
them, oldest first, each with a tombstone, and leaves the block where it is; it is emptied whole (keepers and spares
written again at the head) by the first pass its records never read no longer cover. Emptying it whole at once
deleted all of them, and the room beyond the need stood empty until the stores filled it (bench/eviction.py, seeds
16-18, shifting, multiturn and zipf at 10 % and 30 % of the working set: the adapter held 0.980-0.991 of its
capacity on average, now 0.987-0.998; shifting @ 10 % 0.979 / 1.041 / 1.027 of LRU's hit rate, now 0.994 / 1.038 /
1.059). A block of nothing but records never read (a scan, the store-only stream of the throughput run) is still
emptied whole: trimmed too, a tombstone per record and a listing of the block per pass left that stream 0.32-0.41
of its throughput without a capacity (0.82-0.90 with it emptied whole, the same runs).

Spare room: space comes back a whole block at a time, so a pass usually frees more than the stores need (up to a
block's records), and that room stood empty until the stores filled it: the adapter held 0.95-0.98 of its capacity
on average, and lost 1-3 % of LRU's hit rate to that alone (bench/eviction.py, "LRU at its occupancy"). Records
of the emptied blocks not worth a keep of their own but read recently enough (`spare_value`) hold that room, most
recently read first, instead of being deleted; one never read (a one-off, a scan, the store-only stream of the
throughput run) never does. They are kept only within what the pass frees beyond its need, so the payload stays
within capacity_bytes and the block files within their bound. The price: the room filled, the next pass comes
sooner, and spares are written again at the head. "Recently enough" is learned (`ReturnDistances`): one span plus
the median distance, in spans, at which evicted keys came back (the ghost's returns). A fixed RETURN_SPANS (3)
kept, on a sliding working set, records that had left it for good (bench/eviction.py's `sliding`, 500 requests at
30 % of the working set: 0.936 of LRU's hit rate, 0.961 with the learned window; 1,200 requests at 10 %: 0.972,
0.992); where evicted keys come back late (multiturn, zipf), the window stays wide. The learned window also cuts
the rewrites of kept records (full runs, per request: multiturn @ 30 % 6.3 -> 4.7, sliding @ 10 % 4.7 -> 2.8). Its
cost: the returns only see what was evicted, not the spares that were read because they were kept, so on a
stable working set the window comes out narrower than the reuse it serves (shifting @ 10 % full 0.990 -> 0.984
of LRU, @ 30 % quick 1.005 -> 0.996; medians of 3 runs).

Admission by return (always on): keys eviction deletes are remembered in a bounded ghost (their hash and the
clock then). A key stored again within RETURN_SPANS spans of its eviction starts with one read of credit
(coming back is reuse: eviction was wrong about it); one that comes back later than that is not stored this
time (its ghost is renewed, so a second return soon after is stored): kept, it would reach the tail of the log
again long before its next use, and the space it took would push out records that are used sooner (MIN's
bypass; on the multi-turn trace, conversations active less often than the cache turns over). bench/eviction.py
measured it: multiturn at 10 % of the working set 0.95-0.97 of LRU's hit rate without it, 1.01-1.05 with it.

Memory: the statistics are kept for at most HOT_KEYS keys (least recently read dropped first: those are the
ones eviction takes anyway); the ghost and the sightings hold at most GHOST_KEYS hashes each, the return distances RETURN_SAMPLES floats. Nothing else is kept per record: the
directory (RocksDB) is the index the walk reads.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

HOT_KEYS = 1 << 17  # keys with read statistics in RAM: ~130 k x ~200 B = ~26 MB at most
GHOST_KEYS = 1 << 17  # hashes of keys evicted unread / offered once (admission): ~130 k x ~80 B
MAX_REUSE = 3  # reads counted per record (S3-FIFO's 2-bit frequency)
SIZE_WEIGHT = 0.1
RECENCY_HALF_LIFE = 0.3  # of the log's span: a record unread for a whole turnover keeps a tenth of its reuse
RETURN_SPANS = 3  # a key stored again later than this many spans after its eviction is not stored that time
CLOCK_SAMPLES = 1024  # (time, clock) samples ClockHistory keeps: ~16 KB
RELEVANCE_BEHIND_MISS = 0.5
RETURN_SAMPLES = 256  # ghost returns ReturnDistances remembers
MIN_RETURNS = 32  # returns seen before the spare window follows them
RETURN_QUANTILE = 0.5  # the median
LEAD_PASSES = 16  # background passes PassLead remembers
LEAD_MIN_PASSES = 4  # passes seen before the lead follows them
LEAD_FACTOR = 2  # the lead: this many times the most the stores asked for during one pass, plus a record


@dataclass(slots=True)
class KeyStat:
    reuse: int = 0  # reads since written or last kept by eviction (<= MAX_REUSE)
    last: int = 0  # the clock (payload bytes stored) at the last read
    usable: bool = True  # the last lookup found every key before this one too


class KeyStats:
    """Read statistics of at most `limit` keys, least recently read dropped first. Not thread-safe: the
    adapter calls it under its lock."""

    def __init__(self, limit: int = HOT_KEYS) -> None:
        self.limit = limit
        self._stats: OrderedDict[Any, KeyStat] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stats)

    def get(self, key: Any) -> KeyStat | None:
        return self._stats.get(key)

    def read(self, key: Any, clock: int, usable: bool = True) -> None:
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = KeyStat()
            if len(self._stats) > self.limit:
                self._stats.popitem(last=False)
        else:
            self._stats.move_to_end(key)
        st.reuse = min(MAX_REUSE, st.reuse + 1)
        st.last = clock
        st.usable = usable

    def seed(self, key: Any, clock: int, reuse: int) -> None:
        """A key stored again after it was evicted: it starts with the reuse it showed by coming back."""
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = KeyStat(reuse=0, last=clock)
            if len(self._stats) > self.limit:
                self._stats.popitem(last=False)
        st.reuse = max(st.reuse, min(MAX_REUSE, reuse))
        st.last = clock

    def spend(self, key: Any) -> None:
        """Eviction kept the key: one read of credit is used up."""
        st = self._stats.get(key)
        if st is not None:
            st.reuse = max(0, st.reuse - 1)

    def forget(self, key: Any) -> None:
        self._stats.pop(key, None)


class HashMarks:
    """A bounded map from key hashes to an int (the ghost of evicted keys: the clock at their eviction;
    admission's sightings), oldest forgotten first. A hash collision only makes a key look seen: it changes a
    decision's quality, never correctness."""

    def __init__(self, limit: int = GHOST_KEYS) -> None:
        self.limit = limit
        self._seen: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: Any) -> bool:
        return hash(key) in self._seen

    def add(self, key: Any, mark: int = 0) -> None:
        h = hash(key)
        self._seen[h] = mark
        self._seen.move_to_end(h)
        if len(self._seen) > self.limit:
            self._seen.popitem(last=False)

    def pop(self, key: Any) -> int | None:
        """The key's mark, forgotten; None if it was not there."""
        return self._seen.pop(hash(key), None)


class ClockHistory:
    """The eviction clock (payload bytes stored) at past wall-clock times, so that a block's creation time
    (`BlockEntry.created_ns`) turns into the clock it was written at. Bounded: samples at least `step` clock
    apart, and when more than `limit` are held every other one is dropped (older spans get coarser, never
    lost). Not thread-safe: the adapter calls it under its lock."""

    def __init__(self, step: int, limit: int = CLOCK_SAMPLES) -> None:
        self.step = max(1, step)
        self.limit = limit
        self._times: list[int] = []
        self._clocks: list[int] = []

    def __len__(self) -> int:
        return len(self._times)

    def record(self, time_ns: int, clock: int) -> None:
        if self._clocks and clock - self._clocks[-1] < self.step:
            return
        self._times.append(time_ns)
        self._clocks.append(clock)
        if len(self._times) > self.limit:
            self._times = self._times[::2] + ([time_ns] if len(self._times) % 2 == 0 else [])
            self._clocks = self._clocks[::2] + ([clock] if len(self._clocks) % 2 == 0 else [])

    def clock_at(self, time_ns: int) -> int | None:
        """The clock at the last sample taken at or before `time_ns` (a lower bound of the clock then, so
        a span measured from it is at most one step too long); None when no sample is that old."""
        i = bisect.bisect_right(self._times, time_ns)
        return self._clocks[i - 1] if i else None


def value(st: KeyStat | None, size: int, clock: int, horizon: int, mean_size: float) -> float:
    """relevance x recency x reuse - size (see the module's docstring); `horizon` is the span the recency
    is measured against."""
    cost = SIZE_WEIGHT * size / max(1.0, mean_size)
    if st is None or st.reuse == 0:
        return -cost
    recency = 0.5 ** (max(0, clock - st.last) / max(1.0, horizon * RECENCY_HALF_LIFE))
    relevance = 1.0 if st.usable else RELEVANCE_BEHIND_MISS
    return relevance * recency * st.reuse - cost


class ReturnDistances:
    """How long after their eviction keys come back (stored again, the ghost's returns), in spans: the last
    `limit` of them. `window()` is how long ago a record may have been read and still hold the spare room: one
    span (a record reaches the tail about a span after its last read) plus the distance within which
    RETURN_QUANTILE of the returns came; RETURN_SPANS until MIN_RETURNS have been seen. Not thread-safe: the
    adapter calls it under its lock."""

    def __init__(self, limit: int = RETURN_SAMPLES) -> None:
        self._seen: deque[float] = deque(maxlen=limit)

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, spans: float) -> None:
        self._seen.append(min(float(RETURN_SPANS), max(0.0, spans)))

    def window(self) -> float:
        if len(self._seen) < MIN_RETURNS:
            return float(RETURN_SPANS)
        ranked = sorted(self._seen)
        return min(float(RETURN_SPANS), 1.0 + ranked[int(RETURN_QUANTILE * (len(ranked) - 1))])


def spare_value(st: KeyStat | None, clock: int, horizon: int, window: float = RETURN_SPANS) -> float | None:
    """The rank of a record not worth keeping (value <= 0) for the room a pass frees beyond its need (see the
    module's docstring): the recency of its last read. None: never read (nothing says it is used again: a
    one-off, a scan), or read longer ago than `window` spans (`ReturnDistances.window`; at most RETURN_SPANS, later
    than admission by return stores a key again)."""
    if st is None or st.last <= 0 or clock - st.last > window * horizon:
        return None
    return 0.5 ** (max(0, clock - st.last) / max(1.0, horizon * RECENCY_HALF_LIFE))


class PassLead:
    """How much room a background pass must leave for the stores that arrive while it runs (the adapter's lead:
    a pass starts once the room left is within it). The room kept free is cache lost: with a fixed lead of a
    quarter block (the most a store may need during a pass of a 16 MiB block here) the adapter held 0.96-0.98
    of its capacity in bench/eviction.py's runs, where stores come one request at a time and ask for nothing
    while a pass runs. So the lead follows what the stores asked for while each of the last LEAD_PASSES
    background passes ran: LEAD_FACTOR x the most of those plus one mean record, never more than `limit` (the
    fixed lead, which it is until LEAD_MIN_PASSES passes were seen). Stores that arrive during a pass count
    whether they waited for it or not, so a burst raises the lead at the next pass. Not thread-safe: the adapter
    calls it under its lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._asked: deque[int] = deque(maxlen=LEAD_PASSES)

    def __len__(self) -> int:
        return len(self._asked)

    def passed(self, asked: int) -> None:
        """One background pass ended; the stores asked for `asked` payload bytes while it ran."""
        self._asked.append(max(0, asked))

    def lead(self, record: int) -> int:
        if len(self._asked) < LEAD_MIN_PASSES:
            return self.limit
        return min(self.limit, LEAD_FACTOR * max(self._asked) + max(0, record))


def usable_hits(found: list[bool]) -> list[bool]:
    """Per key of one lookup: whether it lies in the request's hit prefix (all keys before it found)."""
    out = []
    ok = True
    for f in found:
        ok = ok and f
        out.append(ok)
    return out


ADMISSION = ("always", "second_sighting")
