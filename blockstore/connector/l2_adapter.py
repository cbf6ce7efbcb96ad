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

This module is LMCache's interface and the wiring; each part is a module of its own, given only the objects it
needs (never the adapter): `l2_keys` (key, namespace, layout and cursor codecs), `l2_config`, `l2_state` (what
the parts share), `l2_tasks` (task ids, results, fds), `l2_writes` (store), `l2_deletes` (every removal),
`l2_listing`, `l2_listeners` (replay and delivery), `l2_capacity`, `l2_evict_walk` and `l2_tombstones`
(eviction). Every public name of the adapter is importable from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import KeyListPage, ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.platform import create_event_notifier

import blockstore
from blockstore import metrics
from blockstore.connector.eviction import usable_hits
from blockstore.connector.l2_capacity import DISK_CHECK_FRACTION, EVICT_AHEAD, LEAD_BLOCK, CapacityEviction
from blockstore.connector.l2_config import RECORD_FRAMING, BlockstoreL2AdapterConfig, check_capacity_fits
from blockstore.connector.l2_deletes import Deleter
from blockstore.connector.l2_evict_walk import BUDGET_K, EVICT_OPEN_RECORDS, MOVE_BATCH
from blockstore.connector.l2_keys import (
    KEY_VERSION,
    NS_PREFIX,
    decode_object_key,
    encode_object_key,
    group_by_namespace,
    layout_fingerprint,
    namespace_for,
)
from blockstore.connector.l2_listeners import REPLAY_BATCH, ListenerHub
from blockstore.connector.l2_listing import list_keys, records_held
from blockstore.connector.l2_state import CLOCK_STEPS, AdapterState, EvictionMemory
from blockstore.connector.l2_tasks import TaskBoard
from blockstore.connector.l2_tombstones import TOMBSTONE_STREAM
from blockstore.connector.l2_writes import StoreWriter
from blockstore.directory import Location

if TYPE_CHECKING:
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    from lmcache.v1.distributed.internal_api import L1MemoryDesc, L2AdapterListener
    from lmcache.v1.memory_management import MemoryObj

_log = logging.getLogger("blockstore.connector")

# ------------------------------------------------------------------------------------------- adapter



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
        # eviction's memory of reads and evictions (its clock advances with every byte stored)
        self._memory = EvictionMemory(config.capacity_bytes)
        self.recovered_keys = 0

        self.store = blockstore.open(config.path, durability=config.durability, block_size=config.block_size,
                                     on_corrupt="miss", compaction=config.compaction)
        self._hub = ListenerHub(self.store, self._state)
        self._deletes = Deleter(self.store, self._state, self._memory, self._hub, self._notify)
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
            self._seed_counters()
            self._store_efd = create_event_notifier()
            undo.append(self._store_efd.close)
            self._lookup_efd = create_event_notifier()
            undo.append(self._lookup_efd.close)
            self._load_efd = create_event_notifier()
            undo.append(self._load_efd.close)
            self._tasks = TaskBoard(self._state, {"store": self._store_efd, "lookup": self._lookup_efd,
                                                  "load": self._load_efd})
            self._io_pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="blockstore-l2-io")
            undo.append(self._io_pool.shutdown)
            self._store_pool = ThreadPoolExecutor(max_workers=config.workers,
                                                  thread_name_prefix="blockstore-l2-store")
            undo.append(self._store_pool.shutdown)
            # eviction ahead of need: one pass at a time, off the stores' path (CapacityEviction.make_room)
            evict_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockstore-l2-evict")
            undo.append(evict_pool.shutdown)
            self._eviction = CapacityEviction(self.store, self._state, self._memory, self._hub,
                                              self._deletes.delete_marked, self._deletes.end_delete,
                                              config.admission == "always", evict_pool)
            self._writer = StoreWriter(self.store, self._state, self._memory, self._hub, self._eviction, self._notify)
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
        return self._tasks.submit("store", self._store_pool, self._run_store, keys, objects)

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        return self._tasks.pop_all("store")

    def submit_lookup_and_lock_task(self, keys: list[ObjectKey],
                                    group_layout_descs: dict[int, MemoryLayoutDesc]) -> L2TaskId:
        # group_layout_descs is advisory; the layout is checked against each record at load time
        return self._tasks.submit("lookup", self._io_pool, self._run_lookup, keys)

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        result: Bitmap | None = self._tasks.pop("lookup", task_id)
        return result

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
        return self._tasks.submit("load", self._io_pool, self._run_load, keys, objects)

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        result: Bitmap | None = self._tasks.pop("load", task_id)
        return result

    # ---- store ----

    def _run_store(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2StoreResult:
        return self._writer.run(keys, objects)

    def wait_for_eviction(self) -> None:
        """Return once no eviction pass is queued or running (tests and benches that need a settled state)."""
        self._eviction.wait()

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
                self._memory.stats.read(k, self._memory.clock, usable[i])  # eviction's reuse, recency and relevance
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
                bad_records, other = self._deletes.drop_unreadable(ns, suspects, keys)
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

    # ---- delete ----

    def delete(self, keys: list[ObjectKey]) -> None:
        """Remove keys (LMCache's eviction, HTTP DELETE): `Deleter.delete`. Never raises."""
        self._deletes.delete(keys)

    # ---- listing, status, listeners ----

    def _seed_counters(self) -> None:
        """After a restart: count the records already in the store (one streaming pass over the directory,
        nothing kept per record) and seed the base class's byte counters with them."""
        by_salt: dict[str, int] = {}
        for key, size in records_held(self.store):
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
        return list_keys(self.store, model_name, page_size, cursor)

    def report_status(self) -> dict[str, Any]:
        """Embedded in the server's GET /status. Never raises (the caller does not catch)."""
        status: dict[str, Any] = {"is_healthy": False, "type": "BlockstoreL2Adapter", "path": self.config.path}
        try:
            with self._state.lock:
                closed = self._state.closed
                c = dict(self._state.counters.__dict__)
                status.update(
                    records=self._state.records,
                    hot_keys=len(self._memory.stats),
                    ghost_keys=len(self._memory.ghost),
                    used_bytes=self._state.used,
                    capacity_bytes=self._state.capacity,
                    locked_keys=sum(1 for e in self._state.locks.values() if e[0] > 0),
                    inflight_tasks=dict(self._tasks.inflight),
                    completed_unread=self._tasks.unread(),
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
        self._eviction.close()
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


# The public names this module had before its parts moved out, still importable from here (LMCache, tests,
# benches and users import them by this path). The constants are copies: patch a constant in each module that
# reads it, not here (EVICT_AHEAD: l2_evict_walk and l2_capacity; NS_PREFIX: l2_keys and l2_evict_walk;
# RECORD_FRAMING: l2_capacity only, not l2_config where it is defined; the others only where they are defined).
__all__ = [
    "BUDGET_K", "CLOCK_STEPS", "DISK_CHECK_FRACTION", "EVICT_AHEAD", "EVICT_OPEN_RECORDS", "KEY_VERSION", "LEAD_BLOCK",
    "MOVE_BATCH", "NS_PREFIX", "RECORD_FRAMING", "REPLAY_BATCH", "TOMBSTONE_STREAM",
    "BlockstoreL2Adapter", "BlockstoreL2AdapterConfig", "check_capacity_fits", "decode_object_key",
    "encode_object_key", "layout_fingerprint", "namespace_for",
]
