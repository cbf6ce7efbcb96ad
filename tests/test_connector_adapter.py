"""The LMCache MP-mode L2 adapter (blockstore/connector/l2_adapter.py), driven the way `lmcache server` drives it:
LMCache's own ObjectKeys, real TensorMemoryObj buffers from LMCache's TensorMemoryAllocator, event fds
waited on with select, results collected after the fd fired. The last test builds a real
StorageManager from `--l2-adapter` arguments and prefetches through the plugin.

Skipped as a whole when lmcache is not installed (the engine's own suite runs without it)."""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.internal_api import L2StoreResult  # noqa: E402
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface  # noqa: E402
from lmcache.v1.memory_allocators.tensor_memory_allocator import TensorMemoryAllocator  # noqa: E402

import blockstore  # noqa: E402
from blockstore.connector.l2_adapter import (  # noqa: E402
    BlockstoreL2Adapter,
    BlockstoreL2AdapterConfig,
    decode_object_key,
    encode_object_key,
    layout_fingerprint,
    namespace_for,
)
from blockstore.connector.l2_listing import records_held  # noqa: E402

RANK = ObjectKey.ComputeKVRank(world_size=1, global_rank=0, local_world_size=1, local_rank=0)
SHAPE = torch.Size([2, 2, 64, 32])  # [kv, layers, tokens, hidden] float32: 32 KiB
SIZE = 2 * 2 * 64 * 32 * 4
TIMEOUT = 20.0


def okey(i: int, model: str = "org/llama-test", salt: str = "", rank: int = RANK, group: int = 0) -> ObjectKey:
    return ObjectKey(chunk_hash=i.to_bytes(4, "big") * 8, model_name=model, kv_rank=rank,
                     object_group_id=group, cache_salt=salt)


# ------------------------------------------------------------------------------------------ fixtures

class Arena:
    """LMCache memory objects over one CPU tensor, as the server's L1 hands them to adapters."""

    def __init__(self) -> None:
        self.alloc = TensorMemoryAllocator(torch.empty(64 << 20, dtype=torch.uint8))
        self.objs: list[Any] = []

    def new(self, shape: torch.Size = SHAPE, dtype: torch.dtype = torch.float32, fill: int | None = None) -> Any:
        o = self.alloc.allocate(shape, dtype)
        assert o is not None
        if fill is None:
            o.tensor.zero_()
        else:
            g = torch.Generator().manual_seed(fill)
            o.tensor.copy_(torch.randint(-2**30, 2**30, tuple(shape), generator=g).to(dtype) / 7)
        self.objs.append(o)
        return o

    def release(self) -> None:
        for o in self.objs:
            o.ref_count_down()
        self.objs.clear()


def _drain(fd: int, timeout: float = TIMEOUT) -> int:
    """Wait until fd is readable; return the eventfd counter (signals since the last read)."""
    r, _, _ = select.select([fd], [], [], timeout)
    assert r, "event fd was never signalled"
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def store(a: BlockstoreL2Adapter, keys: list[ObjectKey], objs: list[Any]) -> L2StoreResult:
    tid = a.submit_store_task(keys, objs)
    deadline = time.monotonic() + TIMEOUT
    done: dict[int, L2StoreResult] = {}
    while tid not in done:
        assert time.monotonic() < deadline
        _drain(a.get_store_event_fd())
        done.update(a.pop_completed_store_tasks())
    return done[tid]


def _bits(bitmap: Any, n: int) -> list[bool]:
    assert len(bitmap) == n
    return [bitmap.test(i) for i in range(n)]


def lookup(a: BlockstoreL2Adapter, keys: list[ObjectKey]) -> list[bool]:
    tid = a.submit_lookup_and_lock_task(keys, {})
    deadline = time.monotonic() + TIMEOUT
    while True:
        _drain(a.get_lookup_and_lock_event_fd())
        got = a.query_lookup_and_lock_result(tid)
        if got is not None:
            assert a.query_lookup_and_lock_result(tid) is None  # exactly once
            return _bits(got, len(keys))
        assert time.monotonic() < deadline


def load(a: BlockstoreL2Adapter, keys: list[ObjectKey], objs: list[Any]) -> list[bool]:
    tid = a.submit_load_task(keys, objs)
    deadline = time.monotonic() + TIMEOUT
    while True:
        _drain(a.get_load_event_fd())
        got = a.query_load_result(tid)
        if got is not None:
            assert a.query_load_result(tid) is None
            return _bits(got, len(keys))
        assert time.monotonic() < deadline


def same(x: Any, y: Any) -> bool:
    return bytes(x.byte_array) == bytes(y.byte_array)


# --------------------------------------------------------------------------------------------- tests

def test_store_lookup_load_delete_bit_exact(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    assert isinstance(a, L2AdapterInterface)
    keys = [okey(i) for i in range(4)]
    src = [arena.new(fill=i) for i in range(4)]
    res = store(a, keys, src)
    assert res.is_successful() and res.bytes_transferred() == 4 * SIZE

    absent = okey(99)
    assert lookup(a, [keys[0], keys[1], absent, keys[2], keys[3]]) == [True, True, False, True, True]
    dst = [arena.new() for _ in keys]
    assert load(a, keys, dst) == [True] * 4
    assert all(same(s, d) for s, d in zip(src, dst))
    a.submit_unlock(keys)

    usage = a.get_usage()
    assert usage.total_bytes_used == 4 * SIZE and usage.total_capacity_bytes == 0
    a.delete(keys[:2])
    assert lookup(a, keys) == [False, False, True, True]
    a.submit_unlock(keys[2:])
    assert a.get_usage().total_bytes_used == 2 * SIZE
    miss = [arena.new() for _ in keys[:2]]
    assert load(a, keys[:2], miss) == [False, False]


def test_empty_tasks_complete(make: Callable[..., BlockstoreL2Adapter]) -> None:
    a = make()
    res = store(a, [], [])
    assert res.is_successful() and res.bytes_transferred() == 0
    assert lookup(a, []) == []
    assert load(a, [], []) == []


def test_duplicates_are_skipped(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    keys = [okey(i) for i in range(3)]
    src = [arena.new(fill=i) for i in range(3)]
    assert store(a, keys, src).bytes_transferred() == 3 * SIZE
    put_before = a.store.stats().bytes_put
    again = store(a, keys, src)
    assert again.is_successful() and again.bytes_transferred() == 0  # only bytes really written
    # a key twice in one task is written once
    k = okey(7)
    twice = store(a, [k, k], [arena.new(fill=7), arena.new(fill=7)])
    assert twice.bytes_transferred() == SIZE
    st = a.report_status()
    assert st["counters"]["duplicates_skipped"] == 4
    assert a.store.stats().records == 4
    assert a.store.stats().bytes_put - put_before == SIZE + len(encode_object_key(k))
    assert a.get_usage().total_bytes_used == 4 * SIZE


def test_lock_refcounts_guard_delete(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    k, other = okey(1), okey(2)
    store(a, [k, other], [arena.new(fill=1), arena.new(fill=2)])
    assert lookup(a, [k]) == [True]
    assert lookup(a, [k]) == [True]  # two concurrent prefetches each hold a reference
    a.delete([k, other])  # the eviction thread does not consult locks: the adapter does
    assert lookup(a, [other]) == [False]
    assert a.report_status()["counters"]["delete_skipped_locked"] == 1
    a.submit_unlock([k])
    a.delete([k])
    assert a.report_status()["counters"]["delete_skipped_locked"] == 2
    a.submit_unlock([k])
    a.submit_unlock([k, okey(55)])  # one unlock too many, and a key never seen: harmless
    a.delete([k])
    assert a.report_status()["locked_keys"] == 0
    assert lookup(a, [k]) == [False]
    assert a.get_usage().total_bytes_used == 0


def test_expired_lock_no_longer_blocks_delete(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make(lock_ttl_s=0.2)
    k = okey(1)
    store(a, [k], [arena.new(fill=1)])
    assert lookup(a, [k]) == [True]
    a.delete([k])
    assert lookup(a, [k]) == [True]  # still there, now locked twice
    time.sleep(0.3)
    a.delete([k])  # the lease ran out: an unlock that never came no longer pins the key
    assert lookup(a, [k]) == [False]
    assert a.report_status()["counters"]["locks_expired"] == 1
    a.submit_unlock([k, k])


class Collector:
    """Results of many threads' tasks on one adapter (pop_completed_store_tasks hands over all of them)."""

    def __init__(self, a: BlockstoreL2Adapter) -> None:
        self.a = a
        self.lock = threading.Lock()
        self.stores: dict[int, L2StoreResult] = {}

    def store(self, keys: list[ObjectKey], objs: list[Any]) -> L2StoreResult:
        tid = self.a.submit_store_task(keys, objs)
        deadline = time.monotonic() + TIMEOUT
        while True:
            with self.lock:
                self.stores.update(self.a.pop_completed_store_tasks())
                if tid in self.stores:
                    return self.stores.pop(tid)
            assert time.monotonic() < deadline
            time.sleep(0.001)

    def poll(self, query: Callable[[int], Any], tid: int, n: int) -> list[bool]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = query(tid)
            if got is not None:
                return _bits(got, n)
            assert time.monotonic() < deadline
            time.sleep(0.001)


def test_concurrent_tasks_from_many_threads(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make(compaction="full", workers=3)
    c = Collector(a)
    threads, per = 6, 5
    srcs = {t: [arena.new(fill=100 * t + j) for j in range(per)] for t in range(threads)}
    dsts = {t: [arena.new() for _ in range(per)] for t in range(threads)}
    shared = [okey(10_000 + j) for j in range(per)]  # every thread stores these too: one copy wins
    shared_src = [arena.new(fill=10_000 + j) for j in range(per)]
    errors: list[BaseException] = []
    bytes_reported = []

    def worker(t: int) -> None:
        try:
            keys = [okey(100 * t + j) for j in range(per)]
            for _ in range(3):
                res = c.store(keys + shared, srcs[t] + shared_src)
                assert res.is_successful()
                bytes_reported.append(res.bytes_transferred())
                tid = a.submit_lookup_and_lock_task(keys, {})
                assert c.poll(a.query_lookup_and_lock_result, tid, per) == [True] * per
                tid = a.submit_load_task(keys, dsts[t])
                assert c.poll(a.query_load_result, tid, per) == [True] * per
                assert all(same(s, d) for s, d in zip(srcs[t], dsts[t]))
                a.submit_unlock(keys)
                a.delete(keys[:1])  # churn: the next round stores it again
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert sum(bytes_reported) == (threads * per + per + threads * 2) * SIZE  # each write counted once
    st = a.report_status()
    assert st["locked_keys"] == 0 and st["inflight_tasks"] == {"store": 0, "lookup": 0, "load": 0}
    assert a.get_usage().total_bytes_used == a.store.stats().records * SIZE == (threads * (per - 1) + per) * SIZE


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "'path'"),
        ({"path": ""}, "'path'"),
        ({"path": 3}, "'path'"),
        ({"path": "/tmp/x", "durability": "fsync"}, "'durability'"),
        ({"path": "/tmp/x", "block_size": 1000}, "'block_size'"),
        ({"path": "/tmp/x", "block_size": "64M"}, "'block_size'"),
        ({"path": "/tmp/x", "capacity_bytes": -1}, "'capacity_bytes'"),
        ({"path": "/tmp/x", "capacity_bytes": 1.5}, "'capacity_bytes'"),
        ({"path": "/tmp/x", "capacity_bytes": True}, "'capacity_bytes'"),
        ({"path": "/tmp/x", "compaction": "bogus"}, "unknown compaction policy"),
        ({"path": "/tmp/x", "compaction": {"policy": "full", "gc_invalid_ratio": 7}}, "gc_invalid_ratio"),
        ({"path": "/tmp/x", "compaction": 5}, "'compaction'"),
        ({"path": "/tmp/x", "workers": 0}, "'workers'"),
        ({"path": "/tmp/x", "workers": "4"}, "'workers'"),
        ({"path": "/tmp/x", "lock_ttl_s": -1}, "'lock_ttl_s'"),
        ({"path": "/tmp/x", "capacity_gb": 1}, "unknown key(s) ['capacity_gb']"),
    ],
)
def test_bad_params_get_clear_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        BlockstoreL2AdapterConfig.from_dict(params)
    assert message in str(exc.value)
    with pytest.raises(ValueError):  # a raw dict given to the adapter is validated the same way
        BlockstoreL2Adapter(params)


def test_config_defaults_and_help(tmp_path: Path) -> None:
    cfg = BlockstoreL2AdapterConfig.from_dict({"type": "plugin", "path": str(tmp_path / "kv")})
    assert (cfg.durability, cfg.block_size, cfg.capacity_bytes, cfg.compaction, cfg.workers) == \
        ("cache", None, 0, "full", 4)
    assert BlockstoreL2AdapterConfig.from_dict({"path": "p", "compaction": "none"}).compaction is None
    assert BlockstoreL2AdapterConfig.from_dict({"path": "p", "compaction": None}).compaction is None
    spec = {"policy": "no-gc", "min_hits": 3, "background": False}
    assert BlockstoreL2AdapterConfig.from_dict({"path": "p", "compaction": spec}).compaction == spec
    text = BlockstoreL2AdapterConfig.help()
    for name in BlockstoreL2AdapterConfig.FIELDS:
        assert name in text


def test_store_already_open_is_a_clear_error(make: Callable[..., BlockstoreL2Adapter]) -> None:
    make()
    with pytest.raises(blockstore.StoreLocked):
        make()


def test_key_serialization_is_stable_and_complete() -> None:
    keys = [
        okey(1),
        ObjectKey(chunk_hash=b"\x00" * 32, model_name="Qwen/Qwen2-ß", kv_rank=ObjectKey.ComputeKVRank(4, 3, 4, 3),
                  object_group_id=7, cache_salt="tenant-ü"),
        ObjectKey(chunk_hash=(-5).to_bytes(8, "big", signed=True), model_name="m", kv_rank=-1,
                  object_group_id=2**40, cache_salt=""),
        ObjectKey(chunk_hash=b"", model_name="", kv_rank=0),
    ]
    encoded = [encode_object_key(k) for k in keys]
    assert len(set(encoded)) == len(keys)
    assert [decode_object_key(e) for e in encoded] == keys
    # the format is fixed (never Python's salted hash): pin one encoding
    assert encode_object_key(ObjectKey(b"\xab", "m", 1, 2, "s")) == bytes.fromhex(
        "01" "0001" "6d" "0001" "ab" "0000000000000001" "0000000000000002" "0001" "73")
    # every field tells keys apart
    base = ObjectKey(b"h", "m", 1, 0, "")
    variants = [ObjectKey(b"i", "m", 1, 0, ""), ObjectKey(b"h", "n", 1, 0, ""), ObjectKey(b"h", "m", 2, 0, ""),
                ObjectKey(b"h", "m", 1, 1, ""), ObjectKey(b"h", "m", 1, 0, "x")]
    assert len({encode_object_key(k) for k in [base, *variants]}) == 6
    for bad in (b"", b"\x02abc", encode_object_key(base)[:-1], encode_object_key(base) + b"\0"):
        with pytest.raises(ValueError):
            decode_object_key(bad)
    with pytest.raises(ValueError, match="key limit"):
        encode_object_key(ObjectKey(b"h", "m" * 5000, 1))


def test_namespaces() -> None:
    a, b = namespace_for("org/m", ""), namespace_for("org/m", "alice")
    assert a != b and a.startswith("lmcache:") and a.endswith(":org/m")
    assert namespace_for("org/m", "") == a  # stable
    assert namespace_for("a", "bc") != namespace_for("ab", "c")  # length-prefixed, no ambiguity
    long = namespace_for("ü" * 300, "s" * 128)
    assert len(long.encode()) <= 255 and long.isascii()


def test_salted_tenants_never_share(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    alice, bob, plain = okey(1, salt="alice"), okey(1, salt="bob"), okey(1)
    assert store(a, [alice], [arena.new(fill=1)]).bytes_transferred() == SIZE
    assert lookup(a, [bob, plain, alice]) == [False, False, True]
    assert load(a, [bob, plain], [arena.new(), arena.new()]) == [False, False]
    # bob stores the same chunk: his own record, in his own namespace
    assert store(a, [bob], [arena.new(fill=2)]).bytes_transferred() == SIZE
    ns = set(a.store.namespaces())
    assert {namespace_for("org/llama-test", "alice"), namespace_for("org/llama-test", "bob")} <= ns
    got_a, got_b = arena.new(), arena.new()
    assert load(a, [alice, bob], [got_a, got_b]) == [True, True]
    assert not same(got_a, got_b)
    a.submit_unlock([alice])
    assert dict(a.get_usage().bytes_by_cache_salt) == {"alice": SIZE, "bob": SIZE}


def _flip_payload_byte(a: BlockstoreL2Adapter, key: ObjectKey, at: int = 100) -> None:
    ns = namespace_for(key.model_name, key.cache_salt)
    [loc] = a.store.locate_many([encode_object_key(key)], ns=ns)
    assert loc is not None
    with open(a.store.blocks.path(loc.block_id), "r+b") as f:
        f.seek(loc.payload_offset + at)
        b = f.read(1)
        f.seek(loc.payload_offset + at)
        f.write(bytes([b[0] ^ 0x40]))


def test_corrupt_record_is_a_miss_never_wrong_kv(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    keys = [okey(i) for i in range(3)]
    src = [arena.new(fill=i) for i in range(3)]
    store(a, keys, src)
    _flip_payload_byte(a, keys[1])
    assert lookup(a, keys) == [True, True, True]  # the directory still names it
    dst = [arena.new() for _ in keys]
    assert load(a, keys, dst) == [True, False, True]
    assert same(src[0], dst[0]) and same(src[2], dst[2])
    a.submit_unlock(keys)
    st = a.report_status()
    assert st["counters"]["load_miss_corrupt"] == 1 and st["is_healthy"]
    # the bad record is gone: a lookup misses it and the next store writes it again
    assert lookup(a, [keys[1]]) == [False]
    assert a.get_usage().total_bytes_used == 2 * SIZE
    assert store(a, [keys[1]], [src[1]]).bytes_transferred() == SIZE
    again = arena.new()
    assert load(a, [keys[1]], [again]) == [True] and same(src[1], again)


def test_layout_mismatch_is_a_miss(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    k = okey(1)
    src = arena.new(fill=1)
    store(a, [k], [src])
    assert json.loads(layout_fingerprint(src)) == {"v": 1, "size": SIZE, "shapes": [list(SHAPE)],
                                                   "dtypes": ["torch.float32"]}
    same_bytes_other_dtype = arena.new(torch.Size([2, 2, 64, 64]), torch.float16)  # as many bytes
    other_shape = arena.new(torch.Size([2, 2, 128, 16]), torch.float32)  # as many bytes
    smaller = arena.new(torch.Size([2, 2, 32, 32]), torch.float32)
    larger = arena.new(torch.Size([2, 2, 128, 32]), torch.float32)
    for buf in (same_bytes_other_dtype, other_shape, smaller, larger):
        assert load(a, [k], [buf]) == [False]
        assert not any(bytes(buf.byte_array))  # not a byte written into it
    assert a.report_status()["counters"]["load_miss_layout"] == 4
    # a deployment that changed its KV layout stores the key again: the new layout replaces the old
    new = arena.new(torch.Size([2, 2, 64, 64]), torch.float16, fill=5)
    assert store(a, [k], [new]).bytes_transferred() == SIZE
    out = arena.new(torch.Size([2, 2, 64, 64]), torch.float16)
    assert load(a, [k], [out]) == [True] and same(new, out)
    assert load(a, [k], [arena.new()]) == [False]
    assert a.report_status()["counters"]["replaced_other_layout"] == 1
    assert a.get_usage().total_bytes_used == SIZE and a.store.stats().records == 1


def test_locked_key_is_not_replaced_by_another_layout(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    k = okey(1)
    src = arena.new(fill=1)
    store(a, [k], [src])
    assert lookup(a, [k]) == [True]
    other = arena.new(torch.Size([2, 2, 64, 64]), torch.float16, fill=2)
    assert store(a, [k], [other]).bytes_transferred() == 0  # the lookup promised the old record to a load
    dst = arena.new()
    assert load(a, [k], [dst]) == [True] and same(src, dst)
    a.submit_unlock([k])


class Listener:
    def __init__(self) -> None:
        self.stored: list[tuple[ObjectKey, int]] = []
        self.deleted: list[ObjectKey] = []
        self.accessed: list[ObjectKey] = []

    def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        self.stored += list(zip(keys, sizes))

    def on_l2_keys_deleted(self, keys: list[ObjectKey]) -> None:
        self.deleted += keys

    def on_l2_keys_accessed(self, keys: list[ObjectKey]) -> None:
        self.accessed += keys


def test_restart_keeps_keys(make: Callable[..., BlockstoreL2Adapter], arena: Arena, tmp_path: Path) -> None:
    path = str(tmp_path / "restart")
    a = make(path=path, durability="sync", compaction="full")
    keys = [okey(i, salt="s" if i % 2 else "") for i in range(5)]
    src = [arena.new(fill=i) for i in range(5)]
    store(a, keys, src)
    a.delete([keys[4]])
    a.close()
    a.close()  # idempotent

    b = make(path=path, durability="sync", compaction="full")
    assert b.recovered_keys == 4
    usage = b.get_usage()
    assert usage.total_bytes_used == 4 * SIZE and dict(usage.bytes_by_cache_salt) == {"": 2 * SIZE, "s": 2 * SIZE}
    listener = Listener()
    b.register_listener(listener)  # recovered keys are announced, so LMCache's eviction knows them
    assert sorted(listener.stored, key=lambda t: t[0].chunk_hash) == [(k, SIZE) for k in keys[:4]]
    assert lookup(b, keys) == [True, True, True, True, False]
    dst = [arena.new() for _ in keys[:4]]
    assert load(b, keys[:4], dst) == [True] * 4
    assert all(same(s, d) for s, d in zip(src, dst))
    assert sorted(listener.accessed, key=encode_object_key) == sorted(keys[:4], key=encode_object_key)
    b.submit_unlock(keys[:4])
    b.delete(keys[:1])
    assert listener.deleted == keys[:1]
    assert b.get_usage().total_bytes_used == 3 * SIZE  # deleted with the size it was stored with


def test_listener_sees_stores_and_deletes_with_sizes(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    listener = Listener()
    a.register_listener(listener)
    keys = [okey(i) for i in range(3)]
    objs = [arena.new(fill=i) for i in range(3)]
    store(a, keys, objs)
    store(a, keys, objs)  # duplicates are not announced again
    assert listener.stored == [(k, SIZE) for k in keys]
    a.delete(keys + [okey(77)])  # unknown keys are skipped
    assert listener.deleted == keys
    assert a.get_usage().total_bytes_used == 0


def test_list_l2_keys_paging(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    keys = [okey(i) for i in range(5)] + [okey(i, model="other/m") for i in range(3)] + [okey(9, salt="t")]
    store(a, keys[:5], [arena.new(fill=i) for i in range(5)])
    store(a, keys[5:8], [arena.new(fill=i) for i in range(3)])
    store(a, keys[8:], [arena.new(fill=9)])

    def all_pages(model: str | None = None, size: int = 2) -> list[Any]:
        out, cursor, pages = [], None, 0
        while True:
            page = a.list_l2_keys(model_name=model, page_size=size, cursor=cursor)
            assert len(page.entries) <= size
            out += page.entries
            pages += 1
            cursor = page.next_page_token
            if cursor is None:
                return out
            assert isinstance(cursor, str) and pages < 100

    entries = all_pages()
    assert len(entries) == len(keys)
    assert sorted(e.key.to_object_key().chunk_hash + e.key.model_name.encode() + e.key.cache_salt.encode()
                  for e in entries) == sorted(k.chunk_hash + k.model_name.encode() + k.cache_salt.encode()
                                              for k in keys)
    assert {e.key.to_object_key() for e in entries} == set(keys)
    assert all(e.size_bytes == SIZE for e in entries)
    assert {e.key.to_object_key() for e in all_pages("other/m", 1)} == set(keys[5:8])
    assert {e.key.to_object_key() for e in all_pages("org/llama-test", 4)} == set(keys[:5]) | {keys[8]}
    assert all_pages("nobody") == []
    one = a.list_l2_keys(page_size=100)
    assert len(one.entries) == len(keys) and one.next_page_token is None
    for bad_size in (0, -3, True):
        with pytest.raises(ValueError):
            a.list_l2_keys(page_size=bad_size)
    for bad_cursor in ("", "garbage", "bs1.!!!", "bs1." + "e30="):
        with pytest.raises(ValueError):
            a.list_l2_keys(cursor=bad_cursor)


def test_report_status_fields(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make(compaction="full")
    keys = [okey(i) for i in range(4)]
    store(a, keys, [arena.new(fill=i) for i in range(4)])
    assert lookup(a, keys + [okey(50)]) == [True] * 4 + [False]
    load(a, keys, [arena.new() for _ in keys])
    a.submit_unlock(keys)
    st = a.report_status()
    json.dumps(st)  # plain data, as /status embeds it
    assert st["is_healthy"] is True and st["type"] == "BlockstoreL2Adapter"
    assert st["store"]["records"] == 4 and st["records"] == 4 and st["used_bytes"] == 4 * SIZE
    assert st["counters"]["lookup_hits"] == 4 and st["counters"]["lookup_keys"] == 5
    assert st["lookup_hit_ratio"] == pytest.approx(0.8) and st["load_hit_ratio"] == 1.0
    assert st["lookup_blocks_per_request"] == 1.0 and st["load_blocks_per_request"] == 1.0
    assert st["compaction"]["policy"] == "full"
    assert st["compaction"]["requests_observed"] == 1  # the lookup, not the load too
    a.close()
    st = a.report_status()  # after close: unhealthy, no exception
    assert st["is_healthy"] is False


def test_lookups_teach_the_compactor(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make(compaction={"policy": "full", "background": False})
    keys = [okey(i) for i in range(4)]
    store(a, keys, [arena.new(fill=i) for i in range(4)])
    tracker = a.store.compactor.tracker
    before = tracker.requests
    for _ in range(3):
        lookup(a, keys)
        load(a, keys[:2], [arena.new(), arena.new()])
        a.submit_unlock(keys)
    assert tracker.requests - before == 3  # one request per lookup; loads are not counted again
    assert len(tracker) == 1 and tracker.due(2)  # the four keys form one group, requested three times


def test_event_fds_signalled_once_per_task(make: Callable[..., BlockstoreL2Adapter], arena: Arena,
                                          tmp_path: Path) -> None:
    a, b = make(), make(path=str(tmp_path / "second"))
    fds = [x.get_store_event_fd() for x in (a, b)] + [x.get_lookup_and_lock_event_fd() for x in (a, b)] + \
        [x.get_load_event_fd() for x in (a, b)]
    assert len(set(fds)) == len(fds)  # distinct within and across adapters
    n = 5
    keys = [okey(i) for i in range(n)]
    objs = [arena.new(fill=i) for i in range(n)]
    store_ids = [a.submit_store_task([k], [o]) for k, o in zip(keys, objs)]
    bad_store = a.submit_store_task(keys[:2], objs[:1])  # mismatched lengths: fails, never raises
    done: dict[int, L2StoreResult] = {}
    signals = 0
    deadline = time.monotonic() + TIMEOUT
    while len(done) < n + 1:
        assert time.monotonic() < deadline
        signals += _drain(a.get_store_event_fd())
        done.update(a.pop_completed_store_tasks())
    assert set(done) == {*store_ids, bad_store} and not done[bad_store].is_successful()
    assert len(set(store_ids + [bad_store])) == n + 1

    lookup_ids = [a.submit_lookup_and_lock_task([k], {}) for k in keys]
    load_ids = [a.submit_load_task([k], [arena.new()]) for k in keys]
    bad_load = a.submit_load_task(keys[:2], [arena.new()])
    results: dict[int, Any] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(results) < 2 * n + 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
        for tid in lookup_ids:
            r = a.query_lookup_and_lock_result(tid)
            if r is not None:
                results[tid] = r
        for tid in [*load_ids, bad_load]:
            r = a.query_load_result(tid)
            if r is not None:
                results[tid] = r
    assert _bits(results[bad_load], 2) == [False, False]
    time.sleep(0.2)  # a signal that came late would show up now
    signals += _count_pending(a.get_store_event_fd())
    assert signals == n + 1
    assert _count_pending(a.get_lookup_and_lock_event_fd()) == n
    assert _count_pending(a.get_load_event_fd()) == n + 1
    a.submit_unlock(keys)


def _count_pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_submit_after_close_never_raises(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    store(a, [okey(2)], [arena.new(fill=2)])
    fds = (a.get_store_event_fd(), a.get_lookup_and_lock_event_fd(), a.get_load_event_fd())
    a.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the adapter
    t1 = a.submit_store_task([okey(1)], [arena.new()])
    t2 = a.submit_lookup_and_lock_task([okey(1)], {})
    t3 = a.submit_load_task([okey(1)], [arena.new()])
    assert not a.pop_completed_store_tasks()[t1].is_successful()
    assert _bits(a.query_lookup_and_lock_result(t2), 1) == [False]
    assert _bits(a.query_load_result(t3), 1) == [False]
    a.submit_unlock([okey(1)])
    a.delete([okey(1), okey(2)])  # the store is closed: the error is caught, the key stays
    assert a.report_status()["is_healthy"] is False
    assert a.recovered_keys == 0 and a.get_usage().total_bytes_used == SIZE


def test_bad_arguments_complete_as_failures(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    a = make()
    t1 = a.submit_lookup_and_lock_task(None, {})  # type: ignore[arg-type]
    t2 = a.submit_load_task([okey(1)], None)  # type: ignore[arg-type]
    t3 = a.submit_store_task([okey(1), "not a key"], [arena.new(), arena.new()])  # type: ignore[list-item]
    assert _drain(a.get_lookup_and_lock_event_fd()) == 1
    assert len(a.query_lookup_and_lock_result(t1)) == 0
    deadline = time.monotonic() + TIMEOUT
    while (r2 := a.query_load_result(t2)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert _bits(r2, 1) == [False]
    done: dict[int, L2StoreResult] = {}
    while t3 not in done:
        assert time.monotonic() < deadline
        _drain(a.get_store_event_fd())
        done.update(a.pop_completed_store_tasks())
    assert not done[t3].is_successful()  # the bad key fails the task...
    assert lookup(a, [okey(1)]) == [True]  # ...and the good one was stored all the same
    a.submit_unlock([okey(1)])
    assert a.report_status()["counters"]["store_failed_tasks"] == 1


def test_capacity_budget_evicts_oldest_unlocked(make: Callable[..., BlockstoreL2Adapter],
                                                             arena: Arena) -> None:
    a = make(capacity_bytes=3 * SIZE, block_size=65536)
    assert a.supports_global_eviction and a.get_usage().total_capacity_bytes == 3 * SIZE
    listener = Listener()
    a.register_listener(listener)
    k = [okey(i) for i in range(6)]
    store(a, k[:3], [arena.new(fill=i) for i in range(3)])
    assert lookup(a, [k[0]]) == [True]  # k0: locked and most recently used; k1 is now the oldest
    res = store(a, k[3:5], [arena.new(fill=3), arena.new(fill=4)])
    assert res.bytes_transferred() == 2 * SIZE
    assert lookup(a, k[:5]) == [True, False, False, True, True]
    assert listener.deleted == [k[1], k[2]]
    assert a.get_usage().total_bytes_used == 3 * SIZE
    # everything left is locked: a store that cannot make room keeps what fits (nothing) and succeeds
    res = store(a, [k[5]], [arena.new(fill=5)])
    assert res.is_successful() and res.bytes_transferred() == 0
    assert a.report_status()["counters"]["skipped_capacity"] == 1
    a.submit_unlock([k[0], k[0], k[3], k[4]])
    assert store(a, [k[5]], [arena.new(fill=5)]).bytes_transferred() == SIZE
    assert a.get_usage().total_bytes_used == 3 * SIZE
    # an object larger than the whole budget is never stored
    big = arena.new(torch.Size([2, 2, 256, 32]), torch.float32)
    assert store(a, [okey(40)], [big]).bytes_transferred() == 0


def test_plugin_loader_builds_the_adapter(tmp_path: Path) -> None:
    """What `--l2-adapter '{"type": "plugin", ...}'` does: config class found by name, keyword l1_memory_desc."""
    from lmcache.v1.distributed.internal_api import L1MemoryDesc
    from lmcache.v1.distributed.l2_adapters.config import get_l2_adapter_config_class
    from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry

    cfg = get_l2_adapter_config_class("plugin").from_dict({
        "type": "plugin", "module_path": "blockstore.connector.l2_adapter", "class_name": "BlockstoreL2Adapter",
        "adapter_params": {"path": str(tmp_path / "kv"), "compaction": None}})
    a = create_l2_adapter_from_registry(cfg, L1MemoryDesc(ptr=4096, size=1 << 20, align_bytes=4096))
    try:
        assert isinstance(a, BlockstoreL2Adapter) and a.config.path == str(tmp_path / "kv")
    finally:
        a.close()


def test_storage_manager_store_clear_prefetch(tmp_path: Path) -> None:
    """The server's own StorageManager, built from --l2-adapter arguments: L1 write -> stored to blockstore by
    the store controller -> L1 force-cleared -> prefetch loads it back from blockstore, bit-exact."""
    from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, PrefetchTaskSpec
    from lmcache.v1.distributed.config import parse_args
    from lmcache.v1.distributed.storage_manager import StorageManager

    spec = {"type": "plugin", "module_path": "blockstore.connector.l2_adapter", "class_name": "BlockstoreL2Adapter",
            "adapter_params": {"path": str(tmp_path / "kv")}}
    sm = StorageManager(parse_args(["--l1-size-gb", "0.05", "--eviction-policy", "LRU",
                                    "--l2-adapter", json.dumps(spec)]))
    try:
        [(_desc, adapter)] = sm.l2_adapters()
        assert isinstance(adapter, BlockstoreL2Adapter)
        layout = MemoryLayoutDesc(shapes=[SHAPE], dtypes=[torch.float32])
        keys = [okey(i) for i in range(3)]
        reserved = sm.reserve_write(keys, layout)
        data = {}
        for i, k in enumerate(keys):
            data[k] = torch.full(tuple(SHAPE), float(i)) + torch.arange(SHAPE.numel()).reshape(SHAPE) / 1000
            reserved[k].tensor.copy_(data[k])
        sm.finish_write(keys)
        deadline = time.monotonic() + TIMEOUT
        while adapter.report_status()["counters"]["keys_stored"] < 3:
            assert time.monotonic() < deadline, adapter.report_status()
            time.sleep(0.02)
        time.sleep(0.2)  # the store controller pops the result and releases its L1 read locks
        sm.clear(force=True)
        assert sm.get_l1_usage()[0] == 0

        handle = sm.submit_prefetch_task(PrefetchTaskSpec(
            key_groups=[GroupedObjectKeys(keys=keys + [okey(99)], object_group_id=0, layout_desc=layout)]))
        assert sm.wait_prefetch_status(handle, TIMEOUT)
        result = sm.query_prefetch_status(handle)
        assert result is not None and result.l1_hit_count == 0 and result.l2_hit_count == 3
        with sm.read_prefetched_results(keys, result.l1_owners) as objs:
            assert objs is not None
            for k, o in zip(keys, objs):
                assert torch.equal(o.tensor, data[k])
        sm.finish_read_prefetched(keys, 1, result.l1_owners)
        deadline = time.monotonic() + TIMEOUT
        while adapter.report_status()["locked_keys"]:  # every L2 lock granted was released by the server
            assert time.monotonic() < deadline
            time.sleep(0.02)
        st = sm.report_status()
        assert st["is_healthy"] and st["l2_adapters"][0]["counters"]["load_hits"] == 3
    finally:
        sm.close()
    assert adapter._state.closed
    with blockstore.open(tmp_path / "kv", read_only=True) as s:  # closed cleanly, records kept
        assert s.stats().records == 3


def test_capacity_eviction_gives_recently_read_keys_a_second_chance(make: Callable[..., BlockstoreL2Adapter],
                                                                   arena: Arena) -> None:
    """Eviction walks the oldest block first, but a key read since it was written is kept (moved to the head
    of the log, spending one read of credit) and the next unread one goes."""
    a = make(capacity_bytes=4 * SIZE, block_size=65536)
    k = [okey(i) for i in range(6)]
    store(a, k[:4], [arena.new(fill=i) for i in range(4)])
    assert lookup(a, [k[0]]) == [True]
    a.submit_unlock([k[0]])  # read and released: evictable, but recently read
    store(a, [k[4]], [arena.new(fill=4)])
    assert lookup(a, k[:5]) == [True, False, True, True, True]  # k1, not the older k0, made room
    a.submit_unlock([k[0], k[2], k[3], k[4]])
    assert a.report_status()["counters"]["evicted_for_capacity"] == 1


def test_per_key_state_is_bounded(make: Callable[..., BlockstoreL2Adapter], arena: Arena,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing per record stays in the adapter: the directory is the index. After stores, lookups, loads and
    deletes, only the bounded read statistics hold keys, and Python memory does not grow with the records."""
    import tracemalloc

    a = make()
    # the bounded per-key caches, made small
    a._memory.stats.limit = a._memory.ghost.limit = a._memory.sightings.limit = 8
    src = arena.new(fill=1)
    dst = arena.new()

    def round_of(start: int, n: int) -> None:
        keys = [okey(start + i) for i in range(n)]
        for j in range(0, n, 50):
            part = keys[j:j + 50]
            store(a, part, [src] * len(part))
            assert lookup(a, part) == [True] * len(part)
            assert load(a, part[:1], [dst]) == [True]
            a.submit_unlock(part)

    round_of(0, 100)  # warm up caches and lazily built state
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        round_of(1000, 1000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(st.size_diff for st in after.compare_to(before, "filename"))
    assert grown < 256 << 10, f"Python memory grew {grown} bytes over 1000 records"
    assert not a._state.locks and not a._state.storing and not a._state.deleting and len(a._memory.stats) == 8
    st = a.report_status()
    assert st["records"] == 1100 and st["used_bytes"] == 1100 * SIZE == a.get_usage().total_bytes_used


def test_restart_replays_records_to_listeners_in_batches(make: Callable[..., BlockstoreL2Adapter], arena: Arena,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blockstore.connector import l2_listeners

    monkeypatch.setattr(l2_listeners, "REPLAY_BATCH", 2)
    path = str(tmp_path / "replay")
    a = make(path=path)
    keys = [okey(i) for i in range(5)]
    store(a, keys, [arena.new(fill=i) for i in range(5)])
    a.close()
    b = make(path=path)
    calls: list[int] = []

    class Counting(Listener):
        def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
            calls.append(len(keys))
            super().on_l2_keys_stored(keys, sizes)

    b.register_listener(Counting())
    assert calls == [2, 2, 1] and b.report_status()["records"] == 5


def test_storage_manager_l2_eviction_under_load(tmp_path: Path) -> None:
    """LMCache's own L2 eviction (a top-level "eviction" entry, capacity from the adapter) against the adapter
    while the store controller keeps writing and prefetches keep loading: usage is brought back under the
    watermark through `delete`, the adapter's counters match the store, and every key still held loads
    bit-exact after L1 is cleared; evicted keys are clean misses."""
    from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, PrefetchTaskSpec
    from lmcache.v1.distributed.config import parse_args
    from lmcache.v1.distributed.storage_manager import StorageManager

    capacity = 24 * SIZE
    spec = {"type": "plugin", "module_path": "blockstore.connector.l2_adapter", "class_name": "BlockstoreL2Adapter",
            "adapter_params": {"path": str(tmp_path / "kv"), "capacity_bytes": capacity, "block_size": 65536},
            "eviction": {"eviction_policy": "LRU", "trigger_watermark": 0.5, "eviction_ratio": 0.3}}
    sm = StorageManager(parse_args(["--l1-size-gb", "0.05", "--eviction-policy", "LRU",
                                    "--l2-adapter", json.dumps(spec)]))
    layout = MemoryLayoutDesc(shapes=[SHAPE], dtypes=[torch.float32])

    def payload(i: int) -> Any:
        return torch.full(tuple(SHAPE), float(i)) + torch.arange(SHAPE.numel()).reshape(SHAPE) / 1000

    def prefetch(keys: list[ObjectKey]) -> tuple[int, list[bool]]:
        """A "full" (non-prefix, blend-style) prefetch: every key found anywhere is loaded; hits are checked."""
        handle = sm.submit_prefetch_task(PrefetchTaskSpec(
            key_groups=[GroupedObjectKeys(keys=keys, object_group_id=0, layout_desc=layout)], fetching_policy="full"))
        assert sm.wait_prefetch_status(handle, TIMEOUT)
        result = sm.query_prefetch_status(handle)
        assert result is not None
        hit = set(result.hit_cells[0].get_indices_list())
        got = [k for i, k in enumerate(keys) if i in hit]
        if got:
            with sm.read_prefetched_results(got, result.l1_owners) as objs:
                assert objs is not None
                for k, o in zip(got, objs):
                    assert torch.equal(o.tensor, payload(int.from_bytes(k.chunk_hash[:4], "big")))
            sm.finish_read_prefetched(got, 1, result.l1_owners)
        return result.l2_hit_count, [i in hit for i in range(len(keys))]

    try:
        [(_desc, adapter)] = sm.l2_adapters()
        written: list[ObjectKey] = []
        for rnd in range(6):  # 6 rounds of 8 chunks: twice the capacity, under reads of the previous round
            keys = [okey(rnd * 8 + j) for j in range(8)]
            reserved = sm.reserve_write(keys, layout)
            for k in keys:
                reserved[k].tensor.copy_(payload(int.from_bytes(k.chunk_hash[:4], "big")))
            sm.finish_write(keys)
            written += keys
            if rnd:
                prefetch(written[-16:-8])
        deadline = time.monotonic() + 30
        while True:  # the store controller drains, then LMCache's eviction thread (a pass a second) deletes
            st = adapter.report_status()
            if (st["counters"]["keys_stored"] + st["counters"]["skipped_capacity"] >= len(written)
                    and adapter.get_usage().usage_fraction < 0.5):
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        c = adapter.report_status()["counters"]
        assert c["keys_deleted"] > c["evicted_for_capacity"]  # LMCache's eviction deleted through the adapter
        with blockstore.open(tmp_path / "kv", read_only=True) as s:
            assert adapter.get_usage().total_bytes_used == s.stats().records * SIZE == adapter.report_status()["used_bytes"]
        time.sleep(0.3)
        sm.clear(force=True)
        l2_hits, ok = prefetch(written)
        assert 0 < l2_hits < len(written) and sum(ok) == l2_hits  # what is held loads bit-exact; the rest misses
        assert sm.report_status()["is_healthy"]
    finally:
        sm.close()


# ------------------------------------------- issue 13, item 8: listener replay, failed constructor, config

class Exact(Listener):
    """A listener that checks it hears of each record exactly once: a second "stored" for a key it holds, or a
    "deleted" for a key it never heard of, is recorded as an error."""

    def __init__(self, slow: float = 0.0) -> None:
        super().__init__()
        self.held: dict[ObjectKey, int] = {}
        self.errors: list[str] = []
        self.calls: list[int] = []
        self.slow = slow
        self._mu = threading.Lock()

    def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        with self._mu:
            self.calls.append(len(keys))
            for k, n in zip(keys, sizes):
                if k in self.held:
                    self.errors.append(f"stored twice: {k.chunk_hash[:4].hex()}")
                self.held[k] = n
        if self.slow:
            time.sleep(self.slow)  # widens the window in which stores and deletes race the replay
        super().on_l2_keys_stored(keys, sizes)

    def on_l2_keys_deleted(self, keys: list[ObjectKey]) -> None:
        with self._mu:
            for k in keys:
                if self.held.pop(k, None) is None:
                    self.errors.append(f"deleted but never stored: {k.chunk_hash[:4].hex()}")
        super().on_l2_keys_deleted(keys)


def held_records(a: BlockstoreL2Adapter) -> dict[ObjectKey, int]:
    return dict(records_held(a.store))


def test_listener_registered_after_stores_hears_every_record(make: Callable[..., BlockstoreL2Adapter],
                                                            arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh store (nothing recovered at start): a listener registered after records were stored hears of each
    of them once, streamed in REPLAY_BATCH batches, then of later stores and deletes as they happen."""
    from blockstore.connector import l2_listeners

    monkeypatch.setattr(l2_listeners, "REPLAY_BATCH", 2)
    a = make()
    assert a.recovered_keys == 0
    keys = [okey(i, salt="s" if i % 3 == 0 else "") for i in range(6)]
    store(a, keys, [arena.new(fill=i) for i in range(6)])
    a.delete([keys[5]])
    first = Exact()
    a.register_listener(first)
    assert first.held == {k: SIZE for k in keys[:5]} and first.calls == [2, 2, 1] and not first.errors

    store(a, [okey(10)], [arena.new(fill=10)])  # after registration: reported normally
    store(a, keys[:2], [arena.new(fill=i) for i in range(2)])  # duplicates: not reported again
    a.delete([keys[0]])
    second = Exact()  # registered later still: hears what is held now
    a.register_listener(second)
    store(a, [okey(11)], [arena.new(fill=11)])
    a.delete([keys[1], okey(10)])
    for lst in (first, second):
        assert not lst.errors
        assert lst.held == held_records(a) == {k: SIZE for k in [keys[2], keys[3], keys[4], okey(11)]}
    assert first.deleted == [keys[0], keys[1], okey(10)]
    assert second.deleted == [keys[1], okey(10)]


@pytest.mark.parametrize("restarted", [False, True], ids=["fresh", "restarted"])
def test_replay_races_in_flight_stores_and_deletes_exactly_once(make: Callable[..., BlockstoreL2Adapter],
                                                               arena: Arena, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               restarted: bool) -> None:
    """A listener registered while store and delete tasks are in flight hears of every record exactly once: a
    new record already written but not yet announced, a new record written after the replay passed it, a
    duplicate store of a record the replay reaches while the duplicate is in flight, a replacement by another
    layout, and a delete already done but not yet announced (never reported: the listener never heard of it)."""
    from blockstore.connector import l2_listeners

    monkeypatch.setattr(l2_listeners, "REPLAY_BATCH", 2)
    path = str(tmp_path / "race")
    a = make(path=path)
    base = [okey(i) for i in range(8)]
    store(a, base, [arena.new(fill=i) for i in range(8)])
    if restarted:  # the old code replayed only after a restart, and then reported in-flight keys twice
        a.close()
        a = make(path=path)
        assert a.recovered_keys == 8

    kb = {encode_object_key(k): k for k in [*base, okey(20), okey(21)]}
    write_then_wait, wait_then_write = okey(20), okey(21)
    dup, replaced, deleted = base[3], base[5], base[6]
    release = threading.Event()
    parked: list[str] = []
    parked_cv = threading.Condition()

    def park(what: str) -> None:
        with parked_cv:
            parked.append(what)
            parked_cv.notify_all()
        assert release.wait(TIMEOUT)

    real_put, real_delete, real_locate = a.store.put_many, a.store.delete_many, a.store.locate_many

    def put_many(items: Any, **kw: Any) -> Any:
        names = {kb.get(bytes(k)) for k, _ in items}
        if wait_then_write in names:
            park("put-before")
            return real_put(items, **kw)
        out = real_put(items, **kw)
        if write_then_wait in names or replaced in names:
            park("put-after")
        return out

    def delete_many(keys: Any, **kw: Any) -> Any:
        out = real_delete(keys, **kw)
        if deleted in {kb.get(bytes(k)) for k in keys}:
            park("delete-after")
        return out

    def locate_many(keys: Any, **kw: Any) -> Any:
        out = real_locate(keys, **kw)
        if (threading.current_thread().name.startswith("blockstore-l2-store") and not release.is_set()
                and [kb.get(bytes(k)) for k in keys] == [dup]):
            park("dup-located")  # the store task holds its claim on a key the replay is about to reach
        return out

    monkeypatch.setattr(a.store, "put_many", put_many)
    monkeypatch.setattr(a.store, "delete_many", delete_many)
    monkeypatch.setattr(a.store, "locate_many", locate_many)

    other = arena.new(shape=torch.Size([2, 2, 32, 32]), fill=55)  # another layout: replaces base[5]
    tids = [a.submit_store_task([write_then_wait], [arena.new(fill=20)]),
            a.submit_store_task([wait_then_write], [arena.new(fill=21)]),
            a.submit_store_task([dup], [arena.new(fill=3)]),
            a.submit_store_task([replaced], [other])]
    deleter = threading.Thread(target=a.delete, args=([deleted],))
    deleter.start()
    with parked_cv:
        assert parked_cv.wait_for(lambda: len(parked) == 5, TIMEOUT), parked
    listener = Exact()
    a.register_listener(listener)  # replays while all five tasks are in flight
    untouched = {k for k in base if k not in (dup, replaced, deleted)}
    assert not listener.errors and untouched <= set(listener.held) <= set(base)
    release.set()
    deleter.join(TIMEOUT)
    results: dict[int, L2StoreResult] = {}
    deadline = time.monotonic() + TIMEOUT
    while not set(tids) <= set(results):
        assert time.monotonic() < deadline
        _drain(a.get_store_event_fd())
        results.update(a.pop_completed_store_tasks())
    assert all(results[t].is_successful() for t in tids)

    assert not listener.errors, listener.errors
    want = held_records(a)
    assert deleted not in want and want[replaced] == other.get_size() and dup in want
    assert write_then_wait in want and wait_then_write in want
    assert listener.held == want
    assert deleted not in listener.deleted  # it was gone before the listener could hear of it
    a.delete([write_then_wait, dup])
    assert listener.held == held_records(a) and not listener.errors


def test_listeners_registered_under_concurrent_stores_and_deletes(make: Callable[..., BlockstoreL2Adapter],
                                                                  arena: Arena,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores and deletes from several threads while listeners register at different times (small replay
    batches, a slow listener): each ends holding exactly the records the store holds, with no double report."""
    from blockstore.connector import l2_listeners

    monkeypatch.setattr(l2_listeners, "REPLAY_BATCH", 3)
    a = make(workers=4)
    c = Collector(a)
    src = [arena.new(fill=i) for i in range(8)]
    store(a, [okey(i) for i in range(40)], [src[i % 8] for i in range(40)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(t: int) -> None:
        try:
            i = 0
            while not stop.is_set() and i < 60:
                ks = [okey(1000 * (t + 1) + i + j) for j in range(3)]
                assert c.store(ks, [src[(i + j) % 8] for j in range(3)]).is_successful()
                a.delete([ks[0], okey((i * 7 + t) % 40)])
                i += 3
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    listeners = []
    for _ in range(3):
        time.sleep(0.02)
        lst = Exact(slow=0.002)
        a.register_listener(lst)
        listeners.append(lst)
    stop.set()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors
    want = held_records(a)
    for lst in listeners:
        assert not lst.errors, lst.errors[:5]
        assert lst.held == want


def test_failed_validation_opens_nothing(tmp_path: Path) -> None:
    """workers=0 used to pass a directly built config, open (and lock) the store, then fail creating the pool,
    leaving the store locked by this very process."""
    from blockstore.errors import InvalidArgument

    path = tmp_path / "kv"
    with pytest.raises(InvalidArgument, match="'workers'"):
        BlockstoreL2Adapter(BlockstoreL2AdapterConfig(str(path), workers=0, compaction=None))
    with pytest.raises(InvalidArgument, match="'workers'"):
        BlockstoreL2Adapter({"path": str(path), "workers": 0})
    assert not path.exists()  # validated before anything was opened
    a = BlockstoreL2Adapter({"path": str(path), "compaction": None})
    a.close()


@pytest.mark.parametrize("where", ["seed", "third_fd", "second_pool"])
def test_failed_constructor_closes_what_it_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  where: str) -> None:
    """An exception anywhere after the store was opened: the store (and its compaction thread), the event fds
    made so far and the thread pools are closed, so another adapter opens the same path straight away."""
    from blockstore.connector import l2_adapter

    path = str(tmp_path / "kv")
    notifiers: list[Any] = []
    pools: list[Any] = []
    real_notifier, real_pool = l2_adapter.create_event_notifier, l2_adapter.ThreadPoolExecutor

    def notifier() -> Any:
        if where == "third_fd" and len(notifiers) == 2:
            raise OSError(24, "Too many open files")
        notifiers.append(real_notifier())
        return notifiers[-1]

    def pool(*args: Any, **kw: Any) -> Any:
        if where == "second_pool" and len(pools) == 1:
            raise RuntimeError("can't start new thread")
        pools.append(real_pool(*args, **kw))
        return pools[-1]

    def seed(self: BlockstoreL2Adapter) -> None:
        raise RuntimeError("directory read failed")

    monkeypatch.setattr(l2_adapter, "create_event_notifier", notifier)
    monkeypatch.setattr(l2_adapter, "ThreadPoolExecutor", pool)
    if where == "seed":
        monkeypatch.setattr(BlockstoreL2Adapter, "_seed_counters", seed)
    threads_before = set(threading.enumerate())
    with pytest.raises((OSError, RuntimeError)):
        BlockstoreL2Adapter({"path": path, "compaction": "full"})
    assert all(n.fileno() == -1 for n in notifiers)  # every fd made so far is closed
    assert all(p._shutdown for p in pools)
    deadline = time.monotonic() + TIMEOUT
    while set(threading.enumerate()) - threads_before:  # the compactor's thread, if any, has ended
        assert time.monotonic() < deadline, set(threading.enumerate()) - threads_before
        time.sleep(0.01)
    monkeypatch.undo()
    b = BlockstoreL2Adapter({"path": path, "compaction": None})  # not locked by the failed attempt
    b.close()


BAD_FIELDS = [
    ("path", ""), ("path", "   "), ("path", 3), ("path", None),
    ("durability", "fsync"), ("durability", None),
    ("block_size", 1000), ("block_size", "64M"), ("block_size", 1 << 41), ("block_size", True),
    ("capacity_bytes", -1), ("capacity_bytes", 1.5), ("capacity_bytes", True), ("capacity_bytes", None),
    ("compaction", "bogus"), ("compaction", 5), ("compaction", {"policy": "full", "gc_invalid_ratio": 7}),
    ("workers", 0), ("workers", "4"), ("workers", 257), ("workers", 2.0), ("workers", False),
    ("lock_ttl_s", -1), ("lock_ttl_s", "10"), ("lock_ttl_s", True), ("lock_ttl_s", float("nan")),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_config_is_validated_however_it_is_built(field: str, value: Any) -> None:
    """One validator: direct construction, from_dict and dataclasses.replace all reject a bad value with
    blockstore's InvalidArgument naming the field."""
    import dataclasses

    from blockstore.errors import InvalidArgument

    params: dict[str, Any] = {"path": "/tmp/kv", field: value}
    path = params.pop("path")
    with pytest.raises(InvalidArgument, match=f"'{field}'"):
        BlockstoreL2AdapterConfig(path, **params)
    with pytest.raises(InvalidArgument, match=f"'{field}'"):
        BlockstoreL2AdapterConfig.from_dict({"path": path, **params})
    good = BlockstoreL2AdapterConfig("/tmp/kv")
    with pytest.raises(InvalidArgument, match=f"'{field}'"):
        dataclasses.replace(good, **{field: value})


def test_config_direct_construction_normalizes_and_is_immutable() -> None:
    import dataclasses

    cfg = BlockstoreL2AdapterConfig("/tmp/kv", compaction="none", lock_ttl_s=5)
    assert cfg.compaction is None and cfg.lock_ttl_s == 5.0 and isinstance(cfg.lock_ttl_s, float)
    assert BlockstoreL2AdapterConfig("/tmp/kv", compaction=False).compaction is None
    assert cfg == BlockstoreL2AdapterConfig.from_dict({"path": "/tmp/kv", "compaction": "none", "lock_ttl_s": 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 0  # type: ignore[misc]
