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
import functools
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from lmcache.utils import CacheEngineKey, LayerCacheEngineKey
from lmcache.v1.exceptions import IrrecoverableException
from lmcache.v1.memory_management import MemoryFormat, MemoryObj
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

import blockstore
from blockstore.compaction import disabled, resolve
from blockstore.directory import Location
from blockstore.manifest import valid_block_size
from blockstore.records import MAX_KEY

if TYPE_CHECKING:
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

_log = logging.getLogger("blockstore.connector.remote_plugin")

PLUGIN_TYPE = "blockstore"
NS_PREFIX = "lmcache-inproc:"
META_VERSION = 1
# More distinct segments than this in one batched_put share one partition (see the module docstring);
# half of the store's default max_open_blocks (16), so other writers keep their open blocks.
SEGMENT_PARTITIONS_PER_BATCH = 8
_WORKERS = 4
_KV_FORMATS = frozenset({MemoryFormat.KV_2LTD, MemoryFormat.KV_T2D, MemoryFormat.KV_2TD, MemoryFormat.KV_MLA_FMT})
_T = TypeVar("_T")

# ------------------------------------------------------------------------------------------- config


class BlockstorePluginConfigError(ValueError, IrrecoverableException):
    """A bad `remote_storage_plugin.<name>.*` setting. Irrecoverable for LMCache: its RemoteBackend
    gives up at once instead of retrying the same configuration every 10 s."""


@dataclass(frozen=True)
class BlockstorePluginConfig:
    """The plugin's settings, read from LMCache's `extra_config` (see the module docstring)."""

    path: str
    durability: str = "cache"
    block_size: int | None = None
    compaction: str | dict[str, Any] | None = "full"

    KEYS = ("module_path", "class_name", "path", "durability", "block_size", "compaction")

    @classmethod
    def from_extra_config(cls, extra_config: dict[str, Any] | None, plugin_name: str, *, worker_id: int = 0,
                          world_size: int = 1) -> BlockstorePluginConfig:
        prefix = f"remote_storage_plugin.{plugin_name}."
        ec = dict(extra_config or {})
        mine = {k[len(prefix):]: v for k, v in ec.items() if isinstance(k, str) and k.startswith(prefix)}
        # keys of another instance ("blockstore.b" when this is "blockstore") have a dot left in them
        unknown = sorted(k for k in mine if "." not in k and k not in cls.KEYS)
        if unknown:
            raise BlockstorePluginConfigError(
                f"extra_config: unknown key(s) {[prefix + k for k in unknown]}; known: "
                f"{[prefix + k for k in cls.KEYS]}")

        def bad(key: str, why: str) -> BlockstorePluginConfigError:
            return BlockstorePluginConfigError(f"extra_config '{prefix}{key}' {why}")

        path = mine.get("path")
        if not isinstance(path, str) or not path.strip():
            raise bad("path", f"(the store directory) is required, a non-empty string; got {path!r}")
        if "{" in path:
            try:
                path = path.format(worker_id=worker_id, world_size=world_size)
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # "{worker_id[0]}", ...
                raise bad("path", f"may contain only the placeholders {{worker_id}} and {{world_size}}: "
                                  f"{type(exc).__name__}: {exc}") from None
        durability = mine.get("durability", "cache")
        if durability not in ("cache", "sync"):
            raise bad("durability", f"must be 'cache' or 'sync', got {durability!r}")
        block_size = mine.get("block_size")
        if isinstance(block_size, str) and block_size.strip().isdigit():  # LMCACHE_EXTRA_CONFIG JSON may quote it
            try:
                block_size = int(block_size)
            except ValueError:  # digits int() refuses ("²", 5000 of them): stays a str, refused below
                pass
        if block_size is not None and not valid_block_size(block_size):
            raise bad("block_size", f"must be an integer number of bytes in 65536..2**40, got {block_size!r}")
        compaction = mine.get("compaction", "full")
        if isinstance(compaction, str) and compaction.strip().startswith("{"):
            try:
                compaction = json.loads(compaction)
            except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than json can parse
                raise bad("compaction", f"is not valid JSON: {exc}") from None
        if disabled(compaction):
            compaction = None
        if compaction is not None:
            spec = {k: v for k, v in compaction.items() if k != "background"} if isinstance(compaction, dict) \
                else compaction
            try:
                resolve(spec)
            except (ValueError, TypeError) as exc:  # InvalidArgument is a ValueError
                raise bad("compaction", f"is not a valid compaction setting: {exc}") from None
        return cls(path=path, durability=durability, block_size=block_size, compaction=compaction)


# --------------------------------------------------------------------------------------------- keys

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


@functools.lru_cache(maxsize=4096)
def namespace_for(model_name: str, tags: tuple[tuple[str, str], ...] = ()) -> str:
    """The store namespace of one (model_name, tags) pair: `lmcache-inproc:<hash>:<model>`; the hash
    (BLAKE2b-80 over both, length-prefixed) tells pairs apart, the sanitized model name (at most 96
    characters) only helps a person reading `blockstore stats`."""
    h = hashlib.blake2b(digest_size=10)
    parts = [model_name] + [p for kv in tags for p in kv]
    h.update(len(parts).to_bytes(4, "big"))
    for part in parts:
        b = part.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return f"{NS_PREFIX}{h.hexdigest()}:{_UNSAFE.sub('_', model_name)[:96] or '_'}"


def key_namespace(key: CacheEngineKey) -> str:
    tags = tuple((str(k), str(v)) for k, v in (key.tags or ()))
    return namespace_for(key.model_name, tags)


def encode_key(key: CacheEngineKey) -> bytes:
    """LMCache's own string form of the key (`model@world@worker@hash@dtype[@layer][@tag%value...]`)."""
    raw = key.to_string().encode("utf-8", "surrogatepass")
    if len(raw) > MAX_KEY:
        raise ValueError(f"key {raw[:64]!r}... is {len(raw)} bytes, more than the store's {MAX_KEY}-byte limit")
    return raw


def segment_of(key: CacheEngineKey) -> str | None:
    """For a per-layer key, the identity of its chunk or segment (the key without its layer); else None."""
    if not isinstance(key, LayerCacheEngineKey):
        return None
    # LMCache spells a key's dtype only in its private _dtype_str (what its own to_string() writes)
    return f"seg/{key.world_size}/{key.worker_id}/{key.chunk_hash_hex}/{key._dtype_str}"  # noqa: SLF001


# ------------------------------------------------------------------------------------------- layout

def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _parse_dtype(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@dataclass(frozen=True)
class Layout:
    """What a record's meta says about its payload."""

    fmt: MemoryFormat
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    size: int
    positions: torch.Tensor | None = field(default=None, compare=False)


def _encode_positions(pos: Any) -> dict[str, Any]:
    if not isinstance(pos, torch.Tensor) or pos.dim() != 1:
        return {}
    n = int(pos.numel())
    if n == 0:
        return {"pos": [0, 0]}
    p = pos.detach().to("cpu", torch.int64)
    start = int(p[0])
    if torch.equal(p, torch.arange(start, start + n, dtype=torch.int64)):
        return {"pos": [start, start + n]}  # what LMCache's layer-wise connectors record: one range
    return {"pos_list": [int(x) for x in p.tolist()]}


def _decode_positions(doc: dict[str, Any]) -> torch.Tensor | None:
    if "pos" in doc:
        a, b = doc["pos"]
        if not (isinstance(a, int) and isinstance(b, int) and a <= b):
            raise ValueError("bad positions")
        return torch.arange(a, b, dtype=torch.int64)
    if "pos_list" in doc:
        if not all(isinstance(x, int) for x in doc["pos_list"]):
            raise ValueError("bad positions")
        return torch.tensor(doc["pos_list"], dtype=torch.int64)
    return None


# --------------------------------------------------------------------------------------- connector

@dataclass
class _PluginCounters:
    put_calls: int = 0
    keys_written: int = 0
    bytes_written: int = 0
    duplicates_skipped: int = 0
    put_rejected: int = 0
    get_keys: int = 0
    hits: int = 0
    bytes_read: int = 0
    miss_absent: int = 0
    miss_layout: int = 0
    miss_corrupt: int = 0
    miss_no_memory: int = 0
    miss_error: int = 0
    removed: int = 0


@dataclass(slots=True)
class _Want:
    i: int
    kb: bytes
    loc: Location
    layout: Layout
    obj: MemoryObj | None = None


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
        # the engine's KV geometry: per group, the full-chunk shape without its token dimension (2 for
        # KV_2LTD and MLA), and the dtypes; a record written under another geometry is never loaded
        self._geometry = [[int(d) for i, d in enumerate(s) if i != 2] for s in self.meta_shapes]
        self._geometry_dtypes = [_dtype_name(d) for d in self.meta_dtypes]
        self._lock = threading.Lock()
        self._closed = False
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self.counters = _PluginCounters()
        self.store = blockstore.open(settings.path, durability=settings.durability, block_size=settings.block_size,
                                     on_corrupt="miss", compaction=settings.compaction)
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=f"blockstore-{plugin_name}")
        # Writes run one at a time, in the order LMCache issued them (its layer-wise store sends one
        # batch per layer without waiting; parallel writers would put layer 2 before layer 1). That also
        # keeps a batch's look-up-then-write duplicate check free of races with another batch.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"blockstore-{plugin_name}-w")
        _log.info("blockstore plugin %s: store %s (durability %s)", plugin_name, settings.path, settings.durability)

    def __repr__(self) -> str:
        return f"<BlockstoreConnector {self.plugin_name} {self.settings.path}>"

    # ---- layout ----

    def layout_meta(self, obj: MemoryObj) -> bytes:
        """The record meta of `obj` (canonical JSON). ValueError for objects this connector cannot keep."""
        fmt = obj.get_memory_format()
        if fmt not in _KV_FORMATS:
            raise ValueError(f"memory format {fmt} is not a KV layout (only the 'naive' remote_serde is supported)")
        shapes = [[int(d) for d in s] for s in obj.get_shapes()]
        dtypes = list(obj.get_dtypes())
        size = int(obj.get_size())
        expect = sum(torch.Size(s).numel() * dt.itemsize for s, dt in zip(shapes, dtypes))
        if expect != size:
            raise ValueError(f"object of {size} bytes does not match its layout {shapes} {dtypes} ({expect} bytes)")
        doc: dict[str, Any] = {"v": META_VERSION, "fmt": fmt.name, "shapes": shapes,
                               "dtypes": [_dtype_name(d) for d in dtypes], "size": size,
                               "kv": self._geometry, "kv_dtypes": self._geometry_dtypes}
        doc.update(_encode_positions(getattr(obj.metadata, "cached_positions", None)))
        raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(raw) > 60000:  # the store's meta limit is 64 KiB
            raise ValueError(f"record meta of {len(raw)} bytes is too large (token positions of a huge segment?)")
        return raw

    def parse_layout(self, loc: Location) -> Layout | None:
        """The layout a record's meta names, if this engine may load it (else None: a miss)."""
        try:
            doc = json.loads(loc.meta)
            if not isinstance(doc, dict) or doc.get("v") != META_VERSION:
                return None
            if doc.get("kv") != self._geometry or doc.get("kv_dtypes") != self._geometry_dtypes:
                return None
            fmt = MemoryFormat[doc["fmt"]]
            if fmt not in _KV_FORMATS:
                return None
            shapes = [torch.Size([int(d) for d in s]) for s in doc["shapes"]]
            dtypes = [_parse_dtype(d) for d in doc["dtypes"]]
            size = doc["size"]
            if not shapes or len(shapes) != len(dtypes) or any(d < 0 for s in shapes for d in s):
                return None
            if any(_dtype_name(d) not in self._geometry_dtypes for d in dtypes):
                return None
            if size != sum(s.numel() * d.itemsize for s, d in zip(shapes, dtypes)) or size != loc.payload_len:
                return None
            return Layout(fmt, shapes, dtypes, size, _decode_positions(doc))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    # ---- plumbing ----

    async def _run(self, fn: Callable[..., _T], *args: Any, pool: ThreadPoolExecutor | None = None) -> _T:
        """Run a blocking store call on one of the connector's pools (reads by default); counted so that
        close() can wait for it."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"blockstore plugin {self.plugin_name} is closed")
            self._inflight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(pool or self._pool, fn, *args)
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()

    @staticmethod
    def _group(keys: Sequence[CacheEngineKey]) -> dict[str, list[tuple[int, bytes]]]:
        groups: dict[str, list[tuple[int, bytes]]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(key_namespace(k), []).append((i, encode_key(k)))
        return groups

    # ---- presence ----

    def _present(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """Whether each key has a record this engine would load (layout checked, bytes not read)."""
        out = [False] * len(keys)
        for ns, items in self._group(keys).items():
            for (i, _kb), loc in zip(items, self.store.locate_many([kb for _, kb in items], ns=ns)):
                out[i] = loc is not None and self.parse_layout(loc) is not None
        return out

    @staticmethod
    def _prefix(flags: Sequence[bool]) -> int:
        for n, f in enumerate(flags):
            if not f:
                return n
        return len(flags)

    async def exists(self, key: CacheEngineKey) -> bool:
        return (await self._run(self._present, [key]))[0]

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return not self._closed and self._present([key])[0]

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        if self._closed or not keys:
            return 0
        return self._prefix(self._present(keys))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        if not keys:
            return 0
        return self._prefix(await self._run(self._present, list(keys)))

    # ---- reads ----

    def _read(self, keys: Sequence[CacheEngineKey], prefix_only: bool) -> list[MemoryObj | None]:
        """Locate, allocate buffers of the stored layouts, read them with one get_many per namespace,
        then check that each record read is still the one the buffer was shaped for. With
        `prefix_only`, nothing after the first miss is allocated or returned."""
        result: list[MemoryObj | None] = [None] * len(keys)
        c = _PluginCounters()
        held: list[MemoryObj] = []  # allocated and not yet in result: released if anything raises
        try:
            wants: dict[str, list[_Want]] = {}
            limit = len(keys)  # with prefix_only: index of the first miss found so far
            for ns, items in self._group(keys).items():
                for (i, kb), loc in zip(items, self.store.locate_many([kb for _, kb in items], ns=ns)):
                    layout = None if loc is None else self.parse_layout(loc)
                    if loc is None or layout is None:
                        if loc is None:
                            c.miss_absent += 1
                        else:
                            c.miss_layout += 1
                        limit = min(limit, i)
                        continue
                    wants.setdefault(ns, []).append(_Want(i, kb, loc, layout))
            if not prefix_only:
                limit = len(keys)
            for ns, ws in wants.items():
                got: list[_Want] = []
                for w in ws:  # in key order
                    if w.i >= limit:
                        break
                    obj = self.local_cpu_backend.allocate(w.layout.shapes, w.layout.dtypes, w.layout.fmt,
                                                          busy_loop=False)
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
        with self._lock:
            t = self.counters
            t.get_keys += len(keys)
            t.hits += sum(r is not None for r in result)
            t.bytes_read += sum(r.get_size() for r in result if r is not None)
            t.miss_absent += c.miss_absent
            t.miss_layout += c.miss_layout
            t.miss_corrupt += c.miss_corrupt
            t.miss_no_memory += c.miss_no_memory
            t.miss_error += c.miss_error
        return result

    def _read_namespace(self, ns: str, got: list[_Want], result: list[MemoryObj | None], held: list[MemoryObj],
                        c: _PluginCounters) -> None:
        """One get_many into the buffers of `got`; each buffer moves from `held` to `result` or is released."""
        try:
            sizes: list[Any] = self.store.get_many([w.kb for w in got], ns=ns,
                                                   out=[w.obj.byte_array for w in got])  # type: ignore[union-attr]
        except Exception as exc:
            _log.warning("blockstore plugin %s: read from %s failed: %s", self.plugin_name, ns, exc)
            sizes = [-1] * len(got)
        # A record replaced between our lookup and the read may have been read in its new layout: look
        # again and keep a buffer only if the record still has the layout the buffer was shaped for.
        try:
            again: list[Location | None] = self.store.locate_many([w.kb for w in got], ns=ns)
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
            # deleted, so that LMCache's next store of these keys writes them again (a put skips keys
            # already stored with the same layout)
            _log.error("blockstore plugin %s: %d record(s) in %s failed their checksum; deleting them",
                       self.plugin_name, len(corrupt), ns)
            try:
                self.store.delete_many(corrupt, ns=ns)
            except Exception as exc:
                _log.warning("blockstore plugin %s: deleting corrupt records failed: %s", self.plugin_name, exc)

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        try:
            return (await self._run(self._read, [key], False))[0]
        except Exception as exc:
            _log.warning("blockstore plugin %s: get %s failed: %s", self.plugin_name, key, exc)
            return None

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        if not keys:
            return []
        try:
            return await self._run(self._read, list(keys), False)
        except Exception as exc:
            _log.warning("blockstore plugin %s: batched get of %d keys failed: %s", self.plugin_name, len(keys), exc)
            return [None] * len(keys)

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey]) -> list[MemoryObj]:
        if not keys:
            return []
        try:
            got = await self._run(self._read, list(keys), True)
        except Exception as exc:
            _log.warning("blockstore plugin %s: batched get of %d keys failed: %s", self.plugin_name, len(keys), exc)
            return []
        out: list[MemoryObj] = []
        for obj in got:
            if obj is None:
                break
            out.append(obj)
        return out

    # ---- writes ----

    def _placements(self, keys: Sequence[CacheEngineKey]) -> dict[tuple[str, str | None], list[tuple[int, bytes]]]:
        """(namespace, partition) -> [(index, key bytes)] in batch order (see the module docstring)."""
        placed: dict[tuple[str, str | None], list[tuple[int, bytes]]] = {}
        for ns, items in self._group(keys).items():
            segs = [segment_of(keys[i]) for i, _ in items]
            distinct = list(dict.fromkeys(s for s in segs if s is not None))
            shared = distinct[0] if len(distinct) > SEGMENT_PARTITIONS_PER_BATCH else None
            for (i, kb), seg in zip(items, segs):
                part = None if seg is None else (shared or seg)
                placed.setdefault((ns, part), []).append((i, kb))
        return placed

    def _write(self, keys: Sequence[CacheEngineKey], objs: Sequence[MemoryObj]) -> None:
        if len(keys) != len(objs):
            raise ValueError(f"batched put of {len(keys)} keys and {len(objs)} objects")
        metas: dict[int, bytes] = {}
        rejected: list[str] = []
        for i, obj in enumerate(objs):
            try:
                metas[i] = self.layout_meta(obj)
            except Exception as exc:
                rejected.append(f"{keys[i]}: {exc}")
        written = dups = nbytes = 0
        try:
            for (ns, part), items in self._placements(keys).items():
                items = [(i, kb) for i, kb in items if i in metas]
                if not items:
                    continue
                locs = self.store.locate_many([kb for _, kb in items], ns=ns)
                todo: list[tuple[int, bytes]] = []
                seen: set[bytes] = set()
                for (i, kb), loc in zip(items, locs):
                    if kb in seen or (loc is not None and loc.meta == metas[i] and loc.payload_len == objs[i].get_size()):
                        dups += 1  # stored already with this layout (or twice in this batch)
                        continue
                    seen.add(kb)
                    todo.append((i, kb))
                if todo:
                    self.store.put_many([(kb, objs[i].byte_array) for i, kb in todo], ns=ns, partition=part,
                                        metas=[metas[i] for i, _ in todo])
                    written += len(todo)
                    nbytes += sum(objs[i].get_size() for i, _ in todo)
        finally:
            with self._lock:
                t = self.counters
                t.put_calls += 1
                t.keys_written += written
                t.bytes_written += nbytes
                t.duplicates_skipped += dups
                t.put_rejected += len(rejected)
        if rejected:
            raise ValueError(f"blockstore plugin {self.plugin_name}: {len(rejected)} object(s) not stored: "
                             + "; ".join(rejected[:3]))

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self._run(self._write, [key], [memory_obj], pool=self._writer)

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        if keys:
            await self._run(self._write, list(keys), list(memory_objs), pool=self._writer)

    # ---- the rest ----

    def remove_sync(self, key: CacheEngineKey) -> bool:
        if self._closed:
            return False
        existed = self.store.delete_many([encode_key(key)], ns=key_namespace(key))[0]
        if existed:
            with self._lock:
                self.counters.removed += 1
        return existed

    def _list(self) -> list[str]:
        out: list[str] = []
        for ns in sorted(self.store.namespaces()):
            if ns.startswith(NS_PREFIX):
                out += [kb.decode("utf-8", "surrogatepass") for kb in self.store.iter_keys(ns=ns)]
        return out

    async def list(self) -> list[str]:
        return await self._run(self._list)

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when the store answers a directory lookup, 1 otherwise (closed or failing)."""
        try:
            await self._run(self.store.namespaces)
            return 0
        except Exception:
            return 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.counters.__dict__)

    def _close(self) -> None:
        with self._lock:
            while self._inflight:
                self._idle.wait()
        self._pool.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.store.close()

    async def close(self) -> None:
        """Wait for the calls under way, then close the store. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
    "BlockstoreConnector",
    "BlockstoreConnectorAdapter",
    "BlockstorePluginConfig",
    "BlockstorePluginConfigError",
    "encode_key",
    "key_namespace",
    "namespace_for",
    "segment_of",
]
