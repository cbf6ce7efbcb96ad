"""The in-process plugin's write path: which partition each record goes to, the duplicate check, one `put_many`
per namespace and partition.

A module of its own because placement is a policy with its own reasons (see `SEGMENT_PARTITIONS_PER_BATCH`
and `remote_plugin.py`'s module docstring) and because writes run on one thread in LMCache's order: the
look-up-then-write duplicate check here relies on that and on nothing else of the connector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj

from blockstore.connector.plugin_counters import CounterTotals, PluginCounters
from blockstore.connector.plugin_keys import by_namespace, segment_of
from blockstore.connector.plugin_layout import LayoutCodec

if TYPE_CHECKING:
    from blockstore.store import Store

# More distinct segments than this in one batched_put share one partition (see remote_plugin.py's docstring);
# chosen as half of the store's default max_open_blocks when that was 16 (now 64: an eighth), so other
# writers keep their open blocks.
SEGMENT_PARTITIONS_PER_BATCH = 8


def placements(keys: Sequence[CacheEngineKey]) -> dict[tuple[str, str | None], list[tuple[int, bytes]]]:
    """(namespace, partition) -> [(index, key bytes)] in batch order: a per-layer key goes to its segment's
    partition, or a batch of many segments to its first segment's; a plain chunk key to its namespace's stream."""
    placed: dict[tuple[str, str | None], list[tuple[int, bytes]]] = {}
    for ns, items in by_namespace(keys).items():
        segs = [segment_of(keys[i]) for i, _ in items]
        distinct = list(dict.fromkeys(s for s in segs if s is not None))
        shared = distinct[0] if len(distinct) > SEGMENT_PARTITIONS_PER_BATCH else None
        for (i, kb), seg in zip(items, segs):
            part = None if seg is None else (shared or seg)
            placed.setdefault((ns, part), []).append((i, kb))
    return placed


class PluginWriter:
    """Writes for the plugin named `name` into `store`, meta from `codec`, counted into `totals`. `write` must
    be called from one thread at a time (the connector's ordered writer)."""

    def __init__(self, name: str, store: Store, codec: LayoutCodec, totals: CounterTotals) -> None:
        self._name = name
        self._store = store
        self._codec = codec
        self._totals = totals

    def write(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        """Store each object not already stored with its layout; ValueError naming the objects refused."""
        if len(keys) != len(objs):
            raise ValueError(f"batched put of {len(keys)} keys and {len(objs)} objects")
        metas: dict[int, bytes] = {}
        rejected: list[str] = []
        for i, obj in enumerate(objs):
            try:
                metas[i] = self._codec.meta(obj)
            except Exception as exc:
                rejected.append(f"{keys[i]}: {exc}")
        c = PluginCounters(put_calls=1, put_rejected=len(rejected))
        try:
            for (ns, part), items in placements(keys).items():
                items = [(i, kb) for i, kb in items if i in metas]
                if not items:
                    continue
                locs = self._store.locate_many([kb for _, kb in items], ns=ns)
                todo: list[tuple[int, bytes]] = []
                seen: set[bytes] = set()
                for (i, kb), loc in zip(items, locs):
                    if kb in seen or (loc is not None and loc.meta == metas[i] and loc.payload_len == objs[i].get_size()):
                        c.duplicates_skipped += 1  # stored already with this layout (or twice in this batch)
                        continue
                    seen.add(kb)
                    todo.append((i, kb))
                if todo:
                    self._store.put_many([(kb, objs[i].byte_array) for i, kb in todo], ns=ns, partition=part,
                                         metas=[metas[i] for i, _ in todo])
                    c.keys_written += len(todo)
                    c.bytes_written += sum(objs[i].get_size() for i, _ in todo)
        finally:
            self._totals.add(c)
        if rejected:
            raise ValueError(f"blockstore plugin {self._name}: {len(rejected)} object(s) not stored: "
                             + "; ".join(rejected[:3]))
