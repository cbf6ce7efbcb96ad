"""The L2 adapter's store path: one `Store.put_many` per task and namespace. Keys already present with the same
layout are duplicates (skipped, not counted in the bytes reported); a key present with another layout is replaced
unless a lookup holds it locked; what admission and the capacity budget let through is written, counted, and
announced to the listeners, also when the write fails part-way.

A module of its own because a store is the one task that claims keys, asks eviction for room and advances
eviction's clock; `StoreWriter` sees the adapter only through what it is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult

from blockstore.connector.l2_capacity import CapacityEviction
from blockstore.connector.l2_keys import group_by_namespace, layout_fingerprint
from blockstore.connector.l2_listeners import ListenerHub
from blockstore.connector.l2_state import AdapterState, EvictionMemory, PendingPut
from blockstore.store import Store

if TYPE_CHECKING:
    from lmcache.v1.memory_management import MemoryObj

_log = logging.getLogger("blockstore.connector")

Notify = Callable[[str, list[ObjectKey], list[int]], None]


class StoreWriter:
    """Runs store tasks (`run`). `notify` is the adapter's announcement of stored and replaced keys (usage
    counters, LMCache's event bus, the listeners)."""

    def __init__(self, store: Store, state: AdapterState, memory: EvictionMemory, hub: ListenerHub,
                 eviction: CapacityEviction, notify: Notify) -> None:
        self.store = store
        self._state = state
        self._memory = memory
        self._hub = hub
        self._eviction = eviction
        self._notify = notify

    def run(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2StoreResult:
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
