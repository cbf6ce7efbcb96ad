"""The bookkeeping the L2 adapter's parts share: one lock, the usage counters, the keys in flight (being stored,
being deleted, locked by a lookup) and the byte totals of the capacity budget.

A module of its own because three parts write it: the adapter's task paths (store, lookup, load, delete), its
listener replay (`l2_listeners.py`: which keys are in flight when a step reads the directory) and its capacity
eviction (`l2_capacity.py`, `l2_evict_walk.py`: claims keys for deletion, reserves and frees bytes). The
memory eviction keeps of reads and evictions (`EvictionMemory`) is here too: lookups write it, eviction reads
it. Each gets this one object instead of reaching into the adapter; what it promises is in `AdapterState`'s docstring.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from lmcache.v1.distributed.api import ObjectKey

from blockstore.connector.eviction import ClockHistory, HashMarks, KeyStats, ReturnDistances
from blockstore.directory import Location

_log = logging.getLogger("blockstore.connector")

CLOCK_STEPS = 256  # clock samples per capacity of bytes stored (eviction's span: ClockHistory)


@dataclass
class AdapterCounters:
    """What report_status() shows under `counters` (and the metrics endpoint exports), one field a counter."""

    store_tasks: int = 0
    store_failed_tasks: int = 0
    keys_stored: int = 0
    bytes_stored: int = 0
    duplicates_skipped: int = 0
    replaced_other_layout: int = 0
    skipped_capacity: int = 0
    skipped_locked: int = 0
    lookup_tasks: int = 0
    lookup_keys: int = 0
    lookup_hits: int = 0
    lookup_blocks: int = 0  # distinct blocks holding each lookup's hits, summed over lookups with a hit
    lookup_requests_with_hits: int = 0
    load_tasks: int = 0
    load_keys: int = 0
    load_hits: int = 0
    load_bytes: int = 0
    load_blocks: int = 0
    load_requests_with_hits: int = 0
    load_miss_absent: int = 0
    load_miss_layout: int = 0
    load_miss_corrupt: int = 0
    load_miss_error: int = 0
    keys_deleted: int = 0
    delete_skipped_locked: int = 0
    evicted_for_capacity: int = 0
    eviction_passes: int = 0  # passes run ahead, in the background (a store did not wait for them)
    eviction_passes_waited: int = 0  # passes a store ran itself: the payload would have exceeded capacity_bytes
    kept_by_value: int = 0  # records eviction moved to the head of the log instead of deleting them
    blocks_evicted: int = 0  # blocks eviction removed whole with their keys (Store.evict_blocks: no tombstones)
    tombstones_dropped: int = 0
    tombstones_carried: int = 0
    skipped_admission: int = 0
    locks_expired: int = 0
    task_errors: int = 0


@dataclass(slots=True)
class PendingPut:
    """One record a store task means to write (after the duplicate and lock checks)."""

    i: int  # index in the task
    key: ObjectKey
    kb: bytes
    fp: bytes
    size: int
    old: Location | None  # the record it replaces (another layout), if any


class AdapterState:
    """Shared by the adapter's task paths, its listener replay and its capacity eviction; every field is read and
    written under `lock` (never held across I/O). Per-key state only for keys in flight (bounded by the tasks
    LMCache has open): the directory is the index of the records themselves. A key in `storing` or `deleting`
    is claimed by one task: no other store, delete or eviction touches its record until that task's end
    releases it."""

    def __init__(self, capacity: int, lock_ttl: float) -> None:
        self.lock = threading.Lock()
        self.capacity = capacity  # capacity_bytes (0: unbounded)
        self.lock_ttl = lock_ttl
        self.closed = False
        self.counters = AdapterCounters()
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.locks: dict[ObjectKey, list[float]] = {}  # key -> [lock references, time of the latest]
        self.storing: set[ObjectKey] = set()
        self.deleting: set[ObjectKey] = set()
        self.records = 0  # records of the lmcache namespaces
        self.used = 0  # their payload bytes
        self.reserved = 0  # payload bytes of stores under way (capacity budget)

    def held(self, key: ObjectKey, now: float) -> bool:
        """Whether a lookup's lock still protects `key` (caller holds `lock`). Leases expire after lock_ttl_s."""
        entry = self.locks.get(key)
        if entry is None or entry[0] <= 0:
            return False
        if self.lock_ttl > 0 and now - entry[1] >= self.lock_ttl:
            _log.warning("blockstore L2: lock on %r expired after %.0f s without an unlock", key, self.lock_ttl)
            del self.locks[key]
            self.counters.locks_expired += 1
            return False
        return True


class EvictionMemory:
    """Eviction by value (eviction.py): bounded read statistics, the ghost of keys evicted unread, the keys
    offered once (admission), how soon evicted keys come back, and a clock in payload bytes stored. Written by
    the adapter's stores (the clock) and lookups (reads) and by eviction; under `AdapterState.lock`."""

    def __init__(self, capacity: int) -> None:
        self.stats = KeyStats()
        self.ghost = HashMarks()  # hash of an evicted key -> the clock at its eviction
        self.sightings = HashMarks()
        self.returns = ReturnDistances()  # how soon evicted keys come back: the spare room's window
        self.span = capacity  # the log's span at the last eviction (eviction.py), in clock bytes
        self.clock = 0
        self.history = ClockHistory(capacity // CLOCK_STEPS)  # a block's creation -> the clock then
