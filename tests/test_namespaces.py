"""Namespaces isolate tenants and models: the same key in two namespaces names two records, and no
call made in one namespace can see, count, list or delete anything of another. Chunk records and
KV records live in separate key spaces of a namespace, so look-alike keys do not collide either."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import blockstore
from blockstore.chunks import encode_chunk_key

KEYS = [b"a", b"ab", b"abc", b"b", b"\x00", b"\xff" * 8]


def _val(ns: str, key: bytes) -> bytes:
    return ns.encode() + b"|" + key + b"|" + bytes(len(ns) * 100)


@pytest.fixture
def two(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    s = blockstore.open(tmp_path / "s", backend=backend)
    for ns in ("tenant-a", "tenant-b"):
        s.put_many([(k, _val(ns, k)) for k in KEYS], ns=ns)
    yield s
    s.close()


def test_same_keys_different_values(two: blockstore.Store) -> None:
    for ns in ("tenant-a", "tenant-b"):
        assert [two.get(k, ns=ns) for k in KEYS] == [_val(ns, k) for k in KEYS]
        assert [bytes(v) for v in two.get_many(KEYS, ns=ns)] == [_val(ns, k) for k in KEYS]
        bufs = [bytearray(200 * 8) for _ in KEYS]
        lens = two.get_many(KEYS, ns=ns, out=bufs)
        assert [bytes(b[:n]) for b, n in zip(bufs, lens)] == [_val(ns, k) for k in KEYS]
    # the default namespace and an unknown one see nothing
    for ns in ("default", "tenant-c", "tenant-a ", "Tenant-a", "tenant"):
        assert two.get_many(KEYS, ns=ns) == [None] * len(KEYS)
        assert two.contains_many(KEYS, ns=ns) == [False] * len(KEYS)
        assert list(two.iter_keys(ns=ns)) == []


def test_key_only_in_one_namespace(two: blockstore.Store) -> None:
    two.put(b"only-a", b"secret", ns="tenant-a")
    assert two.get(b"only-a", ns="tenant-a") == b"secret"
    assert two.get(b"only-a", ns="tenant-b") is None
    assert two.contains_many([b"only-a", b"a"], ns="tenant-b") == [False, True]
    assert two.contains_many([b"only-a", b"a"], ns="tenant-a") == [True, True]
    assert two.locate_many([b"only-a"], ns="tenant-b") == [None]


def test_iter_keys_is_per_namespace(two: blockstore.Store) -> None:
    two.put(b"zz-only-b", b"1", ns="tenant-b")
    assert list(two.iter_keys(ns="tenant-a")) == sorted(KEYS)
    assert list(two.iter_keys(ns="tenant-b")) == sorted(KEYS + [b"zz-only-b"])
    assert list(two.iter_keys(ns="tenant-a", prefix=b"a")) == [b"a", b"ab", b"abc"]
    assert list(two.iter_keys(ns="tenant-b", prefix=b"zz")) == [b"zz-only-b"]
    assert list(two.iter_keys(ns="tenant-a", prefix=b"zz")) == []


def test_delete_in_one_leaves_the_other(two: blockstore.Store) -> None:
    assert two.delete(b"a", ns="tenant-a") is True
    assert two.delete(b"a", ns="tenant-a") is False
    assert two.get(b"a", ns="tenant-a") is None
    assert two.get(b"a", ns="tenant-b") == _val("tenant-b", b"a")
    assert two.delete_many([b"ab", b"abc", b"nope"], ns="tenant-b") == [True, True, False]
    assert two.get_many([b"ab", b"abc"], ns="tenant-b") == [None, None]
    assert [two.get(k, ns="tenant-a") for k in (b"ab", b"abc")] == [_val("tenant-a", b"ab"), _val("tenant-a", b"abc")]
    # deleting in a namespace that never existed does nothing anywhere
    assert two.delete(b"b", ns="tenant-z") is False
    assert two.get(b"b", ns="tenant-a") is not None and two.get(b"b", ns="tenant-b") is not None
    assert {"tenant-a", "tenant-b"} <= set(two.namespaces())
    assert two.stats().records == 2 * len(KEYS) - 3


def test_overwrite_in_one_leaves_the_other(two: blockstore.Store) -> None:
    two.put(b"b", b"new in a", ns="tenant-a")
    assert two.get(b"b", ns="tenant-a") == b"new in a"
    assert two.get(b"b", ns="tenant-b") == _val("tenant-b", b"b")
    assert two.stats().records == 2 * len(KEYS)


def test_isolation_survives_reopen(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, backend=backend) as s:
        for ns in ("m-1", "m-2", "modèle-3"):
            s.put_many([(k, _val(ns, k)) for k in KEYS], ns=ns)
        s.delete(b"a", ns="m-2")
    with blockstore.open(path, backend=backend) as s:
        assert s.namespaces() == sorted(["m-1", "m-2", "modèle-3"])
        for ns in ("m-1", "m-2", "modèle-3"):
            want = [None if (ns, k) == ("m-2", b"a") else _val(ns, k) for k in KEYS]
            assert [s.get(k, ns=ns) for k in KEYS] == want
        assert list(s.iter_keys(ns="m-2")) == sorted(k for k in KEYS if k != b"a")


def test_namespaces_whose_names_are_prefixes_or_share_partitions(tmp_path: Path, backend: str) -> None:
    """"a" and "a\\0b" (which with partition "b" share a block partition with "a") and "ab": still
    three separate key spaces."""
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        s.put(b"k", b"in a", ns="a", partition="b")
        s.put(b"k", b"in a-nul-b", ns="a\x00b")
        s.put(b"k", b"in ab", ns="ab")
        s.put(b"k2", b"only ab", ns="ab")
        assert [s.get(b"k", ns=n) for n in ("a", "a\x00b", "ab")] == [b"in a", b"in a-nul-b", b"in ab"]
        assert s.get(b"k2", ns="a") is None and s.get(b"k2", ns="a\x00b") is None
        assert list(s.iter_keys(ns="a")) == [b"k"]
        assert list(s.iter_keys(ns="ab")) == [b"k", b"k2"]
        assert s.delete(b"k", ns="a\x00b")
        assert [s.get(b"k", ns=n) for n in ("a", "a\x00b", "ab")] == [b"in a", None, b"in ab"]


def test_chunks_are_per_namespace(two: blockstore.Store) -> None:
    for ns in ("tenant-a", "tenant-b"):
        for i, cid in enumerate(["c1", "c2", "c3"]):
            two.put_chunk("alice", "s1", cid, f"{ns} says {cid}", ts_ns=100 + i, meta={"ns": ns}, ns=ns)
    two.put_chunk("alice", "s1", "c4", "only in b", ts_ns=50, ns="tenant-b")
    a = two.list_chunks("alice", "s1", ns="tenant-a")
    b = two.list_chunks("alice", "s1", ns="tenant-b")
    assert [c.chunk_id for c in a] == ["c1", "c2", "c3"]
    assert [c.chunk_id for c in b] == ["c4", "c1", "c2", "c3"]
    assert all(c.text.startswith("tenant-a") and c.meta == {"ns": "tenant-a"} for c in a)
    assert all(c.text.startswith("tenant-b") or c.chunk_id == "c4" for c in b)
    assert two.list_chunks("alice", "s1") == [] and two.list_chunks("alice", "s1", ns="tenant-c") == []
    assert two.get_chunk("alice", "s1", "c4", ns="tenant-a") is None
    assert two.delete_chunk("alice", "s1", "c2", ns="tenant-a") is True
    assert two.delete_chunk("alice", "s1", "c4", ns="tenant-a") is False
    assert [c.chunk_id for c in two.list_chunks("alice", "s1", ns="tenant-a")] == ["c1", "c3"]
    assert [c.chunk_id for c in two.list_chunks("alice", "s1", ns="tenant-b")] == ["c4", "c1", "c2", "c3"]
    assert two.get_chunk("alice", "s1", "c2", ns="tenant-b").text == "tenant-b says c2"  # type: ignore[union-attr]
    # chunks do not show up as KV keys
    assert list(two.iter_keys(ns="tenant-a")) == sorted(KEYS)


def test_tensors_are_per_namespace(tmp_path: Path, backend: str) -> None:
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        a = np.arange(12, dtype=np.float16).reshape(3, 4)
        b = np.arange(6, dtype=np.int8)
        s.put_tensor(b"kv-0", a, ns="llama")
        s.put_tensor(b"kv-0", b, ns="mistral")
        ga, gb = s.get_tensor(b"kv-0", ns="llama"), s.get_tensor(b"kv-0", ns="mistral")
        assert ga.dtype == a.dtype and ga.shape == a.shape and np.array_equal(ga, a)
        assert gb.dtype == b.dtype and gb.shape == b.shape and np.array_equal(gb, b)
        assert s.get_tensor(b"kv-0") is None
        with pytest.raises(blockstore.InvalidArgument):  # the out shape of the other model's record
            s.get_tensor(b"kv-0", ns="mistral", out=np.empty((3, 4), np.float16))


def test_chunk_and_kv_look_alike_keys_do_not_collide(tmp_path: Path, backend: str) -> None:
    """A KV key equal to a chunk record's internal key, in the same namespace: two records."""
    look_alike = encode_chunk_key(b"u", b"s", b"c")
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        s.put_chunk("u", "s", "c", "the chunk", ts_ns=1)
        s.put(look_alike, b"the kv value")
        s.put(b"u", b"kv named like the user")
        assert s.get(look_alike) == b"the kv value"
        assert s.get_chunk("u", "s", "c").text == "the chunk"  # type: ignore[union-attr]
        assert list(s.iter_keys()) == sorted([look_alike, b"u"])
        assert s.stats().records == 3
        assert s.delete(look_alike) is True
        assert s.get_chunk("u", "s", "c").text == "the chunk"  # type: ignore[union-attr]
        s.put(look_alike, b"again")
        assert s.delete_chunk("u", "s", "c") is True
        assert s.get(look_alike) == b"again" and s.get_chunk("u", "s", "c") is None
        assert s.contains_many([look_alike]) == [True]
        s.put_chunk("u", "s", "c", "chunk again", ts_ns=2)
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        assert s.get(look_alike) == b"again" and s.get(b"u") == b"kv named like the user"
        assert [c.text for c in s.list_chunks("u", "s")] == ["chunk again"]
        assert s.stats().records == 3


def test_chunk_ids_that_look_alike_across_users_and_sessions(tmp_path: Path, backend: str) -> None:
    """(user "ab", session "c") vs (user "a", session "bc"): length-prefixed, so distinct."""
    with blockstore.open(tmp_path / "s", backend=backend) as s:
        s.put_chunk("ab", "c", "x", "one", ts_ns=1)
        s.put_chunk("a", "bc", "x", "two", ts_ns=1)
        s.put_chunk("a", "b", "cx", "three", ts_ns=1)
        assert s.get_chunk("ab", "c", "x").text == "one"  # type: ignore[union-attr]
        assert s.get_chunk("a", "bc", "x").text == "two"  # type: ignore[union-attr]
        assert s.get_chunk("a", "b", "cx").text == "three"  # type: ignore[union-attr]
        assert [c.text for c in s.list_chunks("a", "b")] == ["three"]
        assert [c.text for c in s.list_chunks("a", "bc")] == ["two"]
        assert s.delete_chunk("a", "bc", "x")
        assert s.get_chunk("ab", "c", "x").text == "one"  # type: ignore[union-attr]
        assert s.stats().records == 2
