"""The L2 adapter's capacity budget: admission (a key's second sighting; a key evicted long ago is not stored
again), and when eviction passes run: a store that would not fit runs (and waits for) one itself; one nearing
the bound starts one ahead of need on the eviction thread (`make_room`, `PassLead`). The pass itself is
`l2_evict_walk.py`'s.

A module of its own, owned by the adapter (`BlockstoreL2Adapter._eviction`), because it is the one place that
decides how far over or under capacity_bytes the adapter is, payload and block files alike (`_disk_excess`
states the bound). It reaches the adapter only through the objects it is given (store, shared state, eviction
memory, listener hub, the adapter's delete steps).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from blockstore.connector.eviction import RETURN_SPANS, PassLead
from blockstore.connector.l2_config import RECORD_FRAMING, record_bytes
from blockstore.connector.l2_evict_walk import EVICT_AHEAD, DeleteMarked, EndDelete, EvictionWalk
from blockstore.connector.l2_listeners import ListenerHub
from blockstore.connector.l2_state import AdapterState, EvictionMemory, PendingPut
from blockstore.directory import BlockEntry
from blockstore.store import Store

_log = logging.getLogger("blockstore.connector")

# Disk use is checked against capacity_bytes + slack after every DISK_CHECK_FRACTION of a block stored (a block
# table snapshot costs O(blocks)); see CapacityEviction._disk_excess for the slack.
DISK_CHECK_FRACTION = 4
# A pass starts in the background once the room left is under min(block_size / LEAD_BLOCK, capacity / EVICT_AHEAD):
# it must end before the stores that go on meanwhile use that room up (a pass empties a whole block: 7-13 ms for a
# 16 MiB block here, while 2-10 MiB are stored), else they wait for the rest of it; room kept free is cache lost,
# so at most 1/64 of it (bench/eviction.py: hit rate and throughput), and only what stores ask for while passes
# run (eviction.PassLead)
LEAD_BLOCK = 4


class CapacityEviction:
    """Owned by the adapter. Eviction by value (eviction.py) with the memory it shares with the adapter's lookups
    (`EvictionMemory`); one pass at a time (`_evict_lock`), run by a store that would not fit or on its own
    thread ahead of need (on `pool`, the adapter's one eviction thread). `close()` waits for a pass under way."""

    def __init__(self, store: Store, state: AdapterState, memory: EvictionMemory, hub: ListenerHub,
                 delete_marked: DeleteMarked, end_delete: EndDelete, admit_all: bool, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self._state = state
        self._memory = memory
        self._admit_all = admit_all
        self._walk = EvictionWalk(store, state, memory, hub, delete_marked, end_delete)
        self._disk_checked_at = 0
        self._evict_lock = threading.Lock()
        self._evict_queued = False  # a background pass is submitted and has not started its work yet
        self._asked = 0  # payload bytes stores asked room for (PassLead: what arrives while a pass runs)
        # the room at which a pass starts ahead (lead): follows what stores ask for while passes run (PassLead)
        self._pass_lead = PassLead(min(store.block_size // LEAD_BLOCK, state.capacity // EVICT_AHEAD))
        self._lead_bytes = self._pass_lead.limit  # read by stores without the lock (one int)
        self._evict_pool = pool  # one thread: passes ahead of need, off the stores' path (make_room)

    def close(self) -> None:
        """Wait for a pass under way; start none after."""
        self._evict_pool.shutdown(wait=True)

    def admit(self, puts: list[PendingPut]) -> list[PendingPut]:
        """Admission ('second_sighting': a new key is stored the second time it is offered) and the ghost
        (eviction.py): a key evicted earlier that is stored again within RETURN_SPANS spans starts with one
        read of credit (coming back is reuse); one that comes back later is not stored this time. A key the ghost
        remembers has been sighted (stored, then evicted): admission does not ask for two more sightings of it."""
        keep: list[PendingPut] = []
        with self._state.lock:
            for p in puts:
                evicted_at = self._memory.ghost.pop(p.key) if p.old is None else None
                if (evicted_at is None and p.old is None and not self._admit_all
                        and self._memory.sightings.pop(p.key) is None):
                    self._memory.sightings.add(p.key)
                    self._state.counters.skipped_admission += 1
                    continue
                if evicted_at is not None:
                    self._memory.returns.add((self._memory.clock - evicted_at) / max(1, self._memory.span))
                    if self._memory.clock - evicted_at > RETURN_SPANS * self._memory.span:
                        self._memory.ghost.add(p.key, self._memory.clock)
                        self._state.counters.skipped_admission += 1
                        continue
                    self._memory.stats.seed(p.key, self._memory.clock, 1)
                keep.append(p)
        return keep

    def make_room(self, puts: list[PendingPut]) -> tuple[list[PendingPut], int]:
        """Keep the adapter within capacity_bytes: evict by value (one pass at a time), then keep the longest
        prefix of the task that fits (a prefix is what a later request can use). Returns (what to write,
        bytes reserved for it). A store waits for a pass only when its payload would exceed capacity_bytes or
        the block files their bound; when either is merely near (within `lead()`), a pass is started on the
        eviction thread (`_evict_ahead`) and the store goes on."""
        need = sum(p.size for p in puts) - sum(p.old.payload_len for p in puts if p.old is not None)
        lead = self.lead()
        with self._state.lock:
            self._asked += max(0, need)  # counted before any wait: a store a pass holds up still asked during it
            excess = self._state.used + self._state.reserved + need - self._state.capacity
            disk_due = self._memory.clock - self._disk_checked_at >= self.store.block_size // DISK_CHECK_FRACTION
            if disk_due:
                self._disk_checked_at = self._memory.clock
        disk = self._disk_excess(self.store.block_table(), puts) if disk_due else -lead - 1  # (not near)
        if excess > 0 or disk > 0:
            with self._evict_lock:
                with self._state.lock:  # another pass may have made the room meanwhile
                    excess = self._state.used + self._state.reserved + need - self._state.capacity
                # a store that waits frees its need and the lead: room freed beyond it stays empty until the stores
                # fill it, cache lost (capacity / EVICT_AHEAD freed ahead held 0.98 of the capacity at 30 % of the
                # working set in bench/eviction.py, and the records never read of the oldest block are deleted one
                # by one now: EvictionWalk._trim)
                if self._pass(excess, puts, self.lead()):
                    with self._state.lock:
                        self._state.counters.eviction_passes_waited += 1
        elif excess >= -lead or disk >= -lead:
            self._start_pass_ahead()
        with self._state.lock:
            room = self._state.capacity - self._state.used - self._state.reserved
            keep: list[PendingPut] = []
            total = 0
            for p in puts:
                grow = p.size - (p.old.payload_len if p.old is not None else 0)
                if total + grow > room:
                    break
                keep.append(p)
                total += grow
            self._state.counters.skipped_capacity += len(puts) - len(keep)
            self._state.reserved += total
        return keep, total

    def lead(self) -> int:
        """The room left at which a pass starts in the background: at most min(block_size / LEAD_BLOCK,
        capacity / EVICT_AHEAD) (LEAD_BLOCK says why), less where stores ask for less while passes run
        (eviction.PassLead)."""
        return self._lead_bytes

    def _pass(self, excess: int, puts: list[PendingPut], ahead: int, lead: int = 0) -> bool:
        """One eviction pass (the caller holds _evict_lock) if payload (`excess`) or block files (their bound
        with `puts` to come, less `lead`) are over: frees at least `ahead` (space coming back a block at a
        time: usually a block). Returns whether it ran."""
        table = self.store.block_table()
        disk = self._disk_excess(table, puts) + lead
        if excess <= 0 and disk <= 0:
            return False
        gone = self._walk.evict(max(excess, ahead) if excess > 0 else excess,
                                max(disk, ahead) if disk > 0 else disk, table)
        with self._state.lock:
            self._state.counters.evicted_for_capacity += gone
        return True

    def _start_pass_ahead(self) -> None:
        with self._state.lock:
            if self._evict_queued or self._state.closed:
                return
            self._evict_queued = True
        try:
            self._evict_pool.submit(self._evict_ahead)
        except RuntimeError:  # shut down meanwhile (close)
            with self._state.lock:
                self._evict_queued = False

    def _evict_ahead(self) -> None:
        """The background pass: make the room left at least `lead()` again, so that stores need not wait.
        Never raises (nobody waits for it); a failure is logged and the next store's own pass tries again."""
        try:
            with self._evict_lock:
                with self._state.lock:
                    self._evict_queued = False
                    # room left <= the lead: a pass (the trigger in make_room is the same test)
                    excess = self._state.used + self._state.reserved + self.lead() - self._state.capacity + 1
                    asked = self._asked
                if self._pass(excess, [], 0, self.lead() + 1):  # just the lead: room kept free is cache lost
                    with self._state.lock:
                        self._state.counters.eviction_passes += 1
                        self._pass_lead.passed(self._asked - asked)
                        self._lead_bytes = self._pass_lead.lead(self._state.used // max(1, self._state.records))
        except Exception as exc:
            _log.warning("blockstore L2: background eviction pass failed: %s", exc)
            with self._state.lock:
                self._evict_queued = False
                self._state.last_error = f"{type(exc).__name__}: {exc}"

    def wait(self) -> None:
        """Return once no eviction pass is queued or running (tests and benches that need a settled state)."""
        while True:
            with self._evict_lock, self._state.lock:
                if not self._evict_queued:
                    return
            time.sleep(0.001)

    def _disk_excess(self, table: list[BlockEntry], puts: list[PendingPut]) -> int:
        """Bytes by which block files would exceed their bound once `puts` are written. The promise: block files
        on disk stay within capacity_bytes + RECORD_FRAMING per record held + (open blocks + 1) x block_size:
        the payload budget, each record's header and page alignment, the open blocks (dead records in them go
        only once they are sealed) and the one block eviction is emptying. Blocks that hold keys a lookup has
        locked (LMCache holds such a lock for one prefetch) or records that are not the adapter's are never
        emptied and can exceed it."""
        with self._state.lock:
            framing = (self._state.records + len(puts)) * RECORD_FRAMING
        incoming = sum(record_bytes(p.size) for p in puts)
        return sum(e.data_end for e in table) + incoming - self._state.capacity - framing - self.store.block_size
