"""The public Store API on both backends: return values, batched reads into aligned or caller memory,
stats, block rotation and reclamation, tensors, chunk records, and concurrency."""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import xxhash

import blockstore
from blockstore.purepy import PythonBackend
from blockstore.records import BLOCK_HEADER_SIZE, ScanStop

MiB = 1 << 20


def _val(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _addr(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


@pytest.fixture
def store(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    s = blockstore.open(tmp_path / "s", backend=backend)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# basic calls and their return values


def test_put_get_update_delete(store: blockstore.Store) -> None:
    assert store.put(b"k", b"v1") is None
    assert store.get(b"k") == b"v1"
    assert isinstance(store.get(b"k"), bytes)
    assert store.put(b"k", bytearray(b"v2-longer")) is None  # update: any buffer
    assert store.get(b"k") == b"v2-longer"
    assert store.get(b"missing") is None
    assert store.delete(b"k") is True
    assert store.get(b"k") is None
    assert store.delete(b"k") is False
    assert store.delete(b"never") is False
    store.put(b"k", b"")  # an empty value is a value, not a miss
    assert store.get(b"k") == b""
    assert store.contains_many([b"k"]) == [True]
    store.put(b"np", np.arange(5, dtype=np.int32))  # a multi-byte-format buffer is stored as its bytes
    assert store.get(b"np") == np.arange(5, dtype=np.int32).tobytes()
    store.put(b"mv", memoryview(b"abcdef")[2:4])
    assert store.get(b"mv") == b"cd"
    assert store.stats().records == 3


def test_put_many_get_many(store: blockstore.Store) -> None:
    items = [(b"k%d" % i, _val(n, i)) for i, n in enumerate([0, 1, 100, 4095, 4096, 4097, 100_000, MiB])]
    assert store.put_many(items) is None
    keys = [k for k, _ in items]
    got = store.get_many(keys + [b"missing"])
    assert got[-1] is None
    assert [bytes(g) for g in got[:-1]] == [v for _, v in items]
    assert all(isinstance(g, memoryview) for g in got[:-1])
    # returned views are page-aligned
    for g in got[:-1]:
        if len(g):
            assert _addr(g) % 4096 == 0, "returned memoryview is not page-aligned"
    # into caller memory: lengths returned, None for a miss, buffers filled in place
    bufs = [bytearray(len(v) + 3) for _, v in items] + [bytearray(8)]
    lens = store.get_many(keys + [b"missing"], out=bufs)
    assert lens == [len(v) for _, v in items] + [None]
    assert [bytes(b[:n]) for b, n in zip(bufs, lens[:-1])] == [v for _, v in items]
    assert bufs[-1] == bytearray(8)
    # numpy and mmap destinations work, zero-copy
    arr = np.zeros(MiB, np.uint8)
    ptr = arr.__array_interface__["data"][0]
    assert store.get_many([b"k7"], out=[arr]) == [MiB]
    assert arr.__array_interface__["data"][0] == ptr and arr.tobytes() == items[7][1]
    f32 = np.zeros(1024, np.float32)  # 4096 bytes, any dtype
    assert store.get_many([b"k4"], out=[f32]) == [4096]
    assert f32.tobytes() == items[4][1]
    # order and duplicates are kept
    rev = store.get_many(list(reversed(keys)) + [keys[2], keys[2]])
    assert [bytes(g) for g in rev] == [v for _, v in reversed(items)] + [items[2][1]] * 2
    assert store.get_many([]) == []


def test_contains_many_and_iter_keys(store: blockstore.Store) -> None:
    keys = [b"user:1", b"user:2", b"user:10", b"item:1", b"u", b"\xff\x00"]
    store.put_many([(k, b"x") for k in keys])
    store.delete(b"user:2")
    assert store.contains_many([b"user:1", b"user:2", b"nope", b"\xff\x00"]) == [True, False, False, True]
    assert list(store.iter_keys()) == sorted(set(keys) - {b"user:2"})
    assert list(store.iter_keys(prefix=b"user:")) == [b"user:1", b"user:10"]
    assert list(store.iter_keys(prefix=b"u")) == [b"u", b"user:1", b"user:10"]
    assert list(store.iter_keys(prefix=b"\xff")) == [b"\xff\x00"]
    assert list(store.iter_keys(prefix=b"zzz")) == []
    assert store.contains_many([]) == []


def test_delete_many(store: blockstore.Store) -> None:
    store.put_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    assert store.delete_many([b"a", b"x", b"c", b"a"]) == [True, False, True, False]
    assert [store.get(k) for k in (b"a", b"b", b"c")] == [None, b"2", None]
    assert store.stats().records == 1
    assert store.delete_many([]) == []


def test_put_many_with_metas_and_duplicates(store: blockstore.Store) -> None:
    store.put_many([(b"a", b"first"), (b"b", b"x"), (b"a", b"second")], metas=[b"m1", b"m2", b"m3"])
    assert store.get(b"a") == b"second"
    assert store.locate_many([b"a"])[0].meta == b"m3"  # type: ignore[union-attr]
    assert store.stats().records == 2


def test_values_survive_reopen(tmp_path: Path, backend: str) -> None:
    items = {b"k%d" % i: _val(n, i) for i, n in enumerate([0, 7, 4096, 200_000])}
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        s.put_many(list(items.items()))
        s.put(b"k1", b"updated")
        s.delete(b"k0")
    items[b"k1"] = b"updated"
    del items[b"k0"]
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        assert {k: s.get(k) for k in items} == items
        assert s.get(b"k0") is None
        assert s.stats().records == 3


# ---------------------------------------------------------------------------------------------
# stats


def test_stats(store: blockstore.Store) -> None:
    st0 = store.stats()
    assert st0.records == 0 and st0.live_bytes == 0 and st0.write_amplification == 0.0
    vals = {b"k%d" % i: _val(50_000, i) for i in range(10)}
    store.put_many(list(vals.items()))
    st = store.stats()
    assert st.records == 10
    assert st.live_logical_bytes == sum(len(k) + len(v) for k, v in vals.items())
    assert st.live_bytes >= st.live_logical_bytes + 10 * 64
    assert st.live_bytes == st.written_bytes  # nothing dead yet
    assert st.bytes_put == st.live_logical_bytes
    assert st.bytes_appended == st.written_bytes
    assert st.write_amplification >= 1.0
    assert st.write_amplification == pytest.approx(st.bytes_appended / st.bytes_put)
    assert st.space_amplification >= 1.0
    assert st.space_amplification == pytest.approx((st.block_file_bytes + st.directory_bytes) / st.live_logical_bytes)
    assert st.blocks == 1 and st.open_blocks == 1 and st.block_file_bytes >= st.written_bytes + BLOCK_HEADER_SIZE
    # overwrite half: records stay, dead bytes appear, write amplification grows
    store.put_many([(k, _val(50_000, 100 + i)) for i, k in enumerate(list(vals)[:5])])
    st2 = store.stats()
    assert st2.records == 10
    assert st2.written_bytes > st2.live_bytes
    assert st2.bytes_put == 2 * st.bytes_put - sum(len(k) + len(v) for k, v in list(vals.items())[5:])
    store.delete(b"k9")
    st3 = store.stats()
    assert st3.records == 9 and st3.live_logical_bytes == st2.live_logical_bytes - len(b"k9") - 50_000
    d = st3.as_dict()
    assert d["records"] == 9 and set(d) >= {"records", "live_bytes", "space_amplification", "write_amplification"}


def test_stats_persist_across_reopen(tmp_path: Path, backend: str) -> None:
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        s.put_many([(b"k%d" % i, _val(1000, i)) for i in range(20)])
        before = s.stats()
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        after = s.stats()
    for f in ("records", "live_bytes", "live_logical_bytes", "written_bytes", "bytes_put", "bytes_appended"):
        assert getattr(after, f) == getattr(before, f), f
    assert after.open_blocks == 0


# ---------------------------------------------------------------------------------------------
# blocks: rotation, footers, reclamation


def _footers(path: Path) -> dict[int, object]:
    b = PythonBackend()
    out = {}
    for f in sorted((path / "blocks").iterdir()):
        raw = f.read_bytes()
        out[int(f.name[:16], 16)] = (b.decode_footer(raw[-64:]), raw)
    return out


def test_rotation_gives_several_blocks_with_valid_footers(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    vals = {b"k%02d" % i: _val(150_000, i) for i in range(20)}  # ~3 MiB into 1 MiB blocks
    with blockstore.open(path, backend=backend, block_size=MiB) as s:
        for k, v in vals.items():
            s.put(k, v)
        table = s.block_table()
        assert len(table) >= 3
        sealed = [e for e in table if e.state == 2]
        assert len(sealed) >= 2 and sum(e.state == 1 for e in table) == 1
        # sealed while the store is open: footers are already there
        for e in sealed:
            raw = (path / "blocks" / f"{e.block_id:016x}.blk").read_bytes()
            f = PythonBackend().decode_footer(raw[-64:])
            assert f.block_id == e.block_id and f.data_end == len(raw) - 64 == e.data_end
            assert len(raw) <= MiB
        assert s.stats().blocks == len(table)
        assert [s.get(k) for k in vals] == list(vals.values())
    b = PythonBackend()
    for bid, (f, raw) in _footers(path).items():  # type: ignore[misc]
        assert f.block_id == bid and f.data_end == len(raw) - 64
        h = b.decode_block_header(raw)
        assert h.block_id == bid
        fd = b.open_ro(str(path / "blocks" / f"{bid:016x}.blk"))
        try:
            res = b.scan(fd, BLOCK_HEADER_SIZE, len(raw), True)
        finally:
            b.close(fd)
        assert res.stop == ScanStop.END and res.next_offset == f.data_end
        assert len(res.records) == f.record_count
        assert all(r.payload_ok for r in res.records)
        assert f.min_seq == min(r.info.seq for r in res.records) and f.max_seq == max(r.info.seq for r in res.records)
    with blockstore.open(path, backend=backend) as s:
        assert [s.get(k) for k in vals] == list(vals.values())


def test_one_big_record_gets_a_block_of_its_own(tmp_path: Path, backend: str) -> None:
    with blockstore.open(tmp_path / "s", backend=backend, block_size=MiB) as s:
        s.put(b"small", b"x")
        big = _val(3 * MiB, 1)
        s.put(b"big", big)
        s.put(b"small2", b"y")
        assert s.get(b"big") == big
        locs = s.locate_many([b"small", b"big", b"small2"])
        assert len({loc.block_id for loc in locs}) >= 2  # type: ignore[union-attr]
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        assert s.get(b"big") == big and s.get(b"small2") == b"y"


def test_fully_overwritten_block_is_deleted(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, backend=backend, block_size=MiB) as s:
        keys = [b"k%02d" % i for i in range(12)]
        for i, k in enumerate(keys):
            s.put(k, _val(200_000, i))
        first = s.block_table()[0]
        assert first.state == 2  # sealed by rotation
        f = path / "blocks" / f"{first.block_id:016x}.blk"
        assert f.exists()
        in_first = [k for k, loc in zip(keys, s.locate_many(keys)) if loc.block_id == first.block_id]  # type: ignore[union-attr]
        assert len(in_first) >= 2
        for k in in_first[:-1]:
            s.put(k, b"overwritten")
        assert f.exists(), "a block with a live record must stay"
        s.put(in_first[-1], b"overwritten")
        assert not f.exists(), "a sealed block with nothing live must be deleted"
        assert first.block_id not in {e.block_id for e in s.block_table()}
        assert all(s.get(k) == b"overwritten" for k in in_first)
        assert s.stats().records == len(keys)
    with blockstore.open(path, backend=backend) as s:
        assert not f.exists()
        assert all(s.get(k) == b"overwritten" for k in in_first)


def test_block_reclamation_waits_for_tombstones(tmp_path: Path, backend: str) -> None:
    """docs/format.md §5.2: a sealed block with nothing live and no tombstones is deleted; one that
    holds a tombstone is kept (until compaction)."""
    path = tmp_path / "s"
    with blockstore.open(path, backend=backend, block_size=MiB) as s:
        s.put(b"a", _val(600_000, 1))
        s.put(b"b", _val(600_000, 2))  # rotates: the first block holds only a
        t = s.block_table()
        assert len(t) == 2
        first, second = (path / "blocks" / f"{e.block_id:016x}.blk" for e in t)
        s.delete(b"a")  # the tombstone goes to the open (second) block
        assert not first.exists(), "sealed block with nothing live and no tombstone must go"
        s.put(b"b", _val(600_000, 3))  # rotates the second block, whose only live record is now dead
        assert second.exists(), "a block holding a tombstone must be kept"
        assert s.get(b"a") is None and s.get(b"b") == _val(600_000, 3) and s.stats().records == 1
    with blockstore.open(path, backend=backend) as s:
        assert s.get(b"a") is None and s.get(b"b") == _val(600_000, 3)


def test_reads_from_an_open_and_a_sealed_block_in_one_call(tmp_path: Path, backend: str) -> None:
    with blockstore.open(tmp_path / "s", backend=backend, block_size=MiB) as s:
        vals = {b"k%d" % i: _val(300_000, i) for i in range(7)}
        s.put_many(list(vals.items()))
        assert len({loc.block_id for loc in s.locate_many(list(vals))}) >= 2  # type: ignore[union-attr]
        assert [bytes(v) for v in s.get_many(list(vals))] == list(vals.values())


# ---------------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8])
@pytest.mark.parametrize("shape", [(2, 8, 256, 4, 16), (1,), (3, 5), (0, 4), ()], ids=str)
def test_tensor_round_trip(store: blockstore.Store, dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(7)
    t = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
    assert t.shape == shape
    store.put_tensor(b"t", t, ns="model")
    got = store.get_tensor(b"t", ns="model")
    assert isinstance(got, np.ndarray)
    assert got.dtype == t.dtype and got.shape == t.shape, f"{got.dtype}{got.shape} != {t.dtype}{t.shape}"
    assert np.array_equal(got, t)


def test_tensor_into_preallocated_array(store: blockstore.Store) -> None:
    t = np.random.default_rng(1).standard_normal((2, 8, 64, 4, 16)).astype(np.float16)
    store.put_tensor(b"kv", t)
    out = np.zeros_like(t)
    ptr = out.__array_interface__["data"][0]
    assert store.get_tensor(b"kv", out=out) is out
    assert out.__array_interface__["data"][0] == ptr and np.array_equal(out, t)
    store.put_tensors([(b"a", t[0]), (b"b", t[1])])
    outs = [np.empty_like(t[0]), np.empty_like(t[1])]
    got = store.get_tensors([b"a", b"missing", b"b"], out=[outs[0], np.empty(1), outs[1]])
    assert got[0] is outs[0] and got[1] is None and got[2] is outs[1]
    assert np.array_equal(outs[0], t[0]) and np.array_equal(outs[1], t[1])


def test_tensor_out_mismatch_is_invalid(store: blockstore.Store) -> None:
    store.put_tensor(b"kv", np.ones((4, 8), np.float32))
    for bad in (np.empty((8, 4), np.float32), np.empty((4, 8), np.float16), np.empty((4, 8, 1), np.float32),
                np.empty(32, np.float32)):
        with pytest.raises(blockstore.InvalidArgument):
            store.get_tensor(b"kv", out=bad)
    assert np.array_equal(store.get_tensor(b"kv"), np.ones((4, 8), np.float32))


def test_non_contiguous_tensor_is_stored_in_c_order(store: blockstore.Store) -> None:
    t = np.arange(24, dtype=np.float32).reshape(4, 6).T
    store.put_tensor(b"t", t)
    got = store.get_tensor(b"t")
    assert got.shape == (6, 4) and np.array_equal(got, t) and got.flags.c_contiguous


def test_tensor_meta_is_json_with_dtype_and_shape(store: blockstore.Store) -> None:
    import json

    store.put_tensor(b"t", np.zeros((2, 3), np.float16))
    meta = json.loads(store.locate_many([b"t"])[0].meta)  # type: ignore[union-attr]
    assert meta["shape"] == [2, 3] and np.dtype(meta["dtype"]) == np.float16


# ---------------------------------------------------------------------------------------------
# chunk records


def test_chunk_put_get_update_list_delete(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, backend=backend) as s:
        s.put_chunk("alice", "s1", "c1", "first memory", meta={"turn": 1, "tags": ["a"]}, kv_keys=[b"kv-0", b"\x00\xff"],
                    ts_ns=300)
        s.put_chunk("alice", "s1", "c2", "second", ts_ns=100)
        s.put_chunk("alice", "s1", "c3", "third", ts_ns=200)
        s.put_chunk("alice", "s2", "c1", "other session", ts_ns=1)
        s.put_chunk("bob", "s1", "c1", "other user", ts_ns=1)
        c = s.get_chunk("alice", "s1", "c1")
        assert c is not None
        assert (c.user_id, c.session_id, c.chunk_id, c.text, c.ts_ns) == ("alice", "s1", "c1", "first memory", 300)
        assert c.meta == {"turn": 1, "tags": ["a"]} and c.kv_keys == (b"kv-0", b"\x00\xff")
        assert [x.chunk_id for x in s.list_chunks("alice", "s1")] == ["c2", "c3", "c1"]  # by timestamp
        assert s.stats().records == 5
        # update: still one record, new content and position in time
        s.put_chunk("alice", "s1", "c1", "first memory, edited", meta={"turn": 2}, ts_ns=50)
        assert s.stats().records == 5
        lst = s.list_chunks("alice", "s1")
        assert [x.chunk_id for x in lst] == ["c1", "c2", "c3"]
        assert lst[0].text == "first memory, edited" and lst[0].meta == {"turn": 2} and lst[0].kv_keys == ()
        assert s.delete_chunk("alice", "s1", "c2") is True
        assert s.delete_chunk("alice", "s1", "c2") is False
        assert s.get_chunk("alice", "s1", "c2") is None
        assert [x.chunk_id for x in s.list_chunks("alice", "s1")] == ["c1", "c3"]
        assert s.get_chunks([("alice", "s1", "c3"), ("alice", "s1", "c2"), ("bob", "s1", "c1")])[1] is None
        assert s.stats().records == 4
        assert list(s.iter_keys()) == []  # chunks are not KV keys
    with blockstore.open(path, backend=backend) as s:
        lst = s.list_chunks("alice", "s1")
        assert [(x.chunk_id, x.text, x.ts_ns) for x in lst] == [("c1", "first memory, edited", 50), ("c3", "third", 200)]
        assert s.list_chunks("alice", "s2")[0].text == "other session"
        assert s.stats().records == 4


def test_chunks_with_equal_timestamps_list_by_chunk_id(store: blockstore.Store) -> None:
    for cid in ("b", "c", "a"):
        store.put_chunk("u", "s", cid, cid * 3, ts_ns=7)
    assert [c.chunk_id for c in store.list_chunks("u", "s")] == ["a", "b", "c"]


def test_chunk_unicode_and_default_timestamp(store: blockstore.Store) -> None:
    store.put_chunk("ユーザー", "séance", "🧩", "texte ünïcode ✓")
    c = store.get_chunk("ユーザー", "séance", "🧩")
    assert c is not None and c.text == "texte ünïcode ✓" and c.ts_ns > 1_600_000_000 * 10**9


def test_put_chunks_writes_a_batch_in_one_commit(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    writes = [blockstore.ChunkWrite(f"u{i % 3}", "s", f"c{i}", f"text {i}", meta={"i": i}, kv_keys=(b"k%d" % i,),
                                    ts_ns=1000 - i) for i in range(50)]
    with blockstore.open(path, backend=backend) as s:
        s.put_chunks(writes)
        s.put_chunks([])
        assert s.stats().records == 50
        got = s.get_chunks([(w.user_id, w.session_id, w.chunk_id) for w in writes])
        assert [(c.text, c.meta, c.kv_keys, c.ts_ns) for c in got if c is not None] == \
            [(w.text, w.meta, w.kv_keys, w.ts_ns) for w in writes]
        # listed in time order within each session; an update replaces, a bad item is refused whole
        assert [c.chunk_id for c in s.list_chunks("u0", "s")][:2] == ["c48", "c45"]
        with pytest.raises(blockstore.InvalidArgument):
            s.put_chunks([blockstore.ChunkWrite("u0", "s", "c0", "x", meta={"bad": object()})])
        assert s.get_chunk("u0", "s", "c0").text == "text 0"  # type: ignore[union-attr]
    with blockstore.open(path, backend=backend) as s:
        assert s.stats().records == 50 and s.get_chunk("u2", "s", "c47").text == "text 47"  # type: ignore[union-attr]


def test_more_sessions_than_open_blocks_share_an_overflow_block(tmp_path: Path, backend: str) -> None:
    """Lone writes interleaved over many partitions must not seal a block per record (each chunk record
    of 10,000 sessions written round-robin made a block file of its own before the overflow stream),
    while a partition that writes several records at once, or again soon, still gets a block."""
    from blockstore.placement import OVERFLOW_PARTITION

    path = tmp_path / "s"
    users = 400  # more than the partitions remembered as written lately (64 per open slot: 256)
    with blockstore.open(path, backend=backend, max_open_blocks=4) as s:
        for rnd in range(3):
            for u in range(users):  # one chunk per call, as an agent saves a memory
                s.put_chunk(f"user{u}", "s", f"c{rnd}", "memory " * 20)
        blocks = s.block_table()
        # each round re-opens at most one block per slot (for the first sessions of the round, once the
        # previous round left every open block with two records), plus the overflow's; a block per
        # record made 1,200
        assert len(blocks) <= 3 * 4 + 1 + 2, [(b.block_id, b.partition) for b in blocks]
        assert any(b.partition == OVERFLOW_PARTITION for b in blocks)
        assert [c.chunk_id for c in s.list_chunks("user150", "s")] == ["c0", "c1", "c2"]
        # several records of one partition in one call: a block of its own
        s.put_many([(b"k%d" % i, b"v" * 100) for i in range(10)], partition="burst")
        # a lone record of a partition that wrote just before: a block of its own too
        s.put_chunk("alice", "s", "c0", "x")
        s.put_many([(b"filler%d" % i, b"f") for i in range(5)], partition="other")
        s.put_chunk("alice", "s", "c1", "y")
        parts = [b.partition for b in s.block_table()]
        assert b"default\0burst" in parts and sum(p.endswith(b"alice\x00\x01s") for p in parts) == 1, parts
    with blockstore.open(path, backend=backend, max_open_blocks=4) as s:
        assert s.stats().records == 3 * users + 10 + 5 + 2


def test_small_reads_are_page_aligned_and_independent(store: blockstore.Store) -> None:
    import ctypes

    from blockstore.reader import aligned_buffer

    for size in (1, 100, 4096, 5000, 64 << 10, (64 << 10) + 1):
        buf = aligned_buffer(size)
        assert len(buf) == size and not buf.readonly
        assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 4096 == 0
    store.put_many([(b"a", b"1" * 10), (b"b", b"2" * 10)])
    first = store.get_many([b"a"])[0]
    second = store.get_many([b"b"])[0]
    assert bytes(first) == b"1" * 10 and bytes(second) == b"2" * 10  # no shared arena between calls


# ---------------------------------------------------------------------------------------------
# concurrency


def test_concurrent_writers_sync_mode(tmp_path: Path, backend: str) -> None:
    """4 threads x 200 puts in sync mode (group commit): every acknowledged put is readable, now and
    after a reopen."""
    path = tmp_path / "s"
    errors: list[BaseException] = []
    with blockstore.open(path, backend=backend, durability="sync") as s:
        start = threading.Barrier(4)

        def writer(t: int) -> None:
            try:
                start.wait()
                for i in range(200):
                    s.put(b"t%d-%03d" % (t, i), _val(64 + (i % 7) * 300, t * 1000 + i))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
        keys = [b"t%d-%03d" % (t, i) for t in range(4) for i in range(200)]
        want = [_val(64 + (i % 7) * 300, t * 1000 + i) for t in range(4) for i in range(200)]
        assert [bytes(v) for v in s.get_many(keys)] == want
        assert s.stats().records == 800
        seqs = sorted(loc.seq for loc in s.locate_many(keys))  # type: ignore[union-attr]
        assert len(set(seqs)) == 800, "sequence numbers must be unique"
    with blockstore.open(path, backend=backend) as s:
        assert [bytes(v) for v in s.get_many(keys)] == want


def _versioned(key: bytes, version: int) -> bytes:
    r = random.Random(xxhash.xxh3_64_intdigest(key) ^ version)
    return key + struct.pack("<Q", version) + r.randbytes(r.choice([40, 5000, 120_000]))


def test_reads_concurrent_with_writes_never_see_wrong_bytes(tmp_path: Path, backend: str) -> None:
    """A writer overwrites 16 keys (1 MiB blocks, so blocks rotate and die and are deleted while
    readers run); readers check every value is one the writer wrote for that key, and that no key
    goes back to an older version."""
    keys = [b"key-%02d" % i for i in range(16)]
    errors: list[str] = []
    stop = threading.Event()
    reads = [0]
    with blockstore.open(tmp_path / "s", backend=backend, block_size=MiB) as s:
        s.put_many([(k, _versioned(k, 0)) for k in keys])

        def writer() -> None:
            v = 1
            try:
                while not stop.is_set() and v < 600:
                    k = keys[v % 16]
                    s.put(k, _versioned(k, v))
                    v += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(f"writer: {exc!r}")
            finally:
                stop.set()

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            seen: dict[bytes, int] = {}
            try:
                while not stop.is_set():
                    batch = rng.sample(keys, 5)
                    for k, got in zip(batch, s.get_many(batch)):
                        if got is None:
                            errors.append(f"{k!r} missing")
                            continue
                        b = bytes(got)
                        version = struct.unpack_from("<Q", b, len(k))[0]
                        if b != _versioned(k, version) or not b.startswith(k):
                            errors.append(f"{k!r}: wrong bytes")
                        if version < seen.get(k, 0):
                            errors.append(f"{k!r}: went back from version {seen[k]} to {version}")
                        seen[k] = version
                        reads[0] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(f"reader: {exc!r}")

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors[:5]
        assert reads[0] > 20
        assert len(s.block_table()) < 10, "dead blocks were not reclaimed"


def test_readers_in_threads_share_one_store(store: blockstore.Store) -> None:
    vals = {b"k%d" % i: _val(10_000, i) for i in range(50)}
    store.put_many(list(vals.items()))
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(50):
            ks = rng.sample(list(vals), 8)
            for k, g in zip(ks, store.get_many(ks)):
                if bytes(g) != vals[k]:
                    errors.append(k.decode())

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors


def test_page_aligned_with_ctypes(store: blockstore.Store) -> None:
    import ctypes

    store.put_many([(b"a", b"x" * 10), (b"b", b"y" * 5000), (b"c", b"z" * 3)])
    for v in store.get_many([b"a", b"b", b"c"]):
        addr = ctypes.addressof(ctypes.c_char.from_buffer(v))
        assert addr % 4096 == 0


@pytest.mark.parametrize("bad", [0, -1, 65537, 10**9, True, 2.0, "64"])
def test_max_open_blocks_out_of_range_is_refused(tmp_path: Path, bad: object) -> None:
    # each open block holds a descriptor: 10**9 was accepted (H66), and writes then failed with EMFILE
    with pytest.raises(blockstore.InvalidArgument, match=r"max_open_blocks must be an int in \[1, 65536\]"):
        blockstore.open(tmp_path / "s", max_open_blocks=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()
