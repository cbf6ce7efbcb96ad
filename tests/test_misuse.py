# mypy: disable-error-code="arg-type, list-item"
"""API misuse (issue 13, item 9): a wrong argument raises InvalidArgument naming that argument, and
writes nothing; then a hypothesis test throws random misuse at every public call of a store holding
known records: each call succeeds as documented or raises a BlockstoreError (never a bare TypeError,
ValueError, IndexError...), and the known records read back exactly."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import event, given

import blockstore
from blockstore import BlockstoreError, Chunk, ChunkWrite, CorruptionError, InvalidArgument
from blockstore.records import MAX_KEY, MAX_META, MAX_NAMESPACE
from blockstore.tools.fsck import check

# Known records. Their keys, namespace and user are longer than any junk the random test draws
# (binary and text of at most 5), and the random writes use other keys: nothing may touch them.
KNOWN_NS = "known-ns"
KNOWN_KV = {b"known-key-1": b"value one", b"known-key-2": b"", b"known-key-3": bytes(range(256)) * 20}
KNOWN_META = {b"known-key-1": b"m-1", b"known-key-2": b"", b"known-key-3": b'{"x":1}'}
KNOWN_OTHER_NS = {b"known-key-9": b"in the other namespace"}
TENSOR_KEY = b"known-tensor"
TENSOR = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
USER, SESSION = "known-user", "known-session"
KNOWN_CHUNKS = [
    ChunkWrite(USER, SESSION, "chunk-1", "first memory", {"turn": 1}, (b"known-key-1",), 1_000),
    ChunkWrite(USER, SESSION, "chunk-2", "second memory", None, (), 2_000),
]


def _populate(s: blockstore.Store) -> None:
    keys = sorted(KNOWN_KV)
    s.put_many([(k, KNOWN_KV[k]) for k in keys], metas=[KNOWN_META[k] for k in keys])
    s.put_many(list(KNOWN_OTHER_NS.items()), ns=KNOWN_NS)
    s.put_tensor(TENSOR_KEY, TENSOR)
    s.put_chunks(KNOWN_CHUNKS)


def _known(s: blockstore.Store) -> tuple[Any, ...]:
    """What the known records read back as (compared with the value right after _populate)."""
    keys = sorted(KNOWN_KV)
    return (
        [s.get(k) for k in keys],
        [None if loc is None else loc.meta for loc in s.locate_many(keys)],
        [s.get(k, ns=KNOWN_NS) for k in KNOWN_OTHER_NS],
        s.get_tensor(TENSOR_KEY).tobytes(),
        s.list_chunks(USER, SESSION),
        s.get_chunks([(USER, SESSION, c.chunk_id) for c in KNOWN_CHUNKS]),
    )


def _contents(s: blockstore.Store) -> tuple[Any, ...]:
    """Everything a failed call must leave as it was: every namespace's KV keys, values and metas,
    the known chunks, the record count and the bytes ever appended."""
    kv = {}
    for ns in s.namespaces():
        keys = list(s.iter_keys(ns=ns))
        kv[ns] = list(zip(keys, [s.get(k, ns=ns) for k in keys],
                          [loc.meta if loc else None for loc in s.locate_many(keys, ns=ns)]))
    return kv, _known(s), s.stats().records, s.io_counters()


def _tree(root: Path) -> dict[str, bytes | None]:
    """The files and directories under `root` (contents of the files), outside the test store."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == "s" or rel.startswith("s" + os.sep):
            continue
        for d in dirnames:
            out[os.path.join(rel, d)] = None
        for f in filenames:
            out[os.path.join(rel, f)] = Path(dirpath, f).read_bytes()
    return out


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = blockstore.open(tmp_path / "s", block_size=64 << 10)
    _populate(s)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# (a) one case per misuse: InvalidArgument, naming the argument, nothing written

Call = Callable[[blockstore.Store, Path], Any]


def _non_empty(tmp: Path) -> Any:
    d = tmp / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"\xff\xd8 not a store")
    return blockstore.open(d)


def _regular_file(tmp: Path) -> Any:
    f = tmp / "notes.txt"
    f.write_text("a file, not a store")
    return blockstore.open(f)


def _through_file(tmp: Path) -> Any:
    (tmp / "f").write_text("x")
    return blockstore.open(tmp / "f" / "s")


CASES: list[Any] = [
    # put / put_many
    pytest.param(lambda s, t: s.put(b"a", b"x", meta=5), "meta", id="put-meta-int"),
    pytest.param(lambda s, t: s.put(b"a", b"x", meta="text"), "meta", id="put-meta-str"),
    pytest.param(lambda s, t: s.put(b"a", b"x", meta=b"m" * (MAX_META + 1)), "meta", id="put-meta-too-big"),
    pytest.param(lambda s, t: s.put(b"a", b"x", partition=123), "partition", id="put-partition-int"),
    pytest.param(lambda s, t: s.put(b"a", b"x", partition=True), "partition", id="put-partition-bool"),
    pytest.param(lambda s, t: s.put(b"a", b"x", partition="\ud800"), "partition", id="put-partition-surrogate"),
    pytest.param(lambda s, t: s.put(b"a", b"x", partition=b"p" * 4097), "partition", id="put-partition-too-long"),
    pytest.param(lambda s, t: s.put("a", b"x"), "key", id="put-key-str"),
    pytest.param(lambda s, t: s.put(b"k" * (MAX_KEY + 1), b"x"), "key", id="put-key-too-long"),
    pytest.param(lambda s, t: s.put(b"a", "text"), "value", id="put-value-str"),
    pytest.param(lambda s, t: s.put(b"a", b"x", ns=b"default"), "ns", id="put-ns-bytes"),
    pytest.param(lambda s, t: s.put(b"a", b"x", ns="n" * (MAX_NAMESPACE + 1)), "ns", id="put-ns-too-long"),
    pytest.param(lambda s, t: s.put_many({b"a": b"x"}), "items", id="put_many-dict"),
    pytest.param(lambda s, t: s.put_many(b"ab"), "items", id="put_many-bytes"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x"), b"zz"]), "items[1]", id="put_many-item-not-a-pair"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x"), (b"b", b"y", b"z")]), "items[1]", id="put_many-triple"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x"), (5, b"y")]), "items[1] key", id="put_many-bad-second-key"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x"), (b"b", b"y")], metas=[b"m"]), "metas",
                 id="put_many-metas-short"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x")], metas=[b"m", b"n"]), "metas", id="put_many-metas-long"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x")], metas=[]), "metas", id="put_many-metas-empty"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x")], metas=b"m"), "metas", id="put_many-metas-bytes"),
    pytest.param(lambda s, t: s.put_many([(b"a", b"x"), (b"b", b"y")], metas=[b"m", 7]), "metas[1]",
                 id="put_many-metas-item-int"),
    # deletes and reads
    pytest.param(lambda s, t: s.delete_many(b"known-key-1"), "keys", id="delete_many-bytes"),
    pytest.param(lambda s, t: s.delete_many([b"known-key-1", None]), "keys[1]", id="delete_many-none-key"),
    pytest.param(lambda s, t: s.delete(7), "key", id="delete-int"),
    pytest.param(lambda s, t: s.get_many(b"abc"), "keys must be a sequence of bytes keys, not bytes",
                 id="get_many-bytes"),
    pytest.param(lambda s, t: s.get_many("abc"), "keys", id="get_many-str"),
    pytest.param(lambda s, t: s.get_many({b"known-key-1": 1}), "keys", id="get_many-dict"),
    pytest.param(lambda s, t: s.get_many(5), "keys", id="get_many-int"),
    pytest.param(lambda s, t: s.get_many([b"known-key-1"], out=[5]), "out[0]", id="get_many-out-int"),
    pytest.param(lambda s, t: s.get_many([b"known-key-1"], out=[]), "out", id="get_many-out-short"),
    pytest.param(lambda s, t: s.get_many([b"known-key-1"], out=bytearray(64)), "out", id="get_many-out-buffer"),
    pytest.param(lambda s, t: s.get_many([b"known-key-1"], out=[b"readonly" * 4]), "out[0]",
                 id="get_many-out-readonly"),
    pytest.param(lambda s, t: s.get(["known-key-1"]), "key", id="get-list"),
    pytest.param(lambda s, t: s.contains_many("ab"), "keys", id="contains_many-str"),
    pytest.param(lambda s, t: s.locate_many(b"known-key-1"), "keys", id="locate_many-bytes"),
    pytest.param(lambda s, t: list(s.iter_keys(prefix="known")), "prefix", id="iter_keys-prefix-str"),
    pytest.param(lambda s, t: s.add_read_observer(5), "observe", id="add_read_observer-int"),
    # chunk records
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", kv_keys=["s"]), "kv_keys", id="put_chunk-kv_keys-str"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", kv_keys=b"abc"), "kv_keys",
                 id="put_chunk-kv_keys-bytes"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", kv_keys=None), "kv_keys", id="put_chunk-kv_keys-none"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", ts_ns="now"), "ts_ns", id="put_chunk-ts_ns-str"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", ts_ns=1.5), "ts_ns", id="put_chunk-ts_ns-float"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", ts_ns=True), "ts_ns", id="put_chunk-ts_ns-bool"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", ts_ns=1 << 64), "ts_ns", id="put_chunk-ts_ns-huge"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", meta=5), "meta", id="put_chunk-meta-int"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", "t", meta={"b": b"x"}), "meta", id="put_chunk-meta-bytes"),
    pytest.param(lambda s, t: s.put_chunk("u", "s", "c", b"text"), "text", id="put_chunk-text-bytes"),
    pytest.param(lambda s, t: s.put_chunk(5, "s", "c", "t"), "user_id", id="put_chunk-user-int"),
    pytest.param(lambda s, t: s.put_chunks([("u", "s", "c", "t")]), "chunks[0]", id="put_chunks-tuple"),
    pytest.param(lambda s, t: s.put_chunks(ChunkWrite("u", "s", "c", "t")), "chunks", id="put_chunks-one"),
    pytest.param(lambda s, t: s.put_chunks([ChunkWrite("u", "s", "c1", "t"),
                                            ChunkWrite("u", "s", "c2", "t", ts_ns="x")]),
                 "ts_ns", id="put_chunks-bad-second"),
    pytest.param(lambda s, t: s.get_chunks((USER, SESSION, "chunk-1")), "ids", id="get_chunks-one-triple"),
    pytest.param(lambda s, t: s.get_chunks([(USER, SESSION)]), "ids[0]", id="get_chunks-pair"),
    pytest.param(lambda s, t: s.get_chunk(USER, SESSION, 1), "chunk_id", id="get_chunk-int"),
    pytest.param(lambda s, t: s.list_chunks(USER, None, ns="never-written"), "session_id", id="list_chunks-none"),
    # tensors
    pytest.param(lambda s, t: s.get_tensor(b"known-key-1"), "not hold a tensor record", id="get_tensor-kv-record"),
    pytest.param(lambda s, t: s.get_tensor(b"known-key-3"), "not hold a tensor record", id="get_tensor-json-meta"),
    pytest.param(lambda s, t: s.get_tensor(TENSOR_KEY, out=5), "out[0]", id="get_tensor-out-int"),
    pytest.param(lambda s, t: s.get_tensors([TENSOR_KEY], out=[]), "out", id="get_tensors-out-short"),
    pytest.param(lambda s, t: s.get_tensors(TENSOR_KEY), "keys", id="get_tensors-bytes"),
    pytest.param(lambda s, t: s.put_tensor(b"t", [1.0, 2.0]), "tensor", id="put_tensor-list"),
    pytest.param(lambda s, t: s.put_tensor(b"t", np.array([object()])), "tensor", id="put_tensor-object-dtype"),
    pytest.param(lambda s, t: s.put_tensors({b"t": TENSOR}), "items", id="put_tensors-dict"),
    pytest.param(lambda s, t: s.put_tensor(b"t", TENSOR, partition=5), "partition", id="put_tensor-partition-int"),
    # opening
    pytest.param(lambda s, t: blockstore.open(t / "new", create="no"), "create", id="open-create-str"),
    pytest.param(lambda s, t: blockstore.open(t / "new", create=1), "create", id="open-create-int"),
    pytest.param(lambda s, t: blockstore.open(t / "new", read_only="yes"), "read_only", id="open-read_only-str"),
    pytest.param(lambda s, t: blockstore.open(t / "new", read_ahead=0), "read_ahead", id="open-read_ahead-int"),
    pytest.param(lambda s, t: blockstore.open(t / "new", read_gap="x"), "read_gap", id="open-read_gap-str"),
    pytest.param(lambda s, t: blockstore.open(t / "new", read_gap=True), "read_gap", id="open-read_gap-bool"),
    pytest.param(lambda s, t: blockstore.open(t / "new", max_open_blocks=True), "max_open_blocks",
                 id="open-max_open_blocks-bool"),
    pytest.param(lambda s, t: blockstore.open(t / "new", allow_non_empty="yes"), "allow_non_empty",
                 id="open-allow_non_empty-str"),
    pytest.param(lambda s, t: blockstore.open(5), "path", id="open-path-int"),
    pytest.param(lambda s, t: blockstore.open(b"/tmp/x"), "path", id="open-path-bytes"),
    pytest.param(lambda s, t: blockstore.open(""), "path", id="open-path-empty"),
    pytest.param(lambda s, t: _regular_file(t), "not a directory", id="open-regular-file"),
    pytest.param(lambda s, t: _through_file(t), "not a directory", id="open-path-through-file"),
    pytest.param(lambda s, t: _non_empty(t), "allow_non_empty", id="open-non-empty-directory"),
]


@pytest.mark.parametrize(("call", "names"), CASES)
def test_misuse_raises_invalid_argument_naming_it(store: blockstore.Store, tmp_path: Path, call: Call,
                                                  names: str) -> None:
    before, files = _contents(store), _tree(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        call(store, tmp_path)
    assert names in str(info.value), str(info.value)
    assert _contents(store) == before
    after = _tree(tmp_path)
    assert {k: after.get(k) for k in files} == files
    # nothing appeared but the case's own set-up (the file, the directory of photos)
    assert set(after) - set(files) <= {"./notes.txt", "./f", "./photos", os.path.join("photos", "holiday.jpg")}


def test_open_non_empty_directory_with_allow_non_empty(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    with blockstore.open(d, allow_non_empty=True) as s:
        s.put(b"k", b"v")
    with blockstore.open(d) as s:  # a store now: no keyword needed
        assert s.get(b"k") == b"v"
    assert (d / "keep.txt").read_text() == "mine"


def test_open_creates_into_what_a_crashed_creation_left(tmp_path: Path) -> None:
    """A creation cut short leaves blocks/, directory/, LOCK and maybe MANIFEST.json.tmp, but no
    MANIFEST: the next open creates again (lost+found, from fsck or a mount point, is fine too)."""
    d = tmp_path / "s"
    blockstore.open(d).close()
    os.replace(d / "MANIFEST.json", d / "MANIFEST.json.tmp")
    (d / "lost+found").mkdir()
    assert sorted(os.listdir(d)) == ["LOCK", "MANIFEST.json.tmp", "blocks", "directory", "lost+found"]
    with blockstore.open(d) as s:
        s.put(b"k", b"v")
    with blockstore.open(d, create=False) as s:
        assert s.get(b"k") == b"v"


def test_open_lost_manifest_is_still_reported_as_such(tmp_path: Path) -> None:
    """Block files without a MANIFEST: the lost-MANIFEST error wins over the non-empty refusal."""
    d = tmp_path / "s"
    with blockstore.open(d) as s:
        s.put(b"k", b"v")
    os.remove(d / "MANIFEST.json")
    (d / "notes.txt").write_text("x")
    with pytest.raises(CorruptionError, match="MANIFEST was lost"):
        blockstore.open(d)


def test_not_a_store_without_create(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(blockstore.NotFound):
        blockstore.open(tmp_path / "x", create=False)
    assert os.listdir(tmp_path / "x") == []


def test_valid_calls_still_work(store: blockstore.Store) -> None:
    store.put(b"a", b"x", meta=bytearray(b"m"), partition="p")
    store.put_many(((k, b"v") for k in (b"b", b"c")), metas=(b"1", memoryview(b"2")), partition=b"q")
    assert [loc.meta for loc in store.locate_many([b"a", b"b", b"c"])] == [b"m", b"1", b"2"]  # type: ignore[union-attr]
    assert store.get_many(iter([b"a", b"b"]), out=[bytearray(1), np.zeros(4, np.uint8)]) == [1, 1]
    store.put_chunk("u", "s", "c", "t", kv_keys=(b"a", bytearray(b"b")), ts_ns=np.int64(5))
    got = store.get_chunk("u", "s", "c")
    assert got is not None and got.kv_keys == (b"a", b"b") and got.ts_ns == 5
    assert store.get_chunks([["u", "s", "c"]]) == [got]
    np.testing.assert_array_equal(store.get_tensor(TENSOR_KEY), TENSOR)
    out = np.empty_like(TENSOR)
    assert store.get_tensor(TENSOR_KEY, out=out) is out


# ---------------------------------------------------------------------------------------------
# (b) random misuse against a store holding known records

_HUGE: list[Any] = [b"k" * (MAX_KEY + 1), b"m" * (MAX_META + 1), "n" * (MAX_NAMESPACE + 1), "i" * 1025,
                    1 << 64, -1, 10**30, float("inf"), float("nan")]
JUNK = st.one_of(
    st.integers(-(1 << 70), 1 << 70), st.floats(), st.none(), st.booleans(),
    st.text(max_size=5), st.binary(max_size=5), st.builds(bytearray, st.binary(max_size=5)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.lists(st.integers(0, 300), max_size=2), max_size=2),
    st.sampled_from(_HUGE),
)


def kw(**optional: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=optional)


def call(*args: st.SearchStrategy[Any], **optional: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """(positional arguments, a subset of the keyword arguments)."""
    return st.tuples(st.tuples(*args), kw(**optional))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                    max_leaves=6)


def methods(junk: bool) -> dict[str, st.SearchStrategy[Any]]:
    """Each method's (args, kwargs): valid values only, or (junk=True) about one in four of them junk,
    at every level (an argument, a sequence in place of an argument, an item of a sequence)."""

    def m(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(valid, valid, valid, JUNK) if junk else valid

    def seq(item: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        items = st.lists(m(item), max_size=4)
        return m(st.one_of(items, items.map(tuple)))

    write_key = m(st.sampled_from([b"w0", b"w1", b"w2", bytearray(b"w3"), memoryview(b"w4")]))
    read_key = m(st.sampled_from([*KNOWN_KV, *KNOWN_OTHER_NS, TENSOR_KEY, b"w0", b"w1", b"missing"]))
    ns = m(st.sampled_from(["default", KNOWN_NS, "scratch"]))
    value = m(st.one_of(st.binary(max_size=64), st.builds(bytearray, st.binary(max_size=64)),
                        st.builds(lambda n: np.arange(n, dtype=np.int16), st.integers(0, 8))))
    meta = m(st.binary(max_size=16))
    partition = m(st.one_of(st.none(), st.text(max_size=8), st.binary(max_size=8)))
    w_user, r_user = m(st.sampled_from(["bob", "carol"])), m(st.sampled_from([USER, "bob"]))
    r_session, r_chunk = m(st.sampled_from([SESSION, "s"])), m(st.sampled_from(["chunk-1", "chunk-2", "c"]))
    ident, text = m(st.sampled_from(["s", "c", "x"])), m(st.text(max_size=16))
    chunk_meta = m(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), JSON, max_size=3)))
    ts = m(st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
    tensor = m(st.one_of(
        st.sampled_from(["float32", "int8", "float16", "complex64", "bool", "U2"]).flatmap(
            lambda dt: st.lists(st.integers(0, 3), max_size=3).map(lambda shape: np.zeros(shape, dtype=dt))),
        st.just(np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]),  # not contiguous: stored as a copy
    ))
    out_bufs = st.one_of(st.none(), st.lists(m(st.builds(bytearray, st.integers(0, 5200))), max_size=4))
    out_tensor = m(st.one_of(st.none(), st.builds(np.empty_like, st.just(TENSOR))))
    if junk:
        ts = st.one_of(ts, st.just(1 << 64))
        tensor = st.one_of(tensor, st.builds(lambda: np.array([object()])))  # object dtype: no raw bytes
        out_tensor = st.one_of(out_tensor, st.builds(lambda: np.empty((4, 6), np.float32)))  # wrong shape
    chunk_write = m(st.builds(ChunkWrite, w_user, ident, ident, text, chunk_meta, seq(read_key), ts))
    return {
        "put": call(write_key, value, ns=ns, meta=meta, partition=partition),
        "put_many": call(seq(st.tuples(write_key, value)), ns=ns, metas=st.one_of(st.none(), seq(meta)),
                         partition=partition),
        "get": call(read_key, ns=ns),
        "get_many": call(seq(read_key), ns=ns, out=out_bufs),
        "delete": call(write_key, ns=ns),
        "delete_many": call(seq(write_key), ns=ns),
        "contains_many": call(seq(read_key), ns=ns),
        "locate_many": call(seq(read_key), ns=ns),
        "iter_keys": call(ns=ns, prefix=m(st.binary(max_size=3))),
        "put_chunk": call(w_user, ident, ident, text, ns=ns, meta=chunk_meta, kv_keys=seq(read_key), ts_ns=ts),
        "put_chunks": call(seq(chunk_write), ns=ns),
        "get_chunk": call(r_user, r_session, r_chunk, ns=ns),
        "get_chunks": call(seq(st.tuples(r_user, r_session, r_chunk)), ns=ns),
        "list_chunks": call(r_user, r_session, ns=ns),
        "delete_chunk": call(w_user, ident, ident, ns=ns),
        "put_tensor": call(write_key, tensor, ns=ns, partition=partition),
        "get_tensor": call(read_key, ns=ns, out=out_tensor),
    }


METHODS = {False: methods(junk=False), True: methods(junk=True)}


def _check_result(s: blockstore.Store, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], got: Any) -> None:
    """A call that succeeded returned what its documentation says."""
    n = len(list(args[0])) if name.endswith("_many") or name == "get_chunks" else 1
    if name in ("put", "put_many", "put_chunk", "put_chunks", "put_tensor"):
        assert got is None
        if name == "put":  # and reads back
            assert s.get(args[0], ns=kwargs.get("ns", "default")) == memoryview(args[1]).tobytes()
    elif name == "get":
        assert got is None or isinstance(got, bytes)
    elif name == "get_many":
        assert len(got) == n
        ok = int if kwargs.get("out") is not None else memoryview
        assert all(g is None or isinstance(g, ok) for g in got)
    elif name in ("delete", "delete_chunk"):
        assert isinstance(got, bool)
    elif name in ("delete_many", "contains_many"):
        assert len(got) == n and all(isinstance(g, bool) for g in got)
    elif name == "locate_many":
        assert len(got) == n
    elif name == "iter_keys":
        assert all(isinstance(k, bytes) for k in got)
    elif name == "get_chunk":
        assert got is None or isinstance(got, Chunk)
    elif name in ("get_chunks", "list_chunks"):
        assert all(c is None or isinstance(c, Chunk) for c in got)
        assert name == "list_chunks" or len(got) == n
    elif name == "get_tensor":
        assert got is None or isinstance(got, np.ndarray)


def test_random_misuse_raises_only_blockstore_errors(tmp_path: Path) -> None:
    path = tmp_path / "s"
    s = blockstore.open(path, block_size=64 << 10)
    _populate(s)
    known = _known(s)
    names = sorted(METHODS[False])

    @given(st.data())
    def run(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 10), label="calls")):
            name = data.draw(st.sampled_from(names), label="method")
            junk = data.draw(st.booleans(), label="junk")
            args, kwargs = data.draw(METHODS[junk][name], label=name)
            before = (s.io_counters(), s.stats().records, s.namespaces())
            try:
                got = getattr(s, name)(*args, **kwargs)
                if name == "iter_keys":
                    got = list(got)
            except BlockstoreError:  # anything else (TypeError, IndexError, struct.error...) fails the test
                assert (s.io_counters(), s.stats().records, s.namespaces()) == before, f"{name} wrote and raised"
                event(f"{name}: raised")
                continue
            event(f"{name}: ok")
            _check_result(s, name, args, kwargs, got)
        assert _known(s) == known

    try:
        run()
    finally:
        s.close()
    report = check(path)
    assert report.findings == [], report.findings
    with blockstore.open(path, create=False) as s:
        assert _known(s) == known


def test_open_unknown_option_is_invalid_argument_naming_it(tmp_path: Path) -> None:
    """A misspelt option (`max_open_block=`) raised Python's TypeError, outside the BlockstoreError hierarchy;
    nothing is created in the store's place."""
    with pytest.raises(blockstore.InvalidArgument, match="max_open_block"):
        blockstore.open(tmp_path / "s", max_open_block=4)
    assert not (tmp_path / "s").exists()
