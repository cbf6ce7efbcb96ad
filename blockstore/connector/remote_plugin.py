"""blockstore as an in-process LMCache remote storage plugin (LMCache 0.5.6 `remote_storage_plugins`),
for deployments that run LMCache inside vLLM's workers (the classic `LMCacheConnectorV1`, GPU builds),
where CacheBlend lives. On vLLM's CPU build use the MP-mode L2 adapter (`l2_adapter.py`) instead:
LMCache's in-process connector does not run on CPU.

Configuration (LMCache config YAML, or the same keys in `LMCACHE_*` environment variables)::

    chunk_size: 256
    local_cpu: true                 # the plugin's buffers come from LMCache's local CPU backend
    max_local_cpu_size: 5           # GB; must be > 0
    remote_storage_plugins: ["blockstore"]
    extra_config:
      remote_storage_plugin.blockstore.module_path: blockstore.connector.remote_plugin
      remote_storage_plugin.blockstore.class_name: BlockstoreConnectorAdapter
      remote_storage_plugin.blockstore.path: /data/kv/rank{worker_id}   # required
      remote_storage_plugin.blockstore.durability: cache      # or "sync" (optional)
      remote_storage_plugin.blockstore.block_size: 67108864   # bytes, new stores only (optional)
      remote_storage_plugin.blockstore.compaction: full       # policy name, {"policy": ...}, or none (optional)

A plugin name is `blockstore` or `blockstore.<instance>` (LMCache matches adapters on the part before
the first dot); each instance reads its own `remote_storage_plugin.<name>.*` keys. `path` may contain
`{worker_id}` and `{world_size}`: a store has one writer process, and every vLLM worker (tensor-parallel
rank) runs its own LMCache engine, so ranks need a store each. Set `PYTHONHASHSEED` (or
`pre_caching_hash_algorithm: sha256_cbor`): LMCache's default chunk hash is Python's `hash()`, and
without a fixed seed the keys change with every restart. A configuration error raises `BlockstorePluginConfigError` (a `ValueError` naming the
key); LMCache logs it and runs without the plugin ("Failed to create remote backend for plugin ...").

What the connector promises (LMCache's `RemoteConnector` contract as `RemoteBackend` drives it from
its event loop):

- Keys: `key.to_string()` (stable for a given hash seed; `LayerCacheEngineKey`s carry their layer),
  stored in the namespace of the key's (model_name, tags) pair (`namespace_for`), so tenants that
  LMCache tells apart by `lmcache.tag.*` request configs never share a record.
- Record meta: the object's layout (memory format, shapes, dtypes, byte length), the engine's KV
  geometry (per-group shapes without the token dimension, dtypes) and, when LMCache set them, the
  token positions the KV was computed at (CacheBlend's RoPE recovery reads them). A `get` allocates a
  buffer of exactly the stored layout, so partial chunks (`save_unfull_chunk`) and per-layer objects
  (`use_layerwise`, CacheBlend's `KV_2TD` segments) come back with their real shape. A record whose
  meta does not parse, names another geometry or dtype, or whose length disagrees with its layout is a
  miss, never KV of the wrong layout; so is a record whose bytes fail their checksum (the store is
  opened with on_corrupt="miss"), which is also deleted so that the next put writes it again.
- `batched_put`: one `put_many` per namespace and placement. Records of a `LayerCacheEngineKey`
  go to their segment's partition (the key without its layer), so all layers of a chunk or CacheBlend
  segment sit next to each other in one block, whether LMCache sends them segment by segment or, as
  its layer-wise store does, one layer of every segment per call. A batch naming more than
  `SEGMENT_PARTITIONS_PER_BATCH` segments goes to one partition (its first segment's), so a long
  request does not open a block per segment. Plain chunk keys go to their namespace's stream: one
  request's new chunks land next to each other. Keys already stored with the same layout are skipped.
- `batched_get`: one `get_many` per namespace straight into the buffers LMCache's allocator handed
  out; a list with a `MemoryObj` or `None` per key. `batched_get_non_blocking` and
  `batched_async_contains` have prefix semantics (the leading run of hits); `batched_contains` is the
  synchronous prefix count; `exists`/`exists_sync` and the contains calls apply the same layout check
  as `get`, so a record that `get` would refuse is not reported as present.
- Every blocking store call runs on the connector's own threads, never on LMCache's event loop:
  reads on a small pool, writes on one thread in the order LMCache issued them (its layer-wise store
  sends a batch per layer without waiting for the previous one). Buffers come from
  `local_cpu_backend.allocate(..., busy_loop=False)`: under memory pressure a get is a miss rather
  than a stall. A buffer is released (`ref_count_down`) on every path that does not
  return it. `put`/`batched_put` do not drop the caller's references (LMCache's wrapper does).
- `close()` waits for the calls under way, then closes the store. Idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

import blockstore
from blockstore.connector.plugin_calls import CallPools
from blockstore.connector.plugin_config import BlockstorePluginConfig, BlockstorePluginConfigError
from blockstore.connector.plugin_counters import CounterTotals, PluginCounters
from blockstore.connector.plugin_keys import (
    NS_PREFIX,
    by_namespace,
    encode_key,
    key_namespace,
    namespace_for,
    segment_of,
)
from blockstore.connector.plugin_layout import META_VERSION, Layout, LayoutCodec
from blockstore.connector.plugin_reads import PluginReader
from blockstore.connector.plugin_writes import SEGMENT_PARTITIONS_PER_BATCH, PluginWriter
from blockstore.directory import Location

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

_log = logging.getLogger("blockstore.connector.remote_plugin")

PLUGIN_TYPE = "blockstore"

# The plugin's parts, one job each: its settings (plugin_config.py), its key format (plugin_keys.py), its
# record meta (plugin_layout.py), its totals (plugin_counters.py), its threads (plugin_calls.py), its read
# and write paths (plugin_reads.py, plugin_writes.py). This module is LMCache's interface over them; the
# names LMCache's config and callers import from here stay importable from here.


class BlockstoreConnector(RemoteConnector):
    """A `RemoteConnector` over one blockstore store (see the module docstring for the contract)."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, local_cpu_backend: LocalCPUBackend,
                 config: LMCacheEngineConfig, metadata: LMCacheMetadata, plugin_name: str,
                 settings: BlockstorePluginConfig) -> None:
        super().__init__(config, metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.plugin_name = plugin_name
        self.settings = settings
        self.layouts = LayoutCodec(self.meta_shapes, self.meta_dtypes)
        self.counters = CounterTotals()
        self.store = blockstore.open(settings.path, durability=settings.durability, block_size=settings.block_size,
                                     on_corrupt="miss", compaction=settings.compaction)
        self._calls = CallPools(plugin_name)
        self._reader = PluginReader(plugin_name, self.store, local_cpu_backend, self.layouts, self.counters)
        self._writer = PluginWriter(plugin_name, self.store, self.layouts, self.counters)
        _log.info("blockstore plugin %s: store %s (durability %s)", plugin_name, settings.path, settings.durability)

    def __repr__(self) -> str:
        return f"<BlockstoreConnector {self.plugin_name} {self.settings.path}>"

    # ---- layout ----

    def layout_meta(self, obj: MemoryObj) -> bytes:
        """The record meta of `obj` (canonical JSON). ValueError for objects this connector cannot keep."""
        return self.layouts.meta(obj)

    def parse_layout(self, loc: Location) -> Layout | None:
        """The layout a record's meta names, if this engine may load it (else None: a miss)."""
        return self.layouts.parse(loc)

    # ---- presence ----

    def _present(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Whether each key has a record this engine would load (layout checked, bytes not read)."""
        out = [False] * len(keys)
        for ns, items in by_namespace(keys).items():
            for (i, _kb), loc in zip(items, self.store.locate_many([kb for _, kb in items], ns=ns)):
                out[i] = loc is not None and self.layouts.parse(loc) is not None
        return out

    @staticmethod
    def _prefix(flags: Sequence[bool]) -> int:
        for n, f in enumerate(flags):
            if not f:
                return n
        return len(flags)

    async def exists(self, key: CacheEngineKey) -> bool:
        return (await self._calls.run(self._present, [key]))[0]

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return not self._calls.closed and self._present([key])[0]

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        if self._calls.closed or not keys:
            return 0
        return self._prefix(self._present(keys))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        if not keys:
            return 0
        return self._prefix(await self._calls.run(self._present, list(keys)))

    # ---- reads (plugin_reads.py) ----

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        try:
            return (await self._calls.run(self._reader.read, [key], False))[0]
        except Exception as exc:
            _log.warning("blockstore plugin %s: get %s failed: %s", self.plugin_name, key, exc)
            return None

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        if not keys:
            return []
        try:
            return await self._calls.run(self._reader.read, list(keys), False)
        except Exception as exc:
            _log.warning("blockstore plugin %s: batched get of %d keys failed: %s", self.plugin_name, len(keys), exc)
            return [None] * len(keys)

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        if not keys:
            return []
        try:
            got = await self._calls.run(self._reader.read, list(keys), True)
        except Exception as exc:
            _log.warning("blockstore plugin %s: batched get of %d keys failed: %s", self.plugin_name, len(keys), exc)
            return []
        out: list[MemoryObj] = []
        for obj in got:
            if obj is None:
                break
            out.append(obj)
        return out

    # ---- writes (plugin_writes.py) ----

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self._calls.run(self._writer.write, [key], [memory_obj], write=True)

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        if keys:
            await self._calls.run(self._writer.write, list(keys), list(memory_objs), write=True)

    # ---- the rest ----

    def remove_sync(self, key: CacheEngineKey) -> bool:
        if self._calls.closed:
            return False
        existed = self.store.delete_many([encode_key(key)], ns=key_namespace(key))[0]
        if existed:
            self.counters.add(PluginCounters(removed=1))
        return existed

    def _list(self) -> list[str]:
        out: list[str] = []
        for ns in sorted(self.store.namespaces()):
            if ns.startswith(NS_PREFIX):
                out += [kb.decode("utf-8", "surrogatepass") for kb in self.store.iter_keys(ns=ns)]
        return out

    async def list(self) -> list[str]:
        return await self._calls.run(self._list)

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when the store answers a directory lookup, 1 otherwise (closed or failing)."""
        try:
            await self._calls.run(self.store.namespaces)
            return 0
        except Exception:
            return 1

    def stats(self) -> dict[str, Any]:
        return dict(self.counters.snapshot())

    def _close(self) -> None:
        self._calls.drain()
        self.store.close()

    async def close(self) -> None:
        """Wait for the calls under way, then close the store. Idempotent."""
        if not self._calls.close():
            return
        await asyncio.to_thread(self._close)
        _log.info("blockstore plugin %s: closed %s", self.plugin_name, self.settings.path)


# ----------------------------------------------------------------------------------------- adapter

class BlockstoreConnectorAdapter(ConnectorAdapter):
    """Claims `plugin://blockstore` and `plugin://blockstore.<instance>` (LMCache instantiates it with
    no arguments and asks `can_parse` with the plugin's URL)."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        if not url.startswith("plugin://"):
            return False
        return extract_plugin_type(url[len("plugin://"):]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        name = context.plugin_name or context.url[len("plugin://"):]
        if context.config is None or context.metadata is None:
            raise BlockstorePluginConfigError("the blockstore plugin needs LMCache's config and metadata")
        md = context.metadata
        settings = BlockstorePluginConfig.from_extra_config(context.config.extra_config, name,
                                                            worker_id=md.worker_id, world_size=md.world_size)
        return BlockstoreConnector(loop=context.loop, local_cpu_backend=context.local_cpu_backend,
                                   config=context.config, metadata=md, plugin_name=name, settings=settings)


__all__ = [
    "META_VERSION",
    "NS_PREFIX",
    "PLUGIN_TYPE",
    "SEGMENT_PARTITIONS_PER_BATCH",
    "BlockstoreConnector",
    "BlockstoreConnectorAdapter",
    "BlockstorePluginConfig",
    "BlockstorePluginConfigError",
    "Layout",
    "encode_key",
    "key_namespace",
    "namespace_for",
    "segment_of",
]
