"""The L2 adapter's deletions: LMCache's (`delete`: locked and in-flight keys are skipped, never raises) and the
steps every removal goes through, eviction's and a corrupt record's included: delete keys claimed in
`AdapterState.deleting` (`delete_marked`), then release them, count them and announce those that went, with the
sizes they were stored with (`end_delete`).

A module of its own because the adapter, its load path and its eviction all remove records, and the
accounting of a removal (bytes, records, read statistics, listeners) must be one and the same for all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lmcache.v1.distributed.api import ObjectKey

from blockstore.connector.l2_keys import group_by_namespace
from blockstore.connector.l2_listeners import ListenerHub
from blockstore.connector.l2_state import AdapterState, EvictionMemory
from blockstore.directory import Location
from blockstore.store import Store

_log = logging.getLogger("blockstore.connector")

Notify = Callable[[str, list[ObjectKey], list[int]], None]


class Deleter:
    """Deletes records of the lmcache namespaces. `notify` is the adapter's announcement of deleted keys."""

    def __init__(self, store: Store, state: AdapterState, memory: EvictionMemory, hub: ListenerHub,
                 notify: Notify) -> None:
        self.store = store
        self._state = state
        self._memory = memory
        self._hub = hub
        self._notify = notify

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
            self.delete_marked(marked)
        except Exception:
            _log.exception("blockstore L2: delete failed")

    def delete_marked(self, marked: list[ObjectKey]) -> tuple[list[ObjectKey], int]:
        """Delete keys the caller put in `AdapterState.deleting`; report those that existed, with the sizes they were
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
            self.end_delete(marked, gone)
        return [k for k, _ in gone], sum(s for _, s in gone)

    def end_delete(self, marked: list[ObjectKey], gone: list[tuple[ObjectKey, int]]) -> None:
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

    def drop_unreadable(self, ns: str, suspects: list[tuple[int, bytes, Location]],
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
                marked = [k for k in dict.fromkeys(bad)
                          if k not in self._state.deleting and k not in self._state.storing]
                self._state.deleting.update(marked)
            self.delete_marked(marked)
        return len(bad), len(suspects) - len(bad)
