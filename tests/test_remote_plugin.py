"""The in-process LMCache remote storage plugin (blockstore/connector/remote_plugin.py), driven through LMCache's own
engine on CPU tensors: `LMCacheEngine` built from an `LMCacheEngineConfig` with
`remote_storage_plugins: ["blockstore"]`, LMCache's `CreateStorageBackends` / `RemoteBackend` /
`ConnectorManager` loading the adapter from `extra_config`, and a small CPU connector standing in for
the GPU (test aid: it copies between a dense KV tensor and LMCache's memory objects). Every hit that is
checked comes from the plugin: LMCache's local CPU copy is dropped first, or the engine is new.

The CacheBlend tests drive LMCache's layer-wise store and retrieve (`store_layer` / `retrieve_layer`,
`KV_2TD` objects under `LayerCacheEngineKey`s of position-independent segments) with a CPU stand-in
for `VLLMBufferLayerwiseGPUConnector` and a `SegmentTokenDatabase` given its separator tokens directly
(LMCache's would load a tokenizer from the model hub).

Skipped as a whole when lmcache is not installed."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from lmcache.utils import CacheEngineKey, LayerCacheEngineKey  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngine, LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector.gpu_connectors import (  # noqa: E402
    GPUConnectorInterface,
    VLLMBufferLayerwiseGPUConnector,
)
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.token_database import SegmentTokenDatabase, TokenDatabase  # noqa: E402

import blockstore  # noqa: E402
from blockstore.connector.remote_plugin import (  # noqa: E402
    SEGMENT_PARTITIONS_PER_BATCH,
    BlockstoreConnector,
    BlockstoreConnectorAdapter,
    BlockstorePluginConfig,
    BlockstorePluginConfigError,
    encode_key,
    key_namespace,
)

MODEL = "org/tiny-test"
LAYERS, HEADS, HEAD_SIZE = 4, 2, 32
HIDDEN = HEADS * HEAD_SIZE
CHUNK = 16
DTYPE = torch.bfloat16
SEP = [7, 7, 7]  # the blend separator, as token ids


# ------------------------------------------------------------------------------------------ test aids

class CPUKVConnector(GPUConnectorInterface):
    """LMCache's GPU side on CPU: `kvcaches` is one dense [2, layers, tokens, hidden] tensor (KV_2LTD)."""

    def get_shape(self, num_tokens: int) -> Any:
        return torch.Size([2, LAYERS, num_tokens, HIDDEN])

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        memory_obj.tensor.copy_(kwargs["kvcaches"][:, :, start:end])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        kwargs["kvcaches"][:, :, start:end].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for o, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(o, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs: Any = None, starts: Any = None, ends: Any = None, **kwargs: Any) -> None:
        for o, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(o, s, e, **kwargs)


class CPULayerwiseConnector(VLLMBufferLayerwiseGPUConnector):
    """The CacheBlend layer-wise connector's generator protocol on CPU: `kvcaches` is a list with one
    [2, tokens, hidden] tensor per layer (KV_2TD objects). Like the real one it records the token
    positions of each stored object (`cached_positions`, what CacheBlend's RoPE recovery reads), and it
    remembers the positions it was handed on retrieve."""

    def __init__(self) -> None:  # the real __init__ makes CUDA streams
        self.num_layers = LAYERS
        self.hidden_dim_size = HIDDEN
        self.retrieved_positions: dict[tuple[int, int], Any] = {}

    def get_shape(self, num_tokens: int) -> Any:
        return torch.Size([2, num_tokens, HIDDEN])

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> Iterator[None]:
        kv = kwargs["kvcaches"]
        yield
        for layer in range(self.num_layers):
            for o, s, e in zip(memory_objs[layer], starts, ends):
                o.tensor.copy_(kv[layer][:, s:e])
                o.metadata.cached_positions = torch.arange(s, e, dtype=torch.int64)
            yield

    def batched_to_gpu(self, starts: Any = None, ends: Any = None, **kwargs: Any) -> Iterator[None]:  # type: ignore[override]
        kv = kwargs["kvcaches"]
        for layer in range(self.num_layers):
            objs = yield
            for o, s, e in zip(objs, starts, ends):
                assert o.metadata.fmt == MemoryFormat.KV_2TD
                kv[layer][:, s:e].copy_(o.tensor)
                if layer == 0:
                    self.retrieved_positions[(s, e)] = o.metadata.cached_positions
        yield
        yield


class SeparatorSegmentDB(SegmentTokenDatabase):
    """LMCache's SegmentTokenDatabase with its separator given as token ids (no tokenizer download)."""

    def __init__(self, config: Any, metadata: Any, sep: list[int]) -> None:
        TokenDatabase.__init__(self, config, metadata)
        self.sep_tokens = torch.tensor(sep)
        self.sep_len = len(sep)


def make_config(path: Path, *, blend: bool = False, **extra: Any) -> Any:
    ec = {
        "remote_storage_plugin.blockstore.module_path": "blockstore.connector.remote_plugin",
        "remote_storage_plugin.blockstore.class_name": "BlockstoreConnectorAdapter",
        "remote_storage_plugin.blockstore.path": str(path),
        "remote_storage_plugin.blockstore.compaction": "none",
    }
    ec.update(extra)
    kw: dict[str, Any] = dict(chunk_size=256 if blend else CHUNK, local_cpu=True, max_local_cpu_size=0.05,
                              remote_storage_plugins=["blockstore"], save_unfull_chunk=True,
                              lmcache_instance_id=f"test-{uuid.uuid4().hex[:8]}", extra_config=ec)
    if blend:
        kw.update(use_layerwise=True, enable_blending=True)
    return LMCacheEngineConfig.from_defaults(**kw)


def make_metadata(heads: int = HEADS, chunk: int = CHUNK) -> Any:
    return LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=DTYPE, kv_shape=(LAYERS, 2, chunk, heads, HEAD_SIZE), chunk_size=chunk)


class Engines:
    """Engines built in a test, closed at its end (closing the engine closes the plugin and its store)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.direct: list[Any] = []

    def build(self, cfg: Any, md: Any = None, connector: Any = None) -> Any:
        eng = LMCacheEngineBuilder.get_or_create(cfg.lmcache_instance_id, cfg, md or make_metadata(),
                                                 connector or CPUKVConnector(), None, None)
        self.ids.append(cfg.lmcache_instance_id)
        eng.post_init()
        return eng

    def build_blend(self, cfg: Any, connector: Any) -> Any:
        md = make_metadata(chunk=256)
        eng = LMCacheEngine(cfg, md, SeparatorSegmentDB(cfg, md, SEP), connector, None, None)
        self.direct.append(eng)
        eng.post_init()
        return eng

    def close(self, eng: Any) -> None:
        for i in list(self.ids):
            if LMCacheEngineBuilder.get(i) is eng:
                LMCacheEngineBuilder.destroy(i)
                self.ids.remove(i)
                return
        self.direct.remove(eng)
        eng.close()

    def close_all(self) -> None:
        for i in self.ids:
            LMCacheEngineBuilder.destroy(i)
        for eng in self.direct:
            eng.close()


@pytest.fixture
def engines() -> Iterator[Engines]:
    e = Engines()
    try:
        yield e
    finally:
        e.close_all()


def backend_of(eng: Any) -> Any:
    return eng.storage_manager.storage_backends["RemoteBackend-blockstore"]


def plugin_of(eng: Any) -> BlockstoreConnector:
    conn = backend_of(eng).connection.getWrappedConnector()
    assert isinstance(conn, BlockstoreConnector)
    return conn


def call(eng: Any, coro: Any) -> Any:
    """Run one of the plugin's coroutines on LMCache's event loop, as RemoteBackend does."""
    return asyncio.run_coroutine_threadsafe(coro, backend_of(eng).loop).result(30)


def wait_puts(conn: BlockstoreConnector, calls: int) -> None:
    """RemoteBackend schedules puts without waiting; wait until the plugin has finished `calls` of them."""
    deadline = time.monotonic() + 20
    while conn.stats()["put_calls"] < calls:
        assert time.monotonic() < deadline, f"puts did not finish: {conn.stats()}"
        time.sleep(0.01)


def drop_local(eng: Any) -> None:
    """Empty LMCache's CPU tier, so that the next hits must come from the plugin. An object is only
    evictable once the put that holds a reference to it has returned, so clear until none is left."""
    local = eng.storage_manager.storage_backends["LocalCPUBackend"]
    deadline = time.monotonic() + 20
    while True:
        eng.clear(locations=["LocalCPUBackend"])
        if not local.hot_cache:
            return
        assert time.monotonic() < deadline, f"{len(local.hot_cache)} objects stay in LMCache's CPU tier"
        time.sleep(0.01)


def kv_for(n: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, LAYERS, n, HIDDEN, generator=g).to(DTYPE)


def bits(t: Any) -> Any:
    return t.contiguous().view(torch.int16)  # bit-exact comparison (NaN-proof)


def chunk_keys(eng: Any, tokens: Any) -> list[tuple[int, int, CacheEngineKey]]:
    return list(eng.token_database.process_tokens(tokens))


# --------------------------------------------------------------------------------------- the engine

def test_engine_stores_through_the_plugin_and_retrieves_bit_exact(tmp_path: Path, engines: Engines) -> None:
    """store → (LMCache's CPU copy dropped) → retrieve into zeros: every chunk, the partial last one of
    6 tokens included, comes from the plugin bit for bit; its record holds its real shape."""
    eng = engines.build(make_config(tmp_path / "kv"))
    conn = plugin_of(eng)
    tokens = torch.arange(1000, 1070)  # 4 full chunks of 16 and a partial one of 6
    kv = kv_for(70, seed=1)
    eng.store(tokens, kvcaches=kv)
    wait_puts(conn, 1)
    assert conn.stats()["keys_written"] == 5
    drop_local(eng)

    out = torch.zeros_like(kv)
    mask = eng.retrieve(tokens, kvcaches=out)
    assert int(mask.sum()) == 70
    assert torch.equal(bits(out), bits(kv))
    s = conn.stats()
    assert s["hits"] == 5 and s["bytes_read"] == kv.numel() * 2

    # the partial chunk's record: 6 tokens, not a padded chunk of 16
    start, end, key = chunk_keys(eng, tokens)[-1]
    assert (start, end) == (64, 70)
    loc = conn.store.locate_many([encode_key(key)], ns=key_namespace(key))[0]
    assert loc is not None and loc.payload_len == 2 * LAYERS * 6 * HIDDEN * 2
    layout = conn.parse_layout(loc)
    assert layout is not None and layout.fmt == MemoryFormat.KV_2LTD
    assert layout.shapes == [torch.Size([2, LAYERS, 6, HIDDEN])] and layout.dtypes == [DTYPE]

    # a retrieve of a prefix that ends inside a chunk: the full chunks before it
    out2 = torch.zeros_like(kv)
    drop_local(eng)
    mask = eng.retrieve(tokens[:40], kvcaches=out2)
    assert int(mask.sum()) == 32
    assert torch.equal(bits(out2[:, :, :32]), bits(kv[:, :, :32]))
    assert not out2[:, :, 32:].any()


def test_restart_serves_the_same_kv(tmp_path: Path, engines: Engines) -> None:
    """Close the engine (and with it the store), build a new one on the same path: bit-exact hits."""
    tokens = torch.arange(5000, 5045)  # 2 full chunks + 13 tokens
    kv = kv_for(45, seed=2)
    full = {"remote_storage_plugin.blockstore.compaction": "full"}  # the default: a background compactor
    eng = engines.build(make_config(tmp_path / "kv", **full))
    assert plugin_of(eng).store.compactor is not None
    eng.store(tokens, kvcaches=kv)
    wait_puts(plugin_of(eng), 1)
    engines.close(eng)

    eng2 = engines.build(make_config(tmp_path / "kv", **full))
    conn2 = plugin_of(eng2)
    assert call(eng2, conn2.ping()) == 0
    assert sorted(call(eng2, conn2.list())) == sorted(k.to_string() for _, _, k in chunk_keys(eng2, tokens))
    out = torch.zeros_like(kv)
    mask = eng2.retrieve(tokens, kvcaches=out)
    assert int(mask.sum()) == 45
    assert torch.equal(bits(out), bits(kv))
    assert conn2.stats()["hits"] == 3

    # the same prefix stored again is not written again
    eng2.store(tokens, kvcaches=kv)
    wait_puts(conn2, 1)
    assert conn2.stats()["keys_written"] == 0 and conn2.stats()["duplicates_skipped"] == 3


def test_corrupt_record_is_a_miss_never_wrong_kv(tmp_path: Path, engines: Engines) -> None:
    """A payload byte flipped on disk: the chunk is a miss (the retrieve stops before it, LMCache's
    prefix rule), the record is deleted, and the next store of the prefix writes it again."""
    path = tmp_path / "kv"
    tokens = torch.arange(300, 364)  # 4 full chunks
    kv = kv_for(64, seed=3)
    eng = engines.build(make_config(path))
    eng.store(tokens, kvcaches=kv)
    wait_puts(plugin_of(eng), 1)
    keys = [k for _, _, k in chunk_keys(eng, tokens)]
    engines.close(eng)

    with blockstore.open(path) as s:
        loc = s.locate_many([encode_key(keys[2])], ns=key_namespace(keys[2]))[0]
    assert loc is not None
    with open(path / "blocks" / f"{loc.block_id:016x}.blk", "r+b") as f:
        f.seek(loc.offset + loc.payload_off + 77)
        b = f.read(1)
        f.seek(loc.offset + loc.payload_off + 77)
        f.write(bytes([b[0] ^ 0x10]))

    eng2 = engines.build(make_config(path))
    conn = plugin_of(eng2)
    out = torch.zeros_like(kv)
    mask = eng2.retrieve(tokens, kvcaches=out)
    assert int(mask.sum()) == 32  # chunks 0 and 1; chunk 2 is corrupt, chunk 3 is after it
    assert torch.equal(bits(out[:, :, :32]), bits(kv[:, :, :32]))
    assert not out[:, :, 32:].any()
    assert conn.stats()["miss_corrupt"] == 1
    assert not conn.exists_sync(keys[2])  # deleted

    eng2.store(tokens, kvcaches=kv)
    wait_puts(conn, 1)
    assert conn.stats()["keys_written"] == 1  # only the deleted one
    drop_local(eng2)
    out = torch.zeros_like(kv)
    assert int(eng2.retrieve(tokens, kvcaches=out).sum()) == 64
    assert torch.equal(bits(out), bits(kv))


def test_record_of_another_layout_is_a_miss(tmp_path: Path, engines: Engines) -> None:
    """Same model name, same keys, another KV geometry (4 heads instead of 2): LMCache's keys name no
    layout, the record meta does, so the second engine sees misses, never bytes of the wrong shape."""
    path = tmp_path / "kv"
    tokens = torch.arange(40, 72)
    eng = engines.build(make_config(path))
    eng.store(tokens, kvcaches=kv_for(32, seed=4))
    wait_puts(plugin_of(eng), 1)
    engines.close(eng)

    class Wide(CPUKVConnector):
        def get_shape(self, num_tokens: int) -> Any:
            return torch.Size([2, LAYERS, num_tokens, 2 * HIDDEN])

    eng2 = engines.build(make_config(path), md=make_metadata(heads=2 * HEADS), connector=Wide())
    conn = plugin_of(eng2)
    keys = [k for _, _, k in chunk_keys(eng2, tokens)]
    assert conn.store.locate_many([encode_key(keys[0])], ns=key_namespace(keys[0]))[0] is not None  # it is there
    assert not conn.exists_sync(keys[0]) and conn.batched_contains(keys) == 0
    assert call(eng2, conn.batched_get(keys)) == [None, None]
    out = torch.zeros(2, LAYERS, 32, 2 * HIDDEN, dtype=DTYPE)
    assert int(eng2.retrieve(tokens, kvcaches=out).sum()) == 0
    assert not out.any()
    assert conn.stats()["miss_layout"] == 2


def test_tenants_by_tag_do_not_share_records(tmp_path: Path, engines: Engines) -> None:
    """`lmcache.tag.*` request configs are part of LMCache's key identity: another tag is another
    namespace, so the same tokens under another tenant's tag are a miss."""
    eng = engines.build(make_config(tmp_path / "kv"))
    conn = plugin_of(eng)
    tokens = torch.arange(9000, 9032)
    kv = kv_for(32, seed=5)
    eng.store(tokens, kvcaches=kv, request_configs={"lmcache.tag.user": "alice"})
    wait_puts(conn, 1)
    drop_local(eng)
    alice = [k for _, _, k in eng.token_database.process_tokens(tokens, request_configs={"lmcache.tag.user": "alice"})]
    bob = [k for _, _, k in eng.token_database.process_tokens(tokens, request_configs={"lmcache.tag.user": "bob"})]
    assert key_namespace(alice[0]) != key_namespace(bob[0])
    assert conn.batched_contains(alice) == 2 and conn.batched_contains(bob) == 0
    out = torch.zeros_like(kv)
    assert int(eng.retrieve(tokens, kvcaches=out, request_configs={"lmcache.tag.user": "bob"}).sum()) == 0
    assert int(eng.retrieve(tokens, kvcaches=out, request_configs={"lmcache.tag.user": "alice"}).sum()) == 32
    assert torch.equal(bits(out), bits(kv))


def test_bad_config_is_a_clear_error(tmp_path: Path, engines: Engines) -> None:
    p = "remote_storage_plugin.blockstore."
    good = {p + "path": str(tmp_path / "kv")}
    cases = [
        ({}, p + "path"),
        ({p + "path": "  "}, p + "path"),
        ({**good, p + "durability": "fsync"}, p + "durability"),
        ({**good, p + "block_size": 1000}, p + "block_size"),
        ({**good, p + "block_size": "big"}, p + "block_size"),
        ({**good, p + "compaction": "sometimes"}, p + "compaction"),
        ({**good, p + "path": str(tmp_path / "{rank}")}, p + "path"),
        ({**good, p + "pth": "/x"}, p + "pth"),
    ]
    for ec, named in cases:
        with pytest.raises(BlockstorePluginConfigError, match=named.replace(".", r"\.")) as info:
            BlockstorePluginConfig.from_extra_config(ec, "blockstore")
        assert isinstance(info.value, ValueError)
    # another instance's keys are not this instance's typos; placeholders give each rank its own store
    cfg = BlockstorePluginConfig.from_extra_config(
        {p + "path": str(tmp_path / "r{worker_id}of{world_size}"), p + "b.path": "/elsewhere", p + "block_size": "65536",
         p + "compaction": '{"policy": "full", "gc_invalid_ratio": 0.4}'}, "blockstore", worker_id=3, world_size=4)
    assert cfg.path == str(tmp_path / "r3of4") and cfg.block_size == 65536
    assert cfg.compaction == {"policy": "full", "gc_invalid_ratio": 0.4}
    adapter = BlockstoreConnectorAdapter()
    assert adapter.can_parse("plugin://blockstore") and adapter.can_parse("plugin://blockstore.b")
    assert not adapter.can_parse("plugin://fs") and not adapter.can_parse("plugin://blockstorex")

    # through LMCache: the error is irrecoverable for RemoteBackend (no retry every 10 s); LMCache logs
    # it and the engine runs without the plugin, storing in its CPU tier only
    cfg = make_config(tmp_path / "kv", **{p + "durability": "fsync"})
    eng = engines.build(cfg)
    assert "RemoteBackend-blockstore" not in eng.storage_manager.storage_backends
    assert "LocalCPUBackend" in eng.storage_manager.storage_backends


def test_failed_reads_release_their_buffers(tmp_path: Path, engines: Engines, monkeypatch: Any) -> None:
    """No memory in LMCache's CPU tier: a miss at once (no busy wait). A read that fails after the
    buffers were allocated: a miss, and every buffer goes back to the allocator."""
    eng = engines.build(make_config(tmp_path / "kv"))
    conn = plugin_of(eng)
    tokens = torch.arange(700, 748)
    eng.store(tokens, kvcaches=kv_for(48, seed=7))
    wait_puts(conn, 1)
    drop_local(eng)
    keys = [k for _, _, k in chunk_keys(eng, tokens)]

    real_allocate = conn.local_cpu_backend.allocate
    monkeypatch.setattr(conn.local_cpu_backend, "allocate", lambda *a, **kw: None)
    assert call(eng, conn.batched_get(keys)) == [None] * 3
    assert call(eng, conn.batched_get_non_blocking("x", keys)) == []
    assert conn.stats()["miss_no_memory"] == 4
    allocated: list[Any] = []

    def tracking_allocate(*a: Any, **kw: Any) -> Any:
        assert kw.get("busy_loop") is False
        obj = real_allocate(*a, **kw)
        allocated.append(obj)
        return obj

    def failing_get_many(*a: Any, **kw: Any) -> Any:
        raise OSError("disk went away")

    monkeypatch.setattr(conn.local_cpu_backend, "allocate", tracking_allocate)
    monkeypatch.setattr(conn.store, "get_many", failing_get_many)
    assert call(eng, conn.batched_get(keys)) == [None] * 3
    assert call(eng, conn.get(keys[0])) is None
    assert len(allocated) == 4 and all(o.get_ref_count() == 0 for o in allocated)
    assert conn.stats()["miss_error"] == 4
    out = torch.zeros(2, LAYERS, 48, HIDDEN, dtype=DTYPE)
    assert int(eng.retrieve(tokens, kvcaches=out).sum()) == 0 and not out.any()


# ---------------------------------------------------------------------------------------- CacheBlend

def _runs(conn: BlockstoreConnector, keys: list[Any]) -> list[Any]:
    locs = conn.store.locate_many([encode_key(k) for k in keys], ns=key_namespace(keys[0]))
    assert all(loc is not None for loc in locs)
    return locs


def _assert_one_run(locs: list[Any]) -> None:
    """All in one block, each record right after the previous one."""
    assert len({loc.block_id for loc in locs}) == 1, [(loc.block_id, loc.offset) for loc in locs]
    for a, b in zip(locs, locs[1:]):
        assert b.offset == a.offset + a.record_len, [(loc.offset, loc.record_len) for loc in locs]


def test_blend_segments_through_lmcache_layerwise_path(tmp_path: Path, engines: Engines) -> None:
    """LMCache's layer-wise store of a blend prompt (segments of 37, 130 and 256 tokens between
    separators, 4 layers): its batched_puts come one layer at a time; each segment's per-layer records
    still sit in one block, one after another. Retrieval from the plugin is bit-exact, and so is a
    later prompt with the same segments in another order (position-independent keys), which gets the
    positions the KV was computed at (CacheBlend's RoPE recovery needs them)."""
    lw = CPULayerwiseConnector()
    eng = engines.build_blend(make_config(tmp_path / "kv", blend=True), lw)
    conn = plugin_of(eng)
    g = torch.Generator().manual_seed(6)
    a, b, c = (torch.randint(100, 30000, (n,), generator=g) for n in (37, 130, 256))
    sep = torch.tensor(SEP)
    prompt = torch.cat([a, sep, b, sep, c])
    n = len(prompt)
    kv = [torch.randn(2, n, HIDDEN, generator=g).to(DTYPE) for _ in range(LAYERS)]
    for _ in eng.store_layer(prompt, kvcaches=kv):
        pass
    wait_puts(conn, LAYERS)  # one batched_put per layer
    assert conn.stats()["keys_written"] == 3 * LAYERS

    segments = [(s, e, k) for s, e, k in eng.token_database.process_tokens(prompt)]
    assert [(s, e) for s, e, _ in segments] == [(0, 37), (40, 170), (173, 429)]
    blocks = set()
    for s, e, key in segments:
        locs = _runs(conn, key.split_layers(LAYERS))
        _assert_one_run(locs)
        blocks.add(locs[0].block_id)
        layout = conn.parse_layout(locs[0])
        assert layout is not None and layout.fmt == MemoryFormat.KV_2TD
        assert layout.shapes == [torch.Size([2, e - s, HIDDEN])]
    assert len(blocks) == 3  # a segment's records are not interleaved with another's

    drop_local(eng)
    out = [torch.zeros(2, n, HIDDEN, dtype=DTYPE) for _ in range(LAYERS)]
    steps = list(eng.retrieve_layer(prompt, kvcaches=out))
    mask = steps[-1]
    assert int(mask.sum()) == 37 + 130 + 256
    for layer in range(LAYERS):
        assert torch.equal(bits(out[layer][:, mask]), bits(kv[layer][:, mask]))
    assert conn.stats()["hits"] == 3 * LAYERS

    # the same segments in another order, at other positions: hits, with the stored positions
    prompt2 = torch.cat([c, sep, a])
    drop_local(eng)
    lw.retrieved_positions.clear()
    out2 = [torch.zeros(2, len(prompt2), HIDDEN, dtype=DTYPE) for _ in range(LAYERS)]
    mask2 = list(eng.retrieve_layer(prompt2, kvcaches=out2))[-1]
    assert int(mask2.sum()) == 256 + 37
    for layer in range(LAYERS):
        assert torch.equal(bits(out2[layer][:, :256]), bits(kv[layer][:, 173:429]))
        assert torch.equal(bits(out2[layer][:, 259:]), bits(kv[layer][:, :37]))
    assert torch.equal(lw.retrieved_positions[(0, 256)], torch.arange(173, 429))
    assert torch.equal(lw.retrieved_positions[(259, 296)], torch.arange(0, 37))


def _layer_objects(eng: Any, seg_len: int, seed: int) -> tuple[list[Any], list[Any]]:
    """KV_2TD objects of one segment, one per layer, from LMCache's CPU allocator; and their tensors."""
    g = torch.Generator().manual_seed(seed)
    lcb = eng.storage_manager.storage_backends["LocalCPUBackend"]
    objs, tensors = [], []
    for _ in range(LAYERS):
        o = lcb.allocate(torch.Size([2, seg_len, HIDDEN]), DTYPE, MemoryFormat.KV_2TD)
        t = torch.randn(2, seg_len, HIDDEN, generator=g).to(DTYPE)
        o.tensor.copy_(t)
        objs.append(o)
        tensors.append(t)
    return objs, tensors


def _seg_keys(chunk_hash: int) -> list[Any]:
    return CacheEngineKey(MODEL, 1, 0, chunk_hash, DTYPE).split_layers(LAYERS)


def test_blend_batched_put_and_scattered_lookups(tmp_path: Path, engines: Engines) -> None:
    """The plugin's own batched calls with per-layer segment keys: (a) bit-exact round trip of
    variable-length objects with their real shapes, (b) each segment's layers in one block, one after
    another, whether a batch holds one segment's layers or one layer of every segment, (c) scattered,
    non-prefix lookups answered key by key; the prefix calls stop at the first miss."""
    eng = engines.build_blend(make_config(tmp_path / "kv", blend=True), CPULayerwiseConnector())
    conn = plugin_of(eng)
    lengths = {0xA1: 37, 0xB2: 130, 0xC3: 256, 0xD4: 5, 0xE5: 64}
    data: dict[Any, Any] = {}
    objs: dict[int, list[Any]] = {}
    for h, n in lengths.items():
        o, t = _layer_objects(eng, n, seed=h)
        objs[h] = o
        data.update(zip(_seg_keys(h), t))
    # segment-major batches: one request's segment per call
    for h in (0xA1, 0xB2, 0xC3):
        call(eng, conn.batched_put(_seg_keys(h), objs[h]))
    # layer-major batches (LMCache's layer-wise store): one layer of two segments per call
    for layer in range(LAYERS):
        call(eng, conn.batched_put([_seg_keys(0xD4)[layer], _seg_keys(0xE5)[layer]],
                                   [objs[0xD4][layer], objs[0xE5][layer]]))
    for o in [o for os_ in objs.values() for o in os_]:
        o.ref_count_down()  # what LMCache's wrapper does after a put

    for h in lengths:  # (b)
        _assert_one_run(_runs(conn, _seg_keys(h)))

    keys = [k for h in lengths for k in _seg_keys(h)]  # (a)
    got = call(eng, conn.batched_get(keys))
    for k, o in zip(keys, got):
        assert o is not None and o.get_memory_format() == MemoryFormat.KV_2TD
        assert o.tensor.shape == data[k].shape and torch.equal(bits(o.tensor), bits(data[k]))
        o.ref_count_down()

    missing = _seg_keys(0xFF)  # (c)
    scattered = [_seg_keys(0xC3)[3], missing[0], _seg_keys(0xA1)[0], _seg_keys(0xE5)[2], missing[2],
                 _seg_keys(0xB2)[1]]
    got = call(eng, conn.batched_get(scattered))
    assert [o is not None for o in got] == [True, False, True, True, False, True]
    for k, o in zip(scattered, got):
        if o is not None:
            assert torch.equal(bits(o.tensor), bits(data[k]))
            o.ref_count_down()
    assert [call(eng, conn.exists(k)) for k in scattered] == [True, False, True, True, False, True]
    assert call(eng, conn.batched_async_contains("l1", scattered)) == 1
    assert conn.batched_contains(scattered) == 1
    assert conn.batched_contains(_seg_keys(0xB2)) == LAYERS
    prefix = call(eng, conn.batched_get_non_blocking("l2", scattered))
    assert len(prefix) == 1 and torch.equal(bits(prefix[0].tensor), bits(data[scattered[0]]))
    prefix[0].ref_count_down()
    assert call(eng, conn.get(missing[1])) is None

    assert conn.remove_sync(_seg_keys(0xA1)[0]) and not conn.remove_sync(_seg_keys(0xA1)[0])
    assert call(eng, conn.get(_seg_keys(0xA1)[0])) is None
    listed = set(call(eng, conn.list()))
    assert len(listed) == len(keys) - 1 and _seg_keys(0xA1)[1].to_string() in listed
    assert all(isinstance(k, LayerCacheEngineKey) for k in keys)


def test_many_segments_in_one_batch_share_one_partition(tmp_path: Path, engines: Engines) -> None:
    """A layer-wise batch naming more segments than SEGMENT_PARTITIONS_PER_BATCH goes to one partition
    (the request's stream) instead of opening a block per segment: every record lands in one block, in
    batch order."""
    eng = engines.build_blend(make_config(tmp_path / "kv", blend=True), CPULayerwiseConnector())
    conn = plugin_of(eng)
    hashes = list(range(0x100, 0x100 + SEGMENT_PARTITIONS_PER_BATCH + 2))
    objs = {h: _layer_objects(eng, 8, seed=h)[0] for h in hashes}
    for layer in range(LAYERS):
        call(eng, conn.batched_put([_seg_keys(h)[layer] for h in hashes], [objs[h][layer] for h in hashes]))
    for os_ in objs.values():
        for o in os_:
            o.ref_count_down()
    order = [_seg_keys(h)[layer] for layer in range(LAYERS) for h in hashes]
    _assert_one_run(_runs(conn, order))
