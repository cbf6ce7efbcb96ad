"""The in-process plugin's read path: locate, allocate buffers of the stored layouts, read with one `get_many`
per namespace, then keep a buffer only if its record still has the layout the buffer was shaped for.

A module of its own because it owns LMCache's buffers while they are filled: every path that does not return a
buffer releases it (`ref_count_down`), and a record whose bytes fail their checksum is deleted here so that the
next put writes it again. The connector calls `read` on its read pool and shapes the result for LMCache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj

from blockstore.connector.plugin_counters import CounterTotals, PluginCounters
from blockstore.connector.plugin_keys import by_namespace
from blockstore.connector.plugin_layout import Layout, LayoutCodec
from blockstore.directory import Location

if TYPE_CHECKING:
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

    from blockstore.store import Store

_log = logging.getLogger("blockstore.connector.remote_plugin")


@dataclass(slots=True)
class _Want:
    i: int
    kb: bytes
    loc: Location
    layout: Layout
    obj: MemoryObj | None = None


class PluginReader:
    """Reads for the plugin named `name`: buffers from `local_cpu_backend` (never a stall: a miss under memory
    pressure), records from `store`, admitted by `codec`, counted into `totals`."""

    def __init__(self, name: str, store: Store, local_cpu_backend: LocalCPUBackend, codec: LayoutCodec,
                 totals: CounterTotals) -> None:
        self._name = name
        self._store = store
        self._backend = local_cpu_backend
        self._codec = codec
        self._totals = totals

    def read(self, keys: Sequence[CacheEngineKey], prefix_only: bool) -> list[MemoryObj | None]:
        """A buffer or None per key. With `prefix_only`, nothing after the first miss is allocated or returned."""
        result: list[MemoryObj | None] = [None] * len(keys)
        c = PluginCounters()
        held: list[MemoryObj] = []  # allocated and not yet in result: released if anything raises
        try:
            wants, limit = self._locate(keys, c)
            if not prefix_only:
                limit = len(keys)
            for ns, ws in wants.items():
                got: list[_Want] = []
                for w in ws:  # in key order
                    if w.i >= limit:
                        break
                    obj = self._backend.allocate(w.layout.shapes, w.layout.dtypes, w.layout.fmt, busy_loop=False)
                    if obj is not None and obj.get_size() != w.layout.size:
                        obj.ref_count_down()
                        obj = None
                    if obj is None:
                        c.miss_no_memory += 1
                        limit = min(limit, w.i) if prefix_only else limit
                        continue
                    held.append(obj)
                    w.obj = obj
                    got.append(w)
                if got:
                    self._read_namespace(ns, got, result, held, c)
        except BaseException:
            for obj in held:
                obj.ref_count_down()
            for r in result:
                if r is not None:
                    r.ref_count_down()
            raise
        if prefix_only and None in result:
            first = result.index(None)
            for r in result[first:]:
                if r is not None:
                    r.ref_count_down()
            result[first:] = [None] * (len(result) - first)
        c.get_keys = len(keys)
        c.hits = sum(r is not None for r in result)
        c.bytes_read = sum(r.get_size() for r in result if r is not None)
        self._totals.add(c)
        return result

    def _locate(self, keys: Sequence[CacheEngineKey], c: PluginCounters) -> tuple[dict[str, list[_Want]], int]:
        """The records this engine may load, per namespace in key order, and the index of the first that it
        may not (len(keys) when none); misses counted into `c`."""
        wants: dict[str, list[_Want]] = {}
        limit = len(keys)
        for ns, items in by_namespace(keys).items():
            for (i, kb), loc in zip(items, self._store.locate_many([kb for _, kb in items], ns=ns)):
                layout = None if loc is None else self._codec.parse(loc)
                if loc is None or layout is None:
                    if loc is None:
                        c.miss_absent += 1
                    else:
                        c.miss_layout += 1
                    limit = min(limit, i)
                    continue
                wants.setdefault(ns, []).append(_Want(i, kb, loc, layout))
        return wants, limit

    def _read_namespace(self, ns: str, got: list[_Want], result: list[MemoryObj | None], held: list[MemoryObj],
                        c: PluginCounters) -> None:
        """One get_many into the buffers of `got`; each buffer moves from `held` to `result` or is released."""
        try:
            sizes: list[Any] = self._store.get_many([w.kb for w in got], ns=ns,
                                                    out=[w.obj.byte_array for w in got])  # type: ignore[union-attr]
        except Exception as exc:
            _log.warning("blockstore plugin %s: read from %s failed: %s", self._name, ns, exc)
            sizes = [-1] * len(got)
        # A record replaced between our lookup and the read may have been read in its new layout: look
        # again and keep a buffer only if the record still has the layout the buffer was shaped for.
        try:
            again: list[Location | None] = self._store.locate_many([w.kb for w in got], ns=ns)
        except Exception:
            again = [None] * len(got)
        corrupt: list[bytes] = []
        for w, n, now in zip(got, sizes, again):
            obj = w.obj
            assert obj is not None
            held.remove(obj)
            if n == w.layout.size and now is not None and now.meta == w.loc.meta:
                if w.layout.positions is not None:
                    obj.metadata.cached_positions = w.layout.positions
                result[w.i] = obj
                continue
            obj.ref_count_down()
            if n is None and now is not None and now.same_place(w.loc):
                corrupt.append(w.kb)  # on_corrupt="miss": the bytes failed their checksum
                c.miss_corrupt += 1
            elif n is None or n == w.layout.size:
                c.miss_absent += 1  # deleted, moved or replaced meanwhile
            else:
                c.miss_error += 1
        if corrupt:
            self._delete_corrupt(ns, corrupt)

    def _delete_corrupt(self, ns: str, corrupt: list[bytes]) -> None:
        # deleted, so that LMCache's next store of these keys writes them again (a put skips keys
        # already stored with the same layout)
        _log.error("blockstore plugin %s: %d record(s) in %s failed their checksum; deleting them",
                   self._name, len(corrupt), ns)
        try:
            self._store.delete_many(corrupt, ns=ns)
        except Exception as exc:
            _log.warning("blockstore plugin %s: deleting corrupt records failed: %s", self._name, exc)
