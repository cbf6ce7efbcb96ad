"""blockstore as an L2 tier of `lmcache server` (LMCache 0.5.6 multiprocess mode, the route that serves
vLLM on CPU):

    lmcache server ... --l2-adapter '{"type": "plugin", "module_path": "blockstore.connector.l2_adapter",
        "class_name": "BlockstoreL2Adapter", "adapter_params": {"path": "/data/kv"}}'

LMCache finds `BlockstoreL2AdapterConfig` by name, builds it from `adapter_params` and calls
`BlockstoreL2Adapter(config, l1_memory_desc=...)`. What the adapter promises (LMCache's
`l2_adapters/base.py` contract, as the server's store, prefetch and eviction threads use it):

- `submit_*` never raise and never block on I/O: work runs on the adapter's threads (one pool for
  lookups and loads, one for stores, so a burst of stores never delays a lookup). Every task publishes
  its result, then signals its kind's event fd exactly once, failures included (a task that never
  signals hangs its prefetch request with its locks and L1 buffers).
- Keys: an `ObjectKey` is stored as a length-prefixed binary serialization of all its fields
  (`encode_object_key`) in the namespace of its (model_name, cache_salt) pair (`namespace_for`), so
  salted tenants never share a record and every record can be turned back into its `ObjectKey`.
- Store: one `Store.put_many` per task and namespace. Keys already present with the same layout are
  duplicates (skipped, not counted in the bytes reported); a key present with another layout is
  replaced unless a lookup holds it locked. Each record's meta is the object's layout fingerprint
  (size, shapes, dtypes): keys name no dtype or layout, so a load whose buffer does not match the
  fingerprint is a miss, never wrong KV.
- Lookup-and-lock answers every key (a bitmap of len(keys)); each hit takes one reference on a
  per-key lock count; `submit_unlock` drops one (unknown keys: no-op). A lookup is one request for
  the compactor's affinity learning: it names the whole prefix, including what L1 already holds.
- Load: one `Store.get_many(..., out=)` per task and namespace, straight into the L1 buffers. The store
  is opened with on_corrupt="miss": a record whose bytes fail their checksum is a miss (bit 0) and is
  deleted, so the next store of that key can write it again.
- `delete` (LMCache's eviction, HTTP) skips locked keys and never raises; removals are reported with
  the sizes that were stored. With `capacity_bytes` > 0 the adapter also keeps its own budget, by
  value (`eviction.py`: relevance x recency x reuse - size): a pass empties the oldest blocks, deleting
  each record or writing it again at the head of the log if it is worth keeping (the most valuable
  first when more is worth keeping than a pass may move), and removes the emptied blocks with their keys
  in one engine call (`Store.evict_blocks`, no tombstones). Passes run ahead of need on the adapter's
  eviction thread once the room left is within a lead: at most min(block_size / 4, capacity / 64), less
  where stores ask for less while passes run (`eviction.PassLead`); a store runs (and waits for) one itself
  only when it would not fit. The space comes back a whole block at a time with any
  compaction setting: block files stay
  within capacity_bytes + RECORD_FRAMING (8 KiB) per record + (open blocks + 1) x block_size, blocks
  holding locked keys aside (never evicted). Settings that cannot keep this are refused: a capacity
  below one block, compaction with an unbounded copy budget. Optional admission: a key is stored on
  its second sighting. Always: a key eviction deleted that is stored again more than RETURN_SPANS turnovers
  of the log later is not stored that time (eviction.py: it would be evicted again before its next use).
- Memory: nothing is held per record that the directory holds. The directory (RocksDB) is the only
  index; the adapter keeps counters, the keys that tasks are storing, deleting or hold locked right
  now, and bounded caches for eviction (read statistics of the most recently read keys, hashes of
  keys evicted or offered once).
- Restart: one streaming pass over the lmcache namespaces of the directory seeds the byte counters.
- Listeners (LMCache's eviction): one registered at any time, on a fresh or a recovered store, hears
  exactly once of every record held: those already held are replayed to it in batches streamed from the
  directory (nothing kept per record), later changes as they happen; a store or delete that ends while
  the replay runs is told to it by the replay or by the task, never both (`register_listener`).
- Config: `BlockstoreL2AdapterConfig` is a frozen dataclass validated in `__post_init__`, however it is
  built; bad values raise `InvalidArgument` naming the field. A constructor that fails closes all it
  opened (store, fds, pools), so the store is never left locked by the process that failed to start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import KeyEntry, KeyListPage, ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.platform import create_event_notifier

import blockstore
from blockstore import metrics
from blockstore.compaction.gc import MinSeqs, tombstones
from blockstore.connector.eviction import (
    RETURN_SPANS,
    ClockHistory,
    HashMarks,
    KeyStats,
    PassLead,
    ReturnDistances,
    spare_value,
    usable_hits,
    value,
)
from blockstore.connector.l2_config import (
    RECORD_FRAMING,
    BlockstoreL2AdapterConfig,
    check_capacity_fits,
    record_bytes,
)
from blockstore.connector.l2_keys import (
    NS_PREFIX,
    decode_cursor,
    decode_object_key,
    encode_cursor,
    encode_object_key,
    group_by_namespace,
    layout_fingerprint,
    lmcache_namespaces,
    namespace_for,
    readable_model,
)
from blockstore.connector.l2_listeners import ListenerHub
from blockstore.connector.l2_state import AdapterState, PendingPut
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, BlockEntry, Location
from blockstore.keys import SPACE_KV

if TYPE_CHECKING:
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    from lmcache.v1.distributed.internal_api import L1MemoryDesc, L2AdapterListener
    from lmcache.v1.memory_management import MemoryObj

_log = logging.getLogger("blockstore.connector")

# -------------------------------------------------------------------------------------------- config

EVICT_OPEN_RECORDS = 4096  # records of open blocks one eviction pass ranks by value (bounds its cost)
# Disk use is checked against capacity_bytes + slack after every DISK_CHECK_FRACTION of a block stored (a block
# table snapshot costs O(blocks)); see BlockstoreL2Adapter._disk_excess for the slack.
DISK_CHECK_FRACTION = 4
TOMBSTONE_STREAM = b"\0tombstones"  # partition suffix of the blocks that carried tombstones go to
EVICT_AHEAD = 64  # a pass frees at least capacity / EVICT_AHEAD (hit rate vs passes: bench/eviction.py)
# A pass starts in the background once the room left is under min(block_size / LEAD_BLOCK, capacity / EVICT_AHEAD):
# it must end before the stores that go on meanwhile use that room up (a pass empties a whole block: 7-13 ms for a
# 16 MiB block here, while 2-10 MiB are stored), else they wait for the rest of it; room kept free is cache lost,
# so at most 1/64 of it (bench/eviction.py: hit rate and throughput), and only what stores ask for while passes
# run (eviction.PassLead)
LEAD_BLOCK = 4
BUDGET_K = 2  # a pass may move (keep) at most BUDGET_K x the bytes it must free + one block (8: same hit rates)
CLOCK_STEPS = 256  # clock samples per capacity of bytes stored (eviction's span: ClockHistory)
MOVE_BATCH = 256  # records per relocation call when eviction keeps records (each call is one synced group)


# ------------------------------------------------------------------------------------------- adapter

@dataclass(slots=True)
class _Keep:
    """A record an eviction pass would keep (write again at the head), with its value (eviction.py)."""

    value: float
    block: int
    ns: str
    key: ObjectKey
    sfx: bytes
    loc: Location
    spare: bool = False  # value <= 0: kept only in the room the pass frees beyond its need (eviction.spare_value)


class BlockstoreL2Adapter(L2AdapterInterface):
    """An L2 adapter over one blockstore store. Thread-safe: entered from LMCache's store, prefetch,
    eviction and HTTP threads and from its own worker threads; all shared state is under the lock of
    `AdapterState` (l2_state.py), listener state and deliveries under `ListenerHub.deliver_lock` (taken first)."""

    config_class_name = "BlockstoreL2AdapterConfig"

    def __init__(self, config: BlockstoreL2AdapterConfig | dict[str, Any],
                 l1_memory_desc: L1MemoryDesc | None = None) -> None:
        if not isinstance(config, BlockstoreL2AdapterConfig):
            config = BlockstoreL2AdapterConfig.from_dict(config)
        super().__init__(max_capacity_bytes=config.capacity_bytes)
        self.config = config
        self._state = AdapterState(config.capacity_bytes, config.lock_ttl_s)
        self._next_task_id: L2TaskId = 0
        self._done_store: dict[L2TaskId, L2StoreResult] = {}
        self._done_lookup: dict[L2TaskId, Bitmap] = {}
        self._done_load: dict[L2TaskId, Bitmap] = {}
        self._inflight = {"store": 0, "lookup": 0, "load": 0}
        # Eviction by value (eviction.py): bounded read statistics, the ghost of keys evicted unread, the keys
        # offered once (admission), a clock in payload bytes stored; one eviction pass at a time.
        self._stats = KeyStats()
        self._ghost = HashMarks()  # hash of an evicted key -> the clock at its eviction
        self._sightings = HashMarks()
        self._returns = ReturnDistances()  # how soon evicted keys come back: the spare room's window
        self._span = config.capacity_bytes  # the log's span at the last eviction (eviction.py), in clock bytes
        self._clock = 0
        self._history = ClockHistory(config.capacity_bytes // CLOCK_STEPS)  # a block's creation -> the clock then
        self._disk_checked_at = 0
        self._evict_lock = threading.Lock()
        self._evict_queued = False  # a background pass is submitted and has not started its work yet
        self._asked = 0  # payload bytes stores asked room for (PassLead: what arrives while a pass runs)
        self._ns_names: dict[int, str | None] = {}  # namespace id -> its name if an lmcache namespace (eviction)
        self._admit_all = config.admission == "always"
        self.recovered_keys = 0

        self.store = blockstore.open(config.path, durability=config.durability, block_size=config.block_size,
                                     on_corrupt="miss", compaction=config.compaction)
        self._hub = ListenerHub(self.store, self._state)
        # the room at which a pass starts ahead (_lead): follows what stores ask for while passes run (PassLead)
        self._pass_lead = PassLead(min(self.store.block_size // LEAD_BLOCK, self._state.capacity // EVICT_AHEAD))
        self._lead_bytes = self._pass_lead.limit  # read by stores without the lock (one int)
        # A constructor that fails releases everything it made, newest first, so that the store is not left
        # locked by this very process (LMCache aborts start-up; a retry or a second adapter must open it).
        undo: list[Callable[[], None]] = [self.store.close]
        try:
            compactor = self.store.compactor
            if compactor is not None:
                # Affinity is learned from lookups (each names a request's whole prefix, L1 hits included);
                # a load is only the part L1 lacked, and counting it too would credit every request twice.
                compactor.learn_from_lookups()
            if self._state.capacity:
                check_capacity_fits(self._state.capacity, self.store.block_size)  # the store's, if not configured
            self._min_seqs = MinSeqs(self.store)
            self._seed_counters()
            self._store_efd = create_event_notifier()
            undo.append(self._store_efd.close)
            self._lookup_efd = create_event_notifier()
            undo.append(self._lookup_efd.close)
            self._load_efd = create_event_notifier()
            undo.append(self._load_efd.close)
            self._io_pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="blockstore-l2-io")
            undo.append(self._io_pool.shutdown)
            self._store_pool = ThreadPoolExecutor(max_workers=config.workers,
                                                  thread_name_prefix="blockstore-l2-store")
            undo.append(self._store_pool.shutdown)
            # eviction ahead of need: one pass at a time, off the stores' path (_make_room)
            self._evict_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockstore-l2-evict")
            undo.append(self._evict_pool.shutdown)
            metrics.track_adapter(self)  # its report_status() counters, read at each scrape
            self.metrics_endpoint = None if config.metrics_port is None else metrics.serve(config.metrics_port)
        except BaseException:
            self._state.closed = True
            for release in reversed(undo):
                try:
                    release()
                except Exception:  # keep releasing the rest; the original error is what the caller sees
                    _log.exception("blockstore L2: cleanup after a failed start failed")
            raise

    # ---- event fds ----

    def get_store_event_fd(self) -> int:
        return self._store_efd.fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._lookup_efd.fileno()

    def get_load_event_fd(self) -> int:
        return self._load_efd.fileno()

    # ---- submit / collect ----

    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        return self._submit("store", self._store_pool, self._run_store, keys, objects)

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._state.lock:
            done, self._done_store = self._done_store, {}
        return done

    def submit_lookup_and_lock_task(self, keys: list[ObjectKey],
                                    group_layout_descs: dict[int, MemoryLayoutDesc]) -> L2TaskId:
        # group_layout_descs is advisory; the layout is checked against each record at load time
        return self._submit("lookup", self._io_pool, self._run_lookup, keys)

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._state.lock:
            return self._done_lookup.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        try:
            with self._state.lock:
                for k in keys:
                    entry = self._state.locks.get(k)
                    if entry is None:
                        continue  # never locked, already released, or its lease expired: harmless
                    entry[0] -= 1
                    if entry[0] <= 0:
                        del self._state.locks[k]
        except Exception:  # never retried by LMCache: it must not fail
            _log.exception("blockstore L2: unlock failed")

    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        return self._submit("load", self._io_pool, self._run_load, keys, objects)

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._state.lock:
            return self._done_load.pop(task_id, None)

    def _submit(self, kind: str, pool: ThreadPoolExecutor, work: Callable[..., Any], keys: Sequence[ObjectKey],
                *rest: Sequence[Any]) -> L2TaskId:
        """Never raises: a task that cannot even start completes at once as a failure (and signals). The
        lists are copied: the caller may reuse its own."""
        with self._state.lock:
            task_id = self._next_task_id
            self._next_task_id += 1
            self._inflight[kind] += 1
            closed = self._state.closed
        n = 0
        try:
            keys = list(keys)
            n = len(keys)
            if closed:
                raise RuntimeError("the blockstore L2 adapter is closed")
            pool.submit(self._task, kind, task_id, work, keys, *(list(r) for r in rest))
        except Exception as exc:
            _log.error("blockstore L2: %s task %d not started: %s", kind, task_id, exc)
            self._complete(kind, task_id, self._failure(kind, n), f"{type(exc).__name__}: {exc}")
        return task_id

    def _task(self, kind: str, task_id: L2TaskId, work: Callable[..., Any], keys: list[ObjectKey],
              *rest: Any) -> None:
        result: Any = None
        error: str | None = None
        try:
            result = work(keys, *rest)
        except BaseException as exc:  # invisible to LMCache otherwise: record a failure and still signal
            _log.exception("blockstore L2: %s task %d failed", kind, task_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._complete(kind, task_id, self._failure(kind, len(keys)) if result is None else result, error)

    @staticmethod
    def _failure(kind: str, n: int) -> Any:
        return L2StoreResult(False, 0) if kind == "store" else Bitmap(n)

    def _complete(self, kind: str, task_id: L2TaskId, result: Any, error: str | None) -> None:
        """Publish the result, then signal its fd: the controller reads results only after the fd fired."""
        failed = error is not None or (kind == "store" and not result.is_successful())
        with self._state.lock:
            self._inflight[kind] -= 1
            if error is not None:
                self._state.counters.task_errors += 1
                self._state.last_error = error
            # health: a run of failed tasks (a full or failing disk) marks the adapter unhealthy
            self._state.consecutive_failures = self._state.consecutive_failures + 1 if failed else 0
            if kind == "store":
                self._done_store[task_id] = result
            elif kind == "lookup":
                self._done_lookup[task_id] = result
            else:
                self._done_load[task_id] = result
            notifier = {"store": self._store_efd, "lookup": self._lookup_efd, "load": self._load_efd}[kind]
        try:
            notifier.notify()
        except (OSError, ValueError):  # closed (its fd is -1 then): nobody is listening any more
            _log.debug("blockstore L2: %s fd closed before task %d signalled", kind, task_id)

    # ---- keys ----

    # ---- store ----

    def _run_store(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2StoreResult:
        with self._state.lock:
            self._state.counters.store_tasks += 1
        if len(keys) != len(objects):
            _log.error("blockstore L2: store task with %d keys and %d objects", len(keys), len(objects))
            with self._state.lock:
                self._state.counters.store_failed_tasks += 1
            return L2StoreResult(False, 0)
        groups, bad = group_by_namespace(keys)
        ok = not bad
        written = 0
        for ns, items in groups.items():
            try:
                written += self._store_namespace(ns, items, keys, objects)
            except Exception as exc:  # what did land was announced; the task reports a failure
                _log.error("blockstore L2: store into %s failed: %s", ns, exc)
                with self._state.lock:
                    self._state.last_error = f"{type(exc).__name__}: {exc}"
                ok = False
        if not ok:
            with self._state.lock:
                self._state.counters.store_failed_tasks += 1
        return L2StoreResult(ok, written)

    def _claim(self, items: list[tuple[int, bytes]], keys: list[ObjectKey]) -> list[tuple[int, bytes]]:
        """Mark the keys of `items` as being stored by this task; returns those claimed. A key another task
        is storing or deleting is left to it (and counted as a duplicate). Claiming before looking the keys
        up is what makes the look-up race-free: a task that finished earlier is visible to it, and one that
        has not started yet will see this task's claim."""
        claimed: list[tuple[int, bytes]] = []
        seen: set[bytes] = set()
        with self._state.lock:
            for i, kb in items:
                k = keys[i]
                if kb in seen or k in self._state.storing or k in self._state.deleting:
                    self._state.counters.duplicates_skipped += 1
                    continue
                seen.add(kb)
                self._state.storing.add(k)
                claimed.append((i, kb))
        return claimed

    def _store_namespace(self, ns: str, items: list[tuple[int, bytes]], keys: list[ObjectKey],
                         objects: list[MemoryObj]) -> int:
        """Store one namespace's part of a task with one put_many; announce what was written (also when the
        write fails part-way, before the error propagates). Returns the payload bytes written."""
        claimed = self._claim(items, keys)
        puts: list[PendingPut] = []
        reserved = 0
        written: list[PendingPut] = []
        try:
            locs = self.store.locate_many([kb for _, kb in claimed], ns=ns) if claimed else []
            layouts = [(layout_fingerprint(objects[i]), int(objects[i].get_size())) for i, _ in claimed]
            now = time.monotonic()
            dups = locked = 0
            with self._state.lock:
                for (i, kb), loc, (fp, size) in zip(claimed, locs, layouts):
                    if loc is not None and loc.meta == fp and loc.payload_len == size:
                        dups += 1
                    elif loc is not None and self._state.held(keys[i], now):
                        locked += 1  # a lookup promised the record of the other layout to a load
                    else:
                        puts.append(PendingPut(i, keys[i], kb, fp, size, loc))
                self._state.counters.duplicates_skipped += dups
                self._state.counters.skipped_locked += locked
            if puts:
                puts = self._admit(puts)
            if self._state.capacity > 0 and puts:
                puts, reserved = self._make_room(puts)
            if puts:
                try:
                    self.store.put_many([(p.kb, objects[p.i].byte_array) for p in puts], ns=ns,
                                        metas=[p.fp for p in puts])
                    written = puts
                except Exception:
                    # each record is atomic and a failed call leaves a prefix: find what did land
                    try:
                        after = self.store.locate_many([p.kb for p in puts], ns=ns)
                        written = [p for p, loc in zip(puts, after)
                                   if loc is not None and loc.meta == p.fp and loc.payload_len == p.size
                                   and (p.old is None or not loc.same_place(p.old))]
                    except Exception:
                        written = []
                    raise
        finally:
            replaced = [p for p in written if p.old is not None]
            with self._hub.task_end():
                finals = self._hub.settle([keys[i] for i, _ in claimed])
                with self._state.lock:
                    self._state.reserved -= reserved
                    for i, _kb in claimed:
                        self._state.storing.discard(keys[i])
                    self._state.used += sum(p.size for p in written) - sum(p.old.payload_len for p in replaced if p.old)
                    self._clock += sum(p.size for p in written)
                    if written and self._state.capacity:
                        self._history.record(time.time_ns(), self._clock)
                    self._state.records += len(written) - len(replaced)
                    self._state.counters.replaced_other_layout += len(replaced)
                    self._state.counters.keys_stored += len(written)
                    self._state.counters.bytes_stored += sum(p.size for p in written)
                if replaced:
                    self._notify("deleted", [p.key for p in replaced],
                                 [p.old.payload_len for p in replaced if p.old])
                if written:
                    self._notify("stored", [p.key for p in written], [p.size for p in written])
                self._hub.resolve(finals)
        return sum(p.size for p in written)

    def _admit(self, puts: list[PendingPut]) -> list[PendingPut]:
        """Admission ('second_sighting': a new key is stored the second time it is offered) and the ghost
        (eviction.py): a key evicted earlier that is stored again within RETURN_SPANS spans starts with one
        read of credit (coming back is reuse); one that comes back later is not stored this time. A key the ghost
        remembers has been sighted (stored, then evicted): admission does not ask for two more sightings of it."""
        keep: list[PendingPut] = []
        with self._state.lock:
            for p in puts:
                evicted_at = self._ghost.pop(p.key) if p.old is None else None
                if (evicted_at is None and p.old is None and not self._admit_all
                        and self._sightings.pop(p.key) is None):
                    self._sightings.add(p.key)
                    self._state.counters.skipped_admission += 1
                    continue
                if evicted_at is not None:
                    self._returns.add((self._clock - evicted_at) / max(1, self._span))
                    if self._clock - evicted_at > RETURN_SPANS * self._span:
                        self._ghost.add(p.key, self._clock)
                        self._state.counters.skipped_admission += 1
                        continue
                    self._stats.seed(p.key, self._clock, 1)
                keep.append(p)
        return keep

    def _make_room(self, puts: list[PendingPut]) -> tuple[list[PendingPut], int]:
        """Keep the adapter within capacity_bytes: evict by value (one pass at a time), then keep the longest
        prefix of the task that fits (a prefix is what a later request can use). Returns (what to write,
        bytes reserved for it). A store waits for a pass only when its payload would exceed capacity_bytes or
        the block files their bound; when either is merely near (within `_lead()`), a pass is started on the
        eviction thread (`_evict_ahead`) and the store goes on."""
        need = sum(p.size for p in puts) - sum(p.old.payload_len for p in puts if p.old is not None)
        lead = self._lead()
        with self._state.lock:
            self._asked += max(0, need)  # counted before any wait: a store a pass holds up still asked during it
            excess = self._state.used + self._state.reserved + need - self._state.capacity
            disk_due = self._clock - self._disk_checked_at >= self.store.block_size // DISK_CHECK_FRACTION
            if disk_due:
                self._disk_checked_at = self._clock
        disk = self._disk_excess(self.store.block_table(), puts) if disk_due else -lead - 1  # (not near)
        if excess > 0 or disk > 0:
            with self._evict_lock:
                with self._state.lock:  # another pass may have made the room meanwhile
                    excess = self._state.used + self._state.reserved + need - self._state.capacity
                # a store that waits frees at least capacity / EVICT_AHEAD: it pays the engine's syncs (block
                # deletions, relocations) once for several blocks' worth of stores
                if self._pass(excess, puts, self._state.capacity // EVICT_AHEAD):
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

    def _lead(self) -> int:
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
        gone = self._evict(max(excess, ahead) if excess > 0 else excess,
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
        """The background pass: make the room left at least `_lead()` again, so that stores need not wait.
        Never raises (nobody waits for it); a failure is logged and the next store's own pass tries again."""
        try:
            with self._evict_lock:
                with self._state.lock:
                    self._evict_queued = False
                    # room left <= the lead: a pass (the trigger in _make_room is the same test)
                    excess = self._state.used + self._state.reserved + self._lead() - self._state.capacity + 1
                    asked = self._asked
                if self._pass(excess, [], 0, self._lead() + 1):  # just the lead: room kept free is cache lost
                    with self._state.lock:
                        self._state.counters.eviction_passes += 1
                        self._pass_lead.passed(self._asked - asked)
                        self._lead_bytes = self._pass_lead.lead(self._state.used // max(1, self._state.records))
        except Exception as exc:
            _log.warning("blockstore L2: background eviction pass failed: %s", exc)
            with self._state.lock:
                self._evict_queued = False
                self._state.last_error = f"{type(exc).__name__}: {exc}"

    def wait_for_eviction(self) -> None:
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

    def _evict(self, excess: int, disk_excess: int, table: list[BlockEntry]) -> int:
        """Free `excess` payload bytes and `disk_excess` bytes of sealed block files: empty sealed blocks oldest
        first (each record deleted or, if worth keeping, written again at the head of the log, within a budget
        of moved bytes so that a pass ends), then, if payload is still over, delete the least valuable records
        of the open blocks. A pass decides first and then writes in batches: the records kept in one put per
        namespace and MOVE_BATCH, then every emptied block with the keys left in it in one engine call
        (`Store.evict_blocks`: one synced directory write, no tombstones). Blocks the engine refuses (a block
        that stays may hold an older version of one of their keys) and blocks something holds lose their
        deleted keys to tombstones, as a delete does. Returns the keys deleted."""
        budget = BUDGET_K * max(excess, disk_excess, self._state.capacity // EVICT_AHEAD) + self.store.block_size
        drop: dict[int, dict[str, list[ObjectKey]]] = {}
        wanted: list[_Keep] = []
        emptied: list[BlockEntry] = []
        known: dict[bytes, ObjectKey] = {}  # key suffix -> key, of every record planned (decoded once)
        moved = 0
        try:
            for e in table:  # moves beyond the budget will be dropped, least valuable first: they free payload too,
                over = max(0, moved - budget)  # and their blocks' bytes (else a pass for the block files went on over
                if excess - over <= 0 and disk_excess - over <= 0:  # every block, and evicted most of the cache)
                    break
                if e.state != BLOCK_SEALED:
                    continue
                freed, block_moved, blocked = self._plan_block(e, drop.setdefault(e.block_id, {}), wanted, known)
                excess -= freed
                moved += block_moved
                if not blocked:
                    emptied.append(e)
                    disk_excess -= e.data_end - block_moved  # the file goes; what moves is written again at the head
            # the room freed beyond the need (a block's worth at most: space comes back a block at a time) is
            # held by records that have been read, most recently read first, rather than left empty
            surplus = max(0, min(-excess, -disk_excess))
            keep, trimmed, held = self._keep_within([w for w in wanted if not w.spare], budget, drop)
            self._keep_spares([w for w in wanted if w.spare], min(surplus, budget - sum(
                loc.record_len for items in keep.values() for _k, _s, loc in items)), keep, drop, held)
            excess -= trimmed
            for ns, items in keep.items():
                lost, taken = self._rewrite_at_head(ns, items)
                held |= taken
                for k in lost:  # not kept after all: it goes with its block
                    drop.setdefault(self._home_block(items, k), {}).setdefault(ns, []).append(k)
        except BaseException:
            # nothing deleted yet: the keys claimed for deletion are released, else they stayed claimed for ever
            # (missed by lookups, skipped by stores and deletes, their blocks never emptied by a later pass)
            with self._state.lock:
                for by_ns in drop.values():
                    for keys in by_ns.values():
                        self._state.deleting.difference_update(keys)
            raise
        # a block holding a key that a lookup locked or a store claimed since it was planned stays (its keys to
        # delete get tombstones): evicting it whole would remove a locked key, or the record a store is replacing
        # (the store then counts its old bytes as freed a second time)
        emptied = [e for e in emptied if e.block_id not in held]
        emptied_ids = {e.block_id for e in emptied}
        deleted, refused = self._evict_emptied([e.block_id for e in emptied], drop, known)
        for bid, by_ns in drop.items():  # held or refused blocks: their deleted keys need tombstones
            if bid in refused or bid not in emptied_ids:
                for keys in by_ns.values():
                    deleted += len(self._delete_marked(self._still_in(bid, keys))[0])
        # refused blocks that hold nothing live now and keep their tombstones: those go as compaction's GC
        # drops them (or carried to the tombstone stream), the blocks at the next sync_moves
        now_table = {x.block_id: x for x in self.store.block_table()} if refused else {}
        stones = [now_table[bid] for bid in refused
                  if bid in now_table and now_table[bid].tombstones and now_table[bid].live_records == 0]
        if stones:
            self._retire_tombstones(stones)
            self.store.sync_moves()
        if excess > 0:
            deleted += self._evict_open(excess, [e.block_id for e in table if e.state == BLOCK_OPEN])
        return deleted

    def _still_in(self, bid: int, keys: list[ObjectKey]) -> list[ObjectKey]:
        """Of keys claimed for deletion with block `bid`, those the directory still places in it. The others are
        released: a store replaced them after the pass planned and before it claimed them (keys it trims or
        leaves out of the spare room are claimed late), and its decision was about the old record, not the
        acknowledged new one. A failed look-up keeps them all (as before: deleted)."""
        groups, _bad = group_by_namespace(keys)
        stay: list[ObjectKey] = []
        try:
            for ns, items in groups.items():
                locs = self.store.locate_many([kb for _i, kb in items], ns=ns)
                stay += [keys[i] for (i, _kb), loc in zip(items, locs) if loc is not None and loc.block_id == bid]
        except Exception as exc:
            _log.warning("blockstore L2: locating %d key(s) to delete failed (%s); deleting them", len(keys), exc)
            return keys
        staying = set(stay)
        gone_elsewhere = [k for k in keys if k not in staying]
        if gone_elsewhere:
            with self._hub.task_end():
                finals = self._hub.settle(gone_elsewhere)
                with self._state.lock:
                    self._state.deleting.difference_update(gone_elsewhere)
                self._hub.resolve(finals)
        return stay

    @staticmethod
    def _home_block(items: list[tuple[ObjectKey, bytes, Location]], key: ObjectKey) -> int:
        return next(loc.block_id for k, _sfx, loc in items if k == key)

    def _evict_emptied(self, block_ids: list[int], drop: dict[int, dict[str, list[ObjectKey]]],
                       known: dict[bytes, ObjectKey]) -> tuple[int, set[int]]:
        """Remove emptied blocks with the keys still in them (Store.evict_blocks) and account for the keys as
        deleted. Returns (keys deleted, the blocks refused)."""
        if not block_ids:
            return 0, set()
        try:
            done = self.store.evict_blocks(block_ids)
        except Exception as exc:  # nothing removed: the tombstone path deletes them instead
            _log.warning("blockstore L2: evicting %d block(s) failed (%s); deleting their keys", len(block_ids), exc)
            return 0, set(block_ids)
        marked = [k for bid in done.blocks for keys in drop.get(bid, {}).values() for k in keys]
        gone: list[tuple[ObjectKey, int]] = []
        for sfx, loc in done.records:
            k = known.get(sfx)
            if k is not None:
                gone.append((k, loc.payload_len))
                continue
            try:
                if self._lmcache_namespace(int.from_bytes(sfx[:4], "big")) is None or sfx[4] != SPACE_KV:
                    raise ValueError("not an lmcache namespace")
                gone.append((decode_object_key(sfx[5:]), loc.payload_len))
            except ValueError:
                continue  # a record the adapter did not write: a block holding one is never emptied
        self._end_delete(marked, gone)
        with self._state.lock:
            self._state.counters.blocks_evicted += len(done.blocks)
        return len(gone), set(done.refused)

    def _rewrite_at_head(self, ns: str, items: list[tuple[ObjectKey, bytes, Location]]
                         ) -> tuple[list[ObjectKey], set[int]]:
        """Write records worth keeping again at the head of the log (one put per MOVE_BATCH, the namespace's
        block stream), each with a new sequence number: a copy that kept its old one (relocation) would hold
        the engine's eviction floor down, and every later block would need tombstones. The keys are claimed
        as a store claims them, so a store or delete of the same key meanwhile leaves them to this write (a
        delete skips in-flight keys, as it skips locked ones); once claimed, only those the directory still
        places where the pass found them are written (a key deleted or stored again since the pass planned is
        not brought back, nor its new record overwritten with the old). Returns (the keys of batches that
        failed, now claimed for deletion: they go with their block; the blocks of keys a store claimed
        meanwhile: those must stay)."""
        with self._state.lock:  # a key another task claimed is left to it
            mine = [it for it in items if it[0] not in self._state.storing and it[0] not in self._state.deleting]
            taken = {loc.block_id for k, _s, loc in items if k in self._state.storing}
            self._state.storing.update(k for k, _s, _l in mine)
        lost: list[ObjectKey] = []
        kept = 0
        claimed = mine
        try:
            try:
                now = self.store.locate_many([sfx[5:] for _k, sfx, _l in mine], ns=ns) if mine else []
                mine = [it for it, loc in zip(mine, now) if loc is not None and loc.same_place(it[2])]
            except Exception as exc:  # unknown whether they are still there: keep none, they go with their block
                _log.warning("blockstore L2: locating %d record(s) of %s to keep failed (%s); evicting them",
                             len(mine), ns, exc)
                lost += [k for k, _s, _l in mine]
                mine = []
            for start in range(0, len(mine), MOVE_BATCH):
                batch = mine[start : start + MOVE_BATCH]
                try:
                    payloads = self.store.read_locations([loc for _k, _s, loc in batch])
                    self.store.put_many([(sfx[5:], p) for (_k, sfx, _l), p in zip(batch, payloads)], ns=ns,
                                        metas=[loc.meta for _k, _s, loc in batch])
                    kept += len(batch)
                except Exception as exc:
                    _log.warning("blockstore L2: keeping %d record(s) of %s failed (%s); evicting them",
                                 len(batch), ns, exc)
                    lost += [k for k, _s, _l in batch]
        finally:
            with self._hub.task_end():
                finals = self._hub.settle([k for k, _s, _l in claimed])
                with self._state.lock:
                    for k, _s, _l in claimed:
                        self._state.storing.discard(k)
                    self._state.deleting.update(lost)
                    self._state.counters.kept_by_value += kept
                self._hub.resolve(finals)
        return lost, taken

    def _lmcache_namespace(self, ns_id: int) -> str | None:
        """The lmcache namespace of a namespace id (None: another namespace). The names are read from the directory
        again only for an id not seen yet (an id never changes its name; reading them all cost ~0.2 ms a block)."""
        if ns_id not in self._ns_names:
            names = {nid: ns for ns, nid in self.store.dir.namespaces().items()}
            with self._state.lock:
                self._ns_names = {nid: (ns if ns.startswith(NS_PREFIX) else None) for nid, ns in names.items()}
        return self._ns_names.get(ns_id)

    def _block_records(self, bid: int) -> tuple[list[tuple[str, ObjectKey, bytes, Location]], int]:
        """The records the directory names in block `bid` as (namespace, key, suffix, location), and how many
        are not the adapter's (never evicted by it)."""
        pairs = list(self.store.dir.block_records(bid))
        locs = self.store.dir.get_locations([sfx for _off, sfx in pairs])
        out: list[tuple[str, ObjectKey, bytes, Location]] = []
        foreign = 0
        for (off, sfx), loc in zip(pairs, locs):
            if loc is None or loc.block_id != bid or loc.offset != off:
                continue  # moved or deleted since the listing
            ns = self._lmcache_namespace(int.from_bytes(sfx[:4], "big"))
            try:
                if ns is None or sfx[4] != SPACE_KV:
                    raise ValueError("not an lmcache namespace")
                out.append((ns, decode_object_key(sfx[5:]), sfx, loc))
            except ValueError:
                foreign += 1
        return out, foreign

    def _plan_block(self, e: BlockEntry, drop: dict[str, list[ObjectKey]], wanted: list[_Keep],
                    known: dict[bytes, ObjectKey]) -> tuple[int, int, bool]:
        """Decide for every record of sealed block `e`: delete (value <= 0) or keep (moved to the head; appended
        to `wanted` with its value, for `_keep_within`). Keys to delete are claimed in _deleting. Returns
        (payload bytes the deletions free, record bytes the moves would write, whether something holds the
        block: a locked or in-flight key, or a record that is not the adapter's)."""
        records, blocked = self._block_records(e.block_id)
        now = time.monotonic()
        freed = moved = 0
        with self._state.lock:
            mean = self._state.used / self._state.records if self._state.records else 1.0
            # recency against the log's span: the clock's advance since this block, the oldest, was created
            # (the capacity when that is older than the samples, e.g. written before a restart)
            then = self._history.clock_at(e.created_ns)
            span = self._state.capacity if then is None else max(self.store.block_size, self._clock - then)
            self._span = span
            window = self._returns.window()  # how long ago a spare may have been read (eviction.ReturnDistances)
            for ns, k, sfx, loc in records:
                known[sfx] = k
                if k in self._state.storing or k in self._state.deleting or self._state.held(k, now):
                    blocked += 1
                    continue
                st = self._stats.get(k)
                v = value(st, loc.payload_len, self._clock, span, mean)
                if v > 0:
                    moved += loc.record_len
                    wanted.append(_Keep(v, e.block_id, ns, k, sfx, loc))
                elif (sv := spare_value(st, self._clock, span, window)) is not None:
                    freed += loc.payload_len  # deleted unless the pass frees more than it needs
                    wanted.append(_Keep(sv, e.block_id, ns, k, sfx, loc, spare=True))
                else:
                    self._state.deleting.add(k)
                    self._ghost.add(k, self._clock)
                    drop.setdefault(ns, []).append(k)
                    freed += loc.payload_len
        return freed, moved, bool(blocked)

    def _keep_within(self, wanted: list[_Keep], budget: int, drop: dict[int, dict[str, list[ObjectKey]]]
                     ) -> tuple[dict[str, list[tuple[ObjectKey, bytes, Location]]], int, set[int]]:
        """The records worth keeping that the pass's budget of moved bytes allows, most valuable first; the rest
        are deleted with their blocks (claimed in _deleting, added to `drop`). When the oldest blocks hold more
        that is worth keeping than the budget moves, the cache is too small for all of it, and what goes is what
        is worth least, not what the walk reached last. Returns (the keys to keep by namespace, the payload
        bytes the others free, the blocks of keys a lookup locked or a store claimed since: they must stay)."""
        keep: dict[str, list[tuple[ObjectKey, bytes, Location]]] = {}
        trimmed = 0
        moved = 0
        held: set[int] = set()
        now = time.monotonic()
        with self._state.lock:
            for w in sorted(wanted, key=lambda w: -w.value):
                if moved + w.loc.record_len <= budget:
                    moved += w.loc.record_len
                    self._stats.spend(w.key)
                    keep.setdefault(w.ns, []).append((w.key, w.sfx, w.loc))
                    continue
                if self._claim_for_drop(w, now, held, drop):
                    trimmed += w.loc.payload_len
        return keep, trimmed, held

    def _claim_for_drop(self, w: _Keep, now: float, held: set[int], drop: dict[int, dict[str, list[ObjectKey]]]
                        ) -> bool:
        """Claim a record the pass does not keep for deletion with its block (in _deleting, the ghost and `drop`);
        whether it was claimed here. Under self._state.lock. A key a delete claimed since goes anyway; one a lookup
        locked or a store claimed since holds its block (`held`)."""
        if w.key in self._state.deleting:
            return False
        if w.key in self._state.storing or self._state.held(w.key, now):
            held.add(w.block)  # a promise to a load, or a store replacing it: its block stays
            return False
        self._state.deleting.add(w.key)
        self._ghost.add(w.key, self._clock)
        drop.setdefault(w.block, {}).setdefault(w.ns, []).append(w.key)
        return True

    def _keep_spares(self, spares: list[_Keep], room: int, keep: dict[str, list[tuple[ObjectKey, bytes, Location]]],
                     drop: dict[int, dict[str, list[ObjectKey]]], held: set[int]) -> None:
        """Records not worth keeping that have been read (`eviction.spare_value`), most recently read first, are
        kept (added to `keep`) within `room`: the payload the pass frees beyond its need, a block's worth at most
        (space comes back a whole block at a time), which would otherwise stay empty until the stores fill it.
        The others are deleted with their blocks (claimed in _deleting, added to `drop`; the walk counted their
        bytes as freed already); a key a lookup locked or a store claimed since holds its block (`held`)."""
        now = time.monotonic()
        with self._state.lock:
            for w in sorted(spares, key=lambda w: -w.value):
                if w.loc.record_len <= room:
                    room -= w.loc.record_len
                    keep.setdefault(w.ns, []).append((w.key, w.sfx, w.loc))
                    continue
                self._claim_for_drop(w, now, held, drop)

    def _data_floor(self, exclude: set[int]) -> int:
        """The lowest sequence number of any block not in `exclude` that has held a record other than a tombstone
        (footers for sealed blocks, read once each; the engine for open ones). A tombstone older than every
        such block covers no record that is left: it can go. Blocks of nothing but tombstones are left out:
        they hold no record a tombstone must cover, and counting the old sequence numbers that carried
        tombstones keep would pin the floor for ever (found by tests/test_adapter_capacity.py: 27,000 carries
        and 100 drops in 640 stores)."""
        opened = self.store.open_block_min_seqs()
        low = 1 << 64
        for e in self.store.block_table():
            if e.block_id in exclude or e.total_records == e.tombstones:
                continue
            seq = opened.get(e.block_id) if e.block_id in opened else self._min_seqs.own(e.block_id)
            if seq:
                low = min(low, seq)
        return low

    def _retire_tombstones(self, blocks: list[BlockEntry]) -> None:
        """These blocks hold nothing live any more: their tombstones are what keeps them. Each is dropped when
        no other block of records can hold anything older (`_data_floor`: every block being emptied here is
        left out too, as it goes at the same sync), else carried to the namespace's stream of tombstones (blocks
        of nothing else, which the floor leaves out); the blocks go at the next sync_moves."""
        ids = [e.block_id for e in blocks]
        try:
            with self.store.hold_blocks(ids):
                floor = self._data_floor(set(ids))
                carry: dict[bytes, list[tuple[bytes, Location, bytes]]] = {}
                drop: dict[bytes, list[tuple[bytes, Location]]] = {}
                for e in blocks:
                    part = e.partition if e.partition.endswith(TOMBSTONE_STREAM) else e.partition + TOMBSTONE_STREAM
                    for sfx, loc in tombstones(self.store, e):
                        if floor < loc.seq:
                            carry.setdefault(part, []).append((sfx, loc, b""))
                        else:
                            drop.setdefault(part, []).append((sfx, loc))
                carried = 0
                for part in {*carry, *drop}:
                    carried += sum(self.store.relocate_many(carry.get(part, []), partition=part,
                                                            drop_tombstones=drop.get(part, [])))
                dropped = sum(len(v) for v in drop.values())
        except Exception as exc:  # gone meanwhile (compaction collected it) or unreadable: GC's job then
            _log.debug("blockstore L2: tombstones of blocks %s not retired: %s", ids, exc)
            return
        with self._state.lock:
            self._state.counters.tombstones_carried += carried
            self._state.counters.tombstones_dropped += dropped

    def _evict_open(self, excess: int, open_ids: list[int]) -> int:
        """Payload still over capacity and no sealed block left to empty: delete the least valuable records of
        the open blocks (at most EVICT_OPEN_RECORDS ranked per pass, oldest blocks first). Their space on disk
        comes back when the block, sealed, is emptied by a later pass."""
        candidates: list[tuple[str, ObjectKey, Location]] = []
        for bid in open_ids:
            records, _foreign = self._block_records(bid)
            candidates += [(ns, k, loc) for ns, k, _sfx, loc in records]
            if len(candidates) >= EVICT_OPEN_RECORDS:
                break
        now = time.monotonic()
        picked: dict[str, list[ObjectKey]] = {}
        with self._state.lock:
            mean = self._state.used / self._state.records if self._state.records else 1.0
            ranked = sorted(range(len(candidates)), key=lambda i: (value(
                self._stats.get(candidates[i][1]), candidates[i][2].payload_len, self._clock, self._state.capacity, mean),
                i))
            want = excess
            for i in ranked:
                if want <= 0:
                    break
                ns, k, loc = candidates[i]
                if k in self._state.storing or k in self._state.deleting or self._state.held(k, now):
                    continue
                self._state.deleting.add(k)
                self._ghost.add(k, self._clock)
                picked.setdefault(ns, []).append(k)
                want -= loc.payload_len
        deleted = 0
        for keys in picked.values():
            gone, _freed = self._delete_marked(keys)
            deleted += len(gone)
        return deleted

    # ---- lookup ----

    def _run_lookup(self, keys: list[ObjectKey]) -> Bitmap:
        bitmap = Bitmap(len(keys))
        groups, _bad = group_by_namespace(keys)
        compactor = self.store.compactor
        found: list[int] = []
        blocks: set[int] = set()
        seen: list[tuple[str, list[bytes], list[Location | None]]] = []
        for ns, items in groups.items():
            kbs = [kb for _, kb in items]
            locs = self.store.locate_many(kbs, ns=ns)
            for (i, _kb), loc in zip(items, locs):
                if loc is not None:
                    found.append(i)
                    blocks.add(loc.block_id)
            seen.append((ns, kbs, locs))
        if compactor is not None:
            try:
                compactor.observe_lookup(seen)  # one lookup = one request
            except Exception:
                _log.exception("blockstore L2: affinity observation failed")
        hit = [False] * len(keys)
        for i in found:
            hit[i] = True
        usable = usable_hits(hit)  # LMCache loads only a request's hit prefix: a hit behind a miss is unused
        now = time.monotonic()
        with self._state.lock:
            hits = 0
            for i in found:
                k = keys[i]
                if k in self._state.deleting:
                    continue  # on its way out: a lock would promise what is being removed
                entry = self._state.locks.get(k)
                if entry is None or not self._state.held(k, now):
                    self._state.locks[k] = [1, now]
                else:
                    entry[0] += 1
                    entry[1] = now
                self._stats.read(k, self._clock, usable[i])  # eviction's reuse, recency and relevance
                bitmap.set(i)
                hits += 1
            c = self._state.counters
            c.lookup_tasks += 1
            c.lookup_keys += len(keys)
            c.lookup_hits += hits
            if hits:
                c.lookup_requests_with_hits += 1
                c.lookup_blocks += len(blocks)
        return bitmap

    # ---- load ----

    def _run_load(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> Bitmap:
        bitmap = Bitmap(len(keys))
        if len(keys) != len(objects):
            _log.error("blockstore L2: load task with %d keys and %d objects", len(keys), len(objects))
            return bitmap
        groups, bad = group_by_namespace(keys)
        served: list[ObjectKey] = []
        served_bytes = 0
        blocks: set[int] = set()
        absent = mismatched = corrupt = 0
        failed = len(bad)
        for ns, items in groups.items():
            locs = self.store.locate_many([kb for _, kb in items], ns=ns)
            want: list[tuple[int, bytes, Location]] = []
            for (i, kb), loc in zip(items, locs):
                if loc is None:
                    absent += 1
                    continue
                obj = objects[i]
                if loc.meta != layout_fingerprint(obj) or loc.payload_len != obj.get_size():
                    mismatched += 1  # a record of another layout: never copied into this buffer
                    continue
                want.append((i, kb, loc))
            got = self._read_into(ns, [kb for _, kb, _ in want], [objects[i] for i, _, _ in want],
                                  [loc for _, _, loc in want])
            suspects: list[tuple[int, bytes, Location]] = []
            for (i, kb, loc), n in zip(want, got):
                if n == loc.payload_len:
                    bitmap.set(i)
                    served.append(keys[i])
                    served_bytes += n
                    blocks.add(loc.block_id)
                elif n is None:
                    suspects.append((i, kb, loc))
                else:
                    failed += 1
            if suspects:
                bad_records, other = self._drop_unreadable(ns, suspects, keys)
                corrupt += bad_records
                failed += other
        with self._state.lock:  # reads are counted at the lookup (one per request): a load is its second half
            c = self._state.counters
            c.load_tasks += 1
            c.load_keys += len(keys)
            c.load_hits += len(served)
            c.load_bytes += served_bytes
            c.load_miss_absent += absent
            c.load_miss_layout += mismatched
            c.load_miss_corrupt += corrupt
            c.load_miss_error += failed
            if served:
                c.load_requests_with_hits += 1
                c.load_blocks += len(blocks)
        if served:
            self._notify("accessed", served)
        return bitmap

    def _read_into(self, ns: str, kbs: list[bytes], objs: list[MemoryObj],
                   located: list[Location | None]) -> list[int | None]:
        """One batched read straight into the objects' memory, from the locations just checked against
        their layouts (a second directory lookup per key cost ~10 us); per key if the batch as a whole
        fails."""
        if not kbs:
            return []
        try:
            return list(self.store.read_located(kbs, located, ns=ns, out=[o.byte_array for o in objs]))
        except Exception as exc:
            _log.warning("blockstore L2: batched load from %s failed (%s); reading key by key", ns, exc)
        out: list[int | None] = []
        for kb, o in zip(kbs, objs):
            try:
                out.append(self.store.get_many([kb], ns=ns, out=[o.byte_array])[0])
            except Exception as exc:
                _log.warning("blockstore L2: load of one key from %s failed: %s", ns, exc)
                out.append(-1)
        return out

    def _drop_unreadable(self, ns: str, suspects: list[tuple[int, bytes, Location]],
                         keys: list[ObjectKey]) -> tuple[int, int]:
        """Records that were located but read as a miss: if the directory still names the same place, the
        bytes failed their checksum (on_corrupt="miss"): delete the record, else a later lookup would find
        it again and a later store would skip it as a duplicate. Returns (corrupt, other misses)."""
        try:
            again = self.store.locate_many([kb for _, kb, _ in suspects], ns=ns)
        except Exception:
            return 0, len(suspects)
        bad = [keys[i] for (i, _kb, loc), now in zip(suspects, again) if now is not None and now.same_place(loc)]
        if bad:
            _log.error("blockstore L2: %d record(s) in %s failed their checksum; deleting them", len(bad), ns)
            with self._state.lock:
                marked = [k for k in dict.fromkeys(bad) if k not in self._state.deleting and k not in self._state.storing]
                self._state.deleting.update(marked)
            self._delete_marked(marked)
        return len(bad), len(suspects) - len(bad)

    # ---- delete ----

    def delete(self, keys: list[ObjectKey]) -> None:
        """Remove keys (LMCache's eviction, HTTP DELETE). Locked and in-flight keys are skipped, unknown ones
        are no-ops. Never raises: the eviction thread does not catch."""
        try:
            now = time.monotonic()
            with self._state.lock:
                marked = []
                for k in dict.fromkeys(keys):
                    if k in self._state.deleting or k in self._state.storing:
                        continue
                    if self._state.held(k, now):
                        self._state.counters.delete_skipped_locked += 1
                        continue
                    marked.append(k)
                self._state.deleting.update(marked)
            self._delete_marked(marked)
        except Exception:
            _log.exception("blockstore L2: delete failed")

    def _delete_marked(self, marked: list[ObjectKey]) -> tuple[list[ObjectKey], int]:
        """Delete keys the caller put in _deleting; report those that existed, with the sizes they were
        stored with (read from the directory just before). Returns (keys gone, payload bytes freed)."""
        if not marked:
            return [], 0
        groups, _bad = group_by_namespace(marked)
        gone: list[tuple[ObjectKey, int]] = []
        try:
            for ns, items in groups.items():
                kbs = [kb for _, kb in items]
                try:
                    before = self.store.locate_many(kbs, ns=ns)
                    present = [(i, kb, loc) for (i, kb), loc in zip(items, before) if loc is not None]
                    if not present:
                        continue
                    existed = self.store.delete_many([kb for _, kb, _ in present], ns=ns)
                    gone += [(marked[i], loc.payload_len) for (i, _, loc), e in zip(present, existed) if e]
                except Exception as exc:
                    _log.error("blockstore L2: delete in %s failed: %s", ns, exc)
                    try:  # a failed call leaves a prefix deleted: find out which
                        after = self.store.locate_many([kb for _, kb, _ in present], ns=ns)
                        gone += [(marked[i], loc.payload_len) for (i, _, loc), now in zip(present, after)
                                 if now is None]
                    except Exception:
                        pass
        finally:
            self._end_delete(marked, gone)
        return [k for k, _ in gone], sum(s for _, s in gone)

    def _end_delete(self, marked: list[ObjectKey], gone: list[tuple[ObjectKey, int]]) -> None:
        """The end of a deletion: release the keys this task claimed (`marked`), account for and announce those
        that went (`gone`, with their payload sizes; eviction may remove keys it did not claim)."""
        with self._hub.task_end():
            finals = self._hub.settle(marked)
            with self._state.lock:
                for k in marked:
                    self._state.deleting.discard(k)
                    self._stats.forget(k)
                for k, _size in gone:
                    self._stats.forget(k)
                self._state.used -= sum(s for _, s in gone)
                self._state.records -= len(gone)
                self._state.counters.keys_deleted += len(gone)
            if gone:
                self._notify("deleted", [k for k, _ in gone], [s for _, s in gone])
            self._hub.resolve(finals)

    # ---- listing, status, listeners ----

    def _scan(self, ns: str, after: bytes | None = None) -> Iterator[tuple[bytes, Location]]:
        """(serialized key, location) of a namespace's records in key order, starting after `after`."""
        yield from self.store.iter_locations(ns=ns, after=after)

    def _records_held(self) -> Iterator[tuple[ObjectKey, int]]:
        """(key, payload size) of every record in the lmcache namespaces, streamed from the directory."""
        foreign = 0
        for ns in lmcache_namespaces(self.store):
            for kb, loc in self._scan(ns):
                try:
                    key = decode_object_key(kb)
                except ValueError:
                    foreign += 1
                    continue
                if namespace_for(key.model_name, key.cache_salt) != ns:
                    foreign += 1
                    continue
                yield key, loc.payload_len
        if foreign:
            _log.warning("blockstore L2: %d record(s) in lmcache namespaces are not ObjectKeys; ignored", foreign)

    def _seed_counters(self) -> None:
        """After a restart: count the records already in the store (one streaming pass over the directory,
        nothing kept per record) and seed the base class's byte counters with them."""
        by_salt: dict[str, int] = {}
        for key, size in self._records_held():
            self._state.records += 1
            self._state.used += size
            by_salt[key.cache_salt] = by_salt.get(key.cache_salt, 0) + size
        self.recovered_keys = self._state.records
        if self._state.records:
            with self._usage_lock:
                self._total_bytes_used += self._state.used
                for salt, n in by_salt.items():
                    self._bytes_by_cache_salt[salt] = self._bytes_by_cache_salt.get(salt, 0) + n
            _log.info("blockstore L2: %d record(s), %d bytes recovered from %s", self._state.records, self._state.used,
                      self.config.path)

    def register_listener(self, listener: L2AdapterListener) -> None:
        """Attach a listener at any time: it hears exactly once of every record the adapter holds
        (`ListenerHub.register`: those held now are replayed to it, later changes reach it as they happen)."""
        self._hub.register(listener)

    def _notify(self, what: str, keys: list[ObjectKey], sizes: list[int] | None = None) -> None:
        """Usage counters and LMCache's event bus (the base class), then each listener (`ListenerHub.deliver`)."""
        with self._hub.task_end():
            try:
                if what == "stored":
                    self._notify_keys_stored(keys, sizes or [])
                elif what == "deleted":
                    self._notify_keys_deleted(keys, sizes or [])
                else:
                    self._notify_keys_accessed(keys)
            except Exception:  # a failure here must not fail the task that stored or loaded the data
                _log.exception("blockstore L2: usage accounting (%s) failed", what)
            self._hub.deliver(what, keys, sizes)

    def list_l2_keys(self, model_name: str | None = None, page_size: int = 500,
                     cursor: str | None = None) -> KeyListPage:
        """Keys held, in (namespace, key) order; `cursor` is the opaque next_page_token of the previous page."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        start_ns, after = decode_cursor(cursor)
        want = None if model_name is None else readable_model(model_name)
        entries: list[KeyEntry] = []
        last: tuple[str, bytes] | None = None
        for ns in lmcache_namespaces(self.store):
            if start_ns is not None and ns < start_ns:
                continue
            if want is not None and ns.split(":", 2)[2] != want:
                continue
            for kb, loc in self._scan(ns, after if ns == start_ns else None):
                try:
                    key = decode_object_key(kb)
                except ValueError:
                    continue
                if model_name is not None and key.model_name != model_name:
                    continue
                if len(entries) == page_size:
                    assert last is not None
                    return KeyListPage(entries=tuple(entries), next_page_token=encode_cursor(*last))
                entries.append(KeyEntry(key=key.to_encoded_object_key(), size_bytes=loc.payload_len))
                last = (ns, kb)
        return KeyListPage(entries=tuple(entries), next_page_token=None)

    def report_status(self) -> dict[str, Any]:
        """Embedded in the server's GET /status. Never raises (the caller does not catch)."""
        status: dict[str, Any] = {"is_healthy": False, "type": "BlockstoreL2Adapter", "path": self.config.path}
        try:
            with self._state.lock:
                closed = self._state.closed
                c = dict(self._state.counters.__dict__)
                status.update(
                    records=self._state.records,
                    hot_keys=len(self._stats),
                    ghost_keys=len(self._ghost),
                    used_bytes=self._state.used,
                    capacity_bytes=self._state.capacity,
                    locked_keys=sum(1 for e in self._state.locks.values() if e[0] > 0),
                    inflight_tasks=dict(self._inflight),
                    completed_unread={"store": len(self._done_store), "lookup": len(self._done_lookup),
                                      "load": len(self._done_load)},
                    last_error=self._state.last_error,
                    consecutive_task_failures=self._state.consecutive_failures,
                    recovered_keys=self.recovered_keys,
                )
                failures = self._state.consecutive_failures
            status["counters"] = c
            status["lookup_hit_ratio"] = c["lookup_hits"] / c["lookup_keys"] if c["lookup_keys"] else None
            status["load_hit_ratio"] = c["load_hits"] / c["load_keys"] if c["load_keys"] else None
            status["lookup_blocks_per_request"] = (c["lookup_blocks"] / c["lookup_requests_with_hits"]
                                                   if c["lookup_requests_with_hits"] else None)
            status["load_blocks_per_request"] = (c["load_blocks"] / c["load_requests_with_hits"]
                                                 if c["load_requests_with_hits"] else None)
            status["durability"] = self.config.durability
            if closed:
                status["error"] = "closed"
                return status
            status["store"] = self.store.stats().as_dict()
            compactor = self.store.compactor
            status["compaction"] = None if compactor is None else compactor.status()
            status["is_healthy"] = failures < 3
        except Exception as exc:
            status["is_healthy"] = False
            status["error"] = f"{type(exc).__name__}: {exc}"
        return status

    # ---- shutdown ----

    def close(self) -> None:
        """Finish every queued and running task (their L1 buffers are freed right after this returns),
        then close the store and the event fds. Idempotent."""
        with self._state.lock:
            if self._state.closed:
                return
            self._state.closed = True
        self._io_pool.shutdown(wait=True)
        self._store_pool.shutdown(wait=True)
        self._evict_pool.shutdown(wait=True)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        try:
            self.store.close()
        finally:
            for n in (self._store_efd, self._lookup_efd, self._load_efd):
                try:
                    n.close()
                except OSError:
                    pass


__all__ = [
    "EVICT_AHEAD",
    "LEAD_BLOCK",
    "RECORD_FRAMING",
    "BlockstoreL2Adapter",
    "BlockstoreL2AdapterConfig",
    "check_capacity_fits",
    "decode_object_key",
    "encode_object_key",
    "layout_fingerprint",
    "namespace_for",
]
