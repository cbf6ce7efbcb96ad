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
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import KeyEntry, KeyListPage, ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.platform import create_event_notifier

import blockstore
from blockstore import metrics
from blockstore.connector.eviction import (
    usable_hits,
)
from blockstore.connector.l2_capacity import EVICT_AHEAD, LEAD_BLOCK, CapacityEviction
from blockstore.connector.l2_config import (
    RECORD_FRAMING,
    BlockstoreL2AdapterConfig,
    check_capacity_fits,
)
from blockstore.connector.l2_keys import (
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
from blockstore.connector.l2_state import AdapterState, EvictionMemory, PendingPut
from blockstore.directory import Location

if TYPE_CHECKING:
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    from lmcache.v1.distributed.internal_api import L1MemoryDesc, L2AdapterListener
    from lmcache.v1.memory_management import MemoryObj

_log = logging.getLogger("blockstore.connector")

# -------------------------------------------------------------------------------------------- config

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
        self._next_task_id: L2TaskId = 0
        self._done_store: dict[L2TaskId, L2StoreResult] = {}
        self._done_lookup: dict[L2TaskId, Bitmap] = {}
        self._done_load: dict[L2TaskId, Bitmap] = {}
        self._inflight = {"store": 0, "lookup": 0, "load": 0}
        # eviction's memory of reads and evictions (its clock advances with every byte stored)
        self._memory = EvictionMemory(config.capacity_bytes)
        self.recovered_keys = 0

        self.store = blockstore.open(config.path, durability=config.durability, block_size=config.block_size,
                                     on_corrupt="miss", compaction=config.compaction)
        self._hub = ListenerHub(self.store, self._state)
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
            self._io_pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="blockstore-l2-io")
            undo.append(self._io_pool.shutdown)
            self._store_pool = ThreadPoolExecutor(max_workers=config.workers,
                                                  thread_name_prefix="blockstore-l2-store")
            undo.append(self._store_pool.shutdown)
            # eviction ahead of need: one pass at a time, off the stores' path (CapacityEviction.make_room)
            evict_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockstore-l2-evict")
            undo.append(evict_pool.shutdown)
            self._eviction = CapacityEviction(self.store, self._state, self._memory, self._hub, self._delete_marked,
                                              self._end_delete, config.admission == "always", evict_pool)
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
                puts = self._eviction.admit(puts)
            if self._state.capacity > 0 and puts:
                puts, reserved = self._eviction.make_room(puts)
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
                    self._memory.clock += sum(p.size for p in written)
                    if written and self._state.capacity:
                        self._memory.history.record(time.time_ns(), self._memory.clock)
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
                    self._memory.stats.forget(k)
                for k, _size in gone:
                    self._memory.stats.forget(k)
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
                    hot_keys=len(self._memory.stats),
                    ghost_keys=len(self._memory.ghost),
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
