"""Every error path of the public API: what is raised, that it belongs to the one hierarchy, and that
a failure leaves what was acknowledged intact (fault injection through the C core's file layer)."""

from __future__ import annotations

import errno
import inspect
import json
import mmap
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import blockstore
import blockstore.errors as errors_mod
from blockstore import (
    BlockstoreError,
    ChecksumMismatch,
    CorruptionError,
    FormatVersionError,
    InvalidArgument,
    IOErrorBS,
    NoSpace,
    NotFound,
    OutOfMemory,
    ReadOnlyStore,
    StoreClosed,
    StoreLocked,
    TruncatedError,
)
from blockstore.native import FaultInjector

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "native" / "blockstore.h"
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# the hierarchy and the C code map


def test_every_exported_exception_is_a_blockstore_error() -> None:
    classes = [obj for _name, obj in inspect.getmembers(errors_mod, inspect.isclass)
               if issubclass(obj, BaseException) and obj.__module__ == errors_mod.__name__]
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, BlockstoreError), cls
        assert getattr(blockstore, cls.__name__) is cls, f"{cls.__name__} not exported from blockstore"
    for name in blockstore.__all__:
        obj = getattr(blockstore, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, BlockstoreError), name
    # the documented shape of the tree
    for sub in (ChecksumMismatch, TruncatedError, FormatVersionError):
        assert issubclass(sub, CorruptionError)
    assert issubclass(NoSpace, IOErrorBS) and issubclass(IOErrorBS, OSError)
    assert issubclass(InvalidArgument, ValueError) and issubclass(NotFound, KeyError)
    assert issubclass(OutOfMemory, MemoryError)


def _header_codes() -> dict[str, tuple[int, str]]:
    """BS_E* name -> (value, exception class named in its comment), parsed from the C header."""
    out = {}
    for m in re.finditer(r"^#define\s+(BS_E\w+)\s+(-?\d+)\s*/\*\s*(\w+)", HEADER.read_text(), re.M):
        out[m.group(1)] = (int(m.group(2)), m.group(3))
    return out


def test_code_to_error_maps_every_c_code_one_to_one() -> None:
    codes = _header_codes()
    assert len(codes) >= 9 and "BS_EINVAL" in codes and "BS_ETRUNCATED" in codes
    values = [v for v, _cls in codes.values()]
    assert len(set(values)) == len(values), "two BS_E* names share a value"
    assert 0 not in values
    mapping = errors_mod.CODE_TO_ERROR
    assert set(mapping) == set(values), f"C codes {sorted(values)} vs mapped {sorted(mapping)}"
    assert len(set(mapping.values())) == len(mapping), "two codes map to the same class"
    for name, (value, cls_name) in codes.items():
        assert mapping[value].__name__ == cls_name, f"{name}={value} maps to {mapping[value].__name__}, header says {cls_name}"
        assert issubclass(mapping[value], BlockstoreError)


def test_native_constants_match_the_header() -> None:
    from blockstore.native import lib

    for name, (value, _cls) in _header_codes().items():
        assert getattr(lib, name) == value, name


def test_error_for_code_builds_the_mapped_class() -> None:
    for code, cls in errors_mod.CODE_TO_ERROR.items():
        err = errors_mod.error_for_code(code, "some op", errno.EIO if issubclass(cls, OSError) else 0)
        assert type(err) is cls
        assert "some op" in str(err)
        if issubclass(cls, OSError):
            assert err.errno == errno.EIO and "EIO" in str(err)
    err = errors_mod.error_for_code(-3, "append", errno.ENOSPC)
    assert isinstance(err, NoSpace) and err.errno == errno.ENOSPC


# ---------------------------------------------------------------------------------------------
# argument checks: keys, metadata, namespaces, values


@pytest.fixture
def store(tmp_path: Path, backend: str):  # type: ignore[no-untyped-def]
    s = blockstore.open(tmp_path / "s", backend=backend)
    s.put(b"present", b"value")
    yield s
    s.close()


BAD_KEYS = [b"", b"x" * 4097, "str-key", 5, None, [b"a"]]


@pytest.mark.parametrize("key", BAD_KEYS, ids=["empty", "4097", "str", "int", "none", "list"])
def test_bad_keys_are_invalid_everywhere(store: blockstore.Store, key: Any) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: store.put(key, b"v"),
        lambda: store.put_many([(b"ok", b"v"), (key, b"v")]),
        lambda: store.get(key),
        lambda: store.get_many([b"present", key]),
        lambda: store.contains_many([key]),
        lambda: store.delete(key),
        lambda: store.delete_many([b"present", key]),
        lambda: store.put_tensor(key, np.zeros(3, np.float32)),
        lambda: store.get_tensor(key),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(InvalidArgument):
            call()
            pytest.fail(f"call #{i} accepted key {key!r}")
    # a rejected batch writes nothing, not even its valid part
    assert store.get(b"ok") is None
    assert store.get(b"present") == b"value"


def test_key_limits_are_inclusive(store: blockstore.Store) -> None:
    store.put(b"k", b"1")
    store.put(b"x" * 4096, b"2")
    assert store.get(b"x" * 4096) == b"2"
    assert store.get(bytearray(b"k")) == b"1"  # any bytes-like key
    assert store.get(memoryview(b"k")) == b"1"


def test_meta_limit(store: blockstore.Store) -> None:
    store.put(b"m", b"v", meta=b"m" * 65536)
    with pytest.raises(InvalidArgument):
        store.put(b"m2", b"v", meta=b"m" * 65537)
    with pytest.raises(InvalidArgument):
        store.put_many([(b"a", b"1"), (b"b", b"2")], metas=[b"", b"m" * 65537])
    assert store.get(b"m2") is None and store.get(b"a") is None
    # a chunk whose JSON metadata would pass 64 KiB
    with pytest.raises(InvalidArgument):
        store.put_chunk("u", "s", "c", "text", meta={"blob": "x" * 70_000})
    assert store.get_chunk("u", "s", "c") is None


@pytest.mark.parametrize("value", ["a str", None, 12, object()], ids=["str", "none", "int", "object"])
def test_values_without_the_buffer_protocol_are_invalid(store: blockstore.Store, value: Any) -> None:
    with pytest.raises(InvalidArgument):
        store.put(b"k", value)
    assert store.get(b"k") is None


def test_value_over_4_gib_is_invalid_before_anything_is_read(store: blockstore.Store) -> None:
    big = mmap.mmap(-1, 1 << 32)  # 4 GiB of address space, never touched
    try:
        with pytest.raises(InvalidArgument):
            store.put(b"huge", big)
    finally:
        big.close()
    assert store.get(b"huge") is None


def test_non_contiguous_value_is_invalid(store: blockstore.Store) -> None:
    a = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises(InvalidArgument):
        store.put(b"nc", a)


BAD_NAMESPACES = ["", "x" * 256, "é" * 128, b"bytes", None, 7]


@pytest.mark.parametrize("ns", BAD_NAMESPACES, ids=["empty", "256", "256-utf8-bytes", "bytes", "none", "int"])
def test_bad_namespaces_are_invalid_everywhere(store: blockstore.Store, ns: Any) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: store.put(b"k", b"v", ns=ns),
        lambda: store.put_many([(b"k", b"v")], ns=ns),
        lambda: store.get(b"k", ns=ns),
        lambda: store.get_many([b"k"], ns=ns),
        lambda: store.contains_many([b"k"], ns=ns),
        lambda: list(store.iter_keys(ns=ns)),
        lambda: store.delete(b"k", ns=ns),
        lambda: store.delete_many([b"k"], ns=ns),
        lambda: store.put_chunk("u", "s", "c", "t", ns=ns),
        lambda: store.get_chunk("u", "s", "c", ns=ns),
        lambda: store.list_chunks("u", "s", ns=ns),
        lambda: store.delete_chunk("u", "s", "c", ns=ns),
        lambda: store.put_tensor(b"t", np.zeros(2), ns=ns),
        lambda: store.get_tensor(b"t", ns=ns),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(InvalidArgument):
            call()
            pytest.fail(f"call #{i} accepted namespace {ns!r}")
    assert store.namespaces() == ["default"]


def test_namespace_limit_counts_utf8_bytes(store: blockstore.Store) -> None:
    store.put(b"k", b"v", ns="é" * 127)  # 254 bytes
    store.put(b"k", b"w", ns="n" * 255)
    assert store.get(b"k", ns="é" * 127) == b"v" and store.get(b"k", ns="n" * 255) == b"w"


def test_namespace_that_is_not_valid_utf8_is_invalid(store: blockstore.Store) -> None:
    """A str with a lone surrogate cannot be encoded as UTF-8 (docs/format.md §6: namespace names are
    UTF-8), so it is an InvalidArgument like any other bad name, not a UnicodeEncodeError."""
    for call in (lambda: store.put(b"k", b"v", ns="\ud800"), lambda: store.get(b"k", ns="\ud800")):
        with pytest.raises(InvalidArgument):
            call()


def test_chunk_ids_that_are_not_valid_utf8_are_invalid(store: blockstore.Store) -> None:
    for call in (lambda: store.put_chunk("\udcff", "s", "c", "t"), lambda: store.put_chunk("u", "s", "\ud800", "t"),
                 lambda: store.get_chunk("u", "\ud800", "c")):
        with pytest.raises(InvalidArgument):
            call()


def test_bad_chunk_arguments(store: blockstore.Store) -> None:
    bad: list[Callable[[], Any]] = [
        lambda: store.put_chunk("", "s", "c", "t"),
        lambda: store.put_chunk("u" * 1025, "s", "c", "t"),
        lambda: store.put_chunk("u", "", "c", "t"),
        lambda: store.put_chunk("u", "s", "", "t"),
        lambda: store.put_chunk(b"u", "s", "c", "t"),  # type: ignore[arg-type]
        lambda: store.put_chunk("u", "s", "c", b"bytes text"),  # type: ignore[arg-type]
        lambda: store.put_chunk("u", "s", "c", "t", ts_ns=-1),
        lambda: store.put_chunk("u", "s", "c", "t", ts_ns=1 << 64),
        lambda: store.put_chunk("u", "s", "c", "t", meta={"x": object()}),
        lambda: store.get_chunk("", "s", "c"),
        lambda: store.list_chunks("u", ""),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(InvalidArgument):
            call()
            pytest.fail(f"bad chunk call #{i} accepted")
    assert store.list_chunks("u", "s") == []


def test_partition_limit(store: blockstore.Store) -> None:
    store.put(b"k", b"v", partition=b"p" * 4096)
    with pytest.raises(InvalidArgument):
        store.put(b"k2", b"v", partition=b"p" * 4097)
    assert store.get(b"k2") is None


# ---------------------------------------------------------------------------------------------
# get_many with caller buffers


def test_get_many_out_buffers_checked(store: blockstore.Store) -> None:
    store.put(b"k", b"0123456789")
    with pytest.raises(InvalidArgument):
        store.get_many([b"k"], out=[bytearray(9)])  # one byte short
    with pytest.raises(InvalidArgument):
        store.get_many([b"k"], out=[b"x" * 10])  # read-only
    with pytest.raises(InvalidArgument):
        store.get_many([b"k"], out=[memoryview(bytearray(20)).toreadonly()])
    with pytest.raises(InvalidArgument):
        store.get_many([b"k", b"present"], out=[bytearray(10)])  # wrong count
    with pytest.raises(InvalidArgument):
        store.get_many([b"k"], out=[bytearray(10), bytearray(10)])
    with pytest.raises(InvalidArgument):
        store.get_many([b"k"], out=[np.zeros(40, np.uint8)[::2]])  # not contiguous
    # an exactly sized, and an oversized, buffer are fine; only the payload's bytes are written
    exact, big = bytearray(10), bytearray(b"\xee" * 16)
    assert store.get_many([b"k", b"k"], out=[exact, big]) == [10, 10]
    assert exact == b"0123456789" and big == b"0123456789" + b"\xee" * 6


def test_tensor_out_mismatch_is_invalid(store: blockstore.Store) -> None:
    store.put_tensor(b"t", np.arange(12, dtype=np.float32).reshape(3, 4))
    for bad in (np.empty((4, 3), np.float32), np.empty((3, 4), np.float16), np.empty(12, np.float32),
                np.empty((4, 3), np.float32).T, np.empty((3, 4), np.int32)):
        with pytest.raises(InvalidArgument):
            store.get_tensor(b"t", out=bad)
    ro = np.empty((3, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgument):
        store.get_tensor(b"t", out=ro)
    with pytest.raises(InvalidArgument):
        store.put_tensor(b"t2", [1, 2, 3])  # not an array


# ---------------------------------------------------------------------------------------------
# open arguments, missing stores, manifests


@pytest.mark.parametrize("kwargs", [
    {"durability": "x"}, {"durability": None}, {"block_size": 1000}, {"block_size": (64 << 10) - 1},
    {"block_size": 2.5 * (1 << 20)}, {"block_size": (1 << 40) + 1}, {"max_open_blocks": 0}, {"max_open_blocks": -3},
    {"on_corrupt": "x"}, {"backend": "x"}, {"read_gap": -1}, {"read_gap": (64 << 20) + 1},
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_bad_open_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    path = tmp_path / "new"
    with pytest.raises(InvalidArgument):
        blockstore.open(path, **kwargs)
    assert not path.exists(), "a rejected open must not create anything"


def test_non_numeric_idle_seal_seconds_is_invalid(tmp_path: Path) -> None:
    """A setting that would make every later write fail must be refused when the store is opened."""
    path = tmp_path / "new"
    with pytest.raises(InvalidArgument):
        s = blockstore.open(path, idle_seal_seconds="soon")  # type: ignore[arg-type]
        try:
            s.put(b"k", b"v")
        finally:
            s.close()


def test_missing_store_without_create_is_not_found(tmp_path: Path, backend: str) -> None:
    for kwargs in ({"create": False}, {"read_only": True}, {"create": False, "read_only": True}):
        path = tmp_path / "missing"
        with pytest.raises(NotFound) as ei:
            blockstore.open(path, backend=backend, **kwargs)
        assert str(path) in str(ei.value)
        assert not path.exists()


def _manifest_cases(orig: dict[str, Any]) -> list[tuple[str, str, type[BlockstoreError]]]:
    return [
        ("garbage", "{not json", CorruptionError),
        ("empty", "", CorruptionError),
        ("list", "[1, 2]", CorruptionError),
        ("wrong magic", json.dumps({**orig, "magic": "leveldb"}), CorruptionError),
        ("no store id", json.dumps({k: v for k, v in orig.items() if k != "store_id"}), CorruptionError),
        ("string version", json.dumps({**orig, "format_version": "1"}), CorruptionError),
        ("version 99", json.dumps({**orig, "format_version": 99}), FormatVersionError),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_manifest(tmp_path: Path, backend: str, case: int) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, backend=backend) as s:
        s.put(b"k", b"v")
    mf = path / "MANIFEST.json"
    orig_text = mf.read_text()
    what, text, cls = _manifest_cases(json.loads(orig_text))[case]
    mf.write_text(text)
    for read_only in (False, True):
        with pytest.raises(cls) as ei:
            blockstore.open(path, backend=backend, read_only=read_only)
        assert type(ei.value) is cls, f"{what}: {type(ei.value).__name__}"
    # the failed open released the writer lock and touched nothing: with the manifest back, all is well
    mf.write_text(orig_text)
    with blockstore.open(path, backend=backend) as s:
        assert s.get(b"k") == b"v"


# ---------------------------------------------------------------------------------------------
# read-only stores, closed stores


def test_writes_on_a_read_only_store(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, backend=backend) as s:
        s.put(b"k", b"v")
        s.put_chunk("u", "s", "c", "text")
    with blockstore.open(path, backend=backend, read_only=True) as r:
        writes: list[Callable[[], Any]] = [
            lambda: r.put(b"k", b"w"),
            lambda: r.put_many([(b"a", b"b")]),
            lambda: r.delete(b"k"),
            lambda: r.delete_many([b"k"]),
            lambda: r.put_chunk("u", "s", "c2", "t"),
            lambda: r.delete_chunk("u", "s", "c"),
            lambda: r.put_tensor(b"t", np.zeros(2)),
        ]
        for i, call in enumerate(writes):
            with pytest.raises(ReadOnlyStore):
                call()
                pytest.fail(f"write #{i} accepted")
        assert r.get(b"k") == b"v" and r.get_chunk("u", "s", "c").text == "text"  # type: ignore[union-attr]
    with blockstore.open(path, backend=backend) as s:
        assert s.get(b"k") == b"v" and s.get(b"a") is None and s.stats().records == 2


def test_every_call_after_close_is_store_closed(tmp_path: Path, backend: str) -> None:
    s = blockstore.open(tmp_path / "s", backend=backend)
    s.put(b"k", b"v")
    s.put_chunk("u", "s", "c", "t")
    s.close()
    calls: list[Callable[[], Any]] = [
        lambda: s.put(b"k", b"v"),
        lambda: s.put_many([(b"k", b"v")]),
        lambda: s.get(b"k"),
        lambda: s.get_many([b"k"]),
        lambda: s.get_many([b"k"], out=[bytearray(1)]),
        lambda: s.contains_many([b"k"]),
        lambda: list(s.iter_keys()),
        lambda: s.locate_many([b"k"]),
        lambda: s.delete(b"k"),
        lambda: s.delete_many([b"k"]),
        lambda: s.stats(),
        lambda: s.put_chunk("u", "s", "c", "t"),
        lambda: s.get_chunk("u", "s", "c"),
        lambda: s.get_chunks([("u", "s", "c")]),
        lambda: s.list_chunks("u", "s"),
        lambda: s.delete_chunk("u", "s", "c"),
        lambda: s.put_tensor(b"t", np.zeros(2)),
        lambda: s.get_tensor(b"t"),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(StoreClosed):
            call()
            pytest.fail(f"call #{i} worked on a closed store")
    s.close()  # idempotent
    with blockstore.open(tmp_path / "s", backend=backend) as again:
        assert again.get(b"k") == b"v"


# ---------------------------------------------------------------------------------------------
# the one-writer rule, across processes

_HOLDER = """
import sys, blockstore
s = blockstore.open(sys.argv[1])
s.put(b"before", b"committed before the reader opened")
s.put_chunk("u", "s", "c", "chunk from the writer")
print("ready", flush=True)
sys.stdin.readline()
s.put(b"later", b"x")
s.close()
print("closed", flush=True)
"""


@pytest.fixture
def holder(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "locked"
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=str(ROOT))
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield path, p
    finally:
        if p.poll() is None:
            try:
                p.stdin.write("\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_second_writer_is_refused_naming_the_holder_pid(holder: tuple[Path, subprocess.Popen], backend: str) -> None:  # type: ignore[type-arg]
    path, proc = holder
    with pytest.raises(StoreLocked) as ei:
        blockstore.open(path, backend=backend)
    assert ei.value.pid == proc.pid
    assert f"pid {proc.pid}" in str(ei.value)
    with pytest.raises(StoreLocked):
        blockstore.open(path, backend=backend, create=False)


def test_read_only_open_beside_a_writer_sees_committed_data(holder: tuple[Path, subprocess.Popen],  # type: ignore[type-arg]
                                                            backend: str) -> None:
    path, proc = holder
    with blockstore.open(path, backend=backend, read_only=True) as r:
        assert r.get(b"before") == b"committed before the reader opened"
        assert r.get_chunk("u", "s", "c").text == "chunk from the writer"  # type: ignore[union-attr]
        assert r.stats().records == 2
        with pytest.raises(ReadOnlyStore):
            r.put(b"x", b"y")
    # the writer was not disturbed
    proc.stdin.write("\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    assert proc.stdout.readline().strip() == "closed"  # type: ignore[union-attr]
    assert proc.wait(10) == 0
    with blockstore.open(path, backend=backend) as s:
        assert s.get(b"later") == b"x" and s.get(b"before") is not None


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s") as s:
        with pytest.raises(StoreLocked) as ei:
            blockstore.open(tmp_path / "s")
        assert ei.value.pid == os.getpid()
        s.put(b"k", b"still works")
        assert s.get(b"k") == b"still works"
    with blockstore.open(tmp_path / "s") as s:  # released on close
        assert s.get(b"k") == b"still works"


# ---------------------------------------------------------------------------------------------
# injected I/O faults (native backend: the fault layer sits under the C core)

VALUE_SIZES = [300_000, 10, 5000]  # three per 1 MiB block: rotations (footers, new headers) in the run


def _value(i: int) -> bytes:
    return random.Random(i).randbytes(VALUE_SIZES[i % 3])


def _workload(s: blockstore.Store, acked: dict[bytes, bytes], attempted: dict[bytes, bytes]) -> None:
    """Puts (with overwrites, a batch and a delete) that rotate and reclaim blocks. `attempted` ends as
    the state the whole workload aims at; `acked` holds what the store acknowledged so far."""
    for i in range(12):
        k = b"k%d" % (i % 7)
        v = _value(i)
        attempted[k] = v
        s.put(k, v)
        acked[k] = v
    batch = [(b"b%d" % i, _value(100 + i)) for i in range(3)]
    attempted.update(batch)
    s.put_many(batch)
    acked.update(batch)
    attempted.pop(b"k0", None)
    assert s.delete(b"k0")
    acked.pop(b"k0", None)


def _check_acked(s: blockstore.Store, acked: dict[bytes, bytes], attempted: dict[bytes, bytes], n: int) -> None:
    """Every acknowledged value is there; only the key of the failed call may hold its new value
    instead (the error may come after the change was made: it was not acknowledged, not undone)."""
    for k, v in acked.items():
        got = s.get(k)
        if got == v:
            continue
        in_flight = attempted.get(k) != v
        assert in_flight and got == attempted.get(k), f"op {n}: acknowledged {k!r} lost or changed"


def _assert_blocks_sealed(path: Path, n: int) -> None:
    """After a clean close every block file is sealed: a valid footer that agrees with its records."""
    from blockstore.purepy import PythonBackend
    from blockstore.records import ScanStop

    b = PythonBackend()
    for f in sorted((path / "blocks").iterdir()):
        raw = f.read_bytes()
        footer = b.decode_footer(raw[-64:])
        assert footer.block_id == int(f.name[:16], 16) and footer.data_end == len(raw) - 64, f"op {n}: {f.name}"
        fd = b.open_ro(str(f))
        try:
            res = b.scan(fd, 4096, len(raw), True)
        finally:
            b.close(fd)
        assert res.stop == ScanStop.END and res.next_offset == footer.data_end, f"op {n}: {f.name} {res.stop}"
        assert len(res.records) == footer.record_count and all(r.payload_ok for r in res.records), f"op {n}: {f.name}"


def _finish(s: blockstore.Store, attempted: dict[bytes, bytes]) -> None:
    """Redo the whole workload's intent on a store that failed part-way (ending with k0 deleted)."""
    for k, v in attempted.items():
        s.put(k, v)
    s.delete(b"k0")
    attempted.pop(b"k0", None)


FAULT_CASES = [
    ("cache", FaultInjector.WRITE, errno.ENOSPC, NoSpace),
    ("sync", FaultInjector.WRITE, errno.ENOSPC, NoSpace),
    ("cache", FaultInjector.WRITE, errno.EDQUOT, NoSpace),
    ("cache", FaultInjector.WRITE, errno.EIO, IOErrorBS),
    ("sync", FaultInjector.WRITE, errno.EIO, IOErrorBS),
    ("sync", FaultInjector.SYNC, errno.EIO, IOErrorBS),
    ("sync", FaultInjector.SYNC, errno.ENOSPC, NoSpace),
    ("cache", FaultInjector.OPEN, errno.EIO, IOErrorBS),
    ("sync", FaultInjector.OTHER, errno.EIO, IOErrorBS),
]
_MASK_NAMES = {FaultInjector.WRITE: "write", FaultInjector.SYNC: "sync", FaultInjector.OPEN: "open",
               FaultInjector.OTHER: "truncate-unlink"}


@pytest.mark.parametrize("durability,mask,err,cls", FAULT_CASES,
                         ids=[f"{d}-{_MASK_NAMES[m]}-{errno.errorcode[e]}" for d, m, e, _ in FAULT_CASES])
def test_write_fault_at_every_op(tmp_path: Path, faults: FaultInjector, durability: str, mask: int, err: int,
                                 cls: type[BlockstoreError]) -> None:
    """Fail the Nth write (or sync) for every N the workload performs: the failing call raises the
    mapped error, nothing acknowledged earlier is lost (before and after a reopen), and once the disk
    recovers the same store keeps working, with counters that agree with its contents."""
    opts = {"durability": durability, "block_size": MiB, "backend": "native"}
    with blockstore.open(tmp_path / "count", **opts) as s:
        faults.arm(mask, 0, 0)  # count only, never fail
        _workload(s, {}, {})
        n_ops = faults.op_count()
    assert n_ops >= (10 if mask in (FaultInjector.WRITE, FaultInjector.SYNC) else 1)
    for n in range(1, n_ops + 1):
        path = tmp_path / f"n{n}"
        acked: dict[bytes, bytes] = {}
        attempted: dict[bytes, bytes] = {}
        s = blockstore.open(path, **opts)
        try:
            faults.arm(mask, n, err)
            with pytest.raises(BlockstoreError) as ei:
                _workload(s, acked, attempted)
            faults.arm(0, 0, 0)
            assert type(ei.value) is cls, f"op {n}: {ei.value!r}"
            assert ei.value.errno == err and errno.errorcode[err] in str(ei.value)
            _check_acked(s, acked, attempted, n)
            # the disk is back: the store keeps working, on the key that failed too
            s.put(b"after", b"works")
            _finish(s, attempted)
            assert s.get(b"after") == b"works" and s.get(b"k0") is None
            wrong = [k for k, v in attempted.items() if s.get(k) != v]
            assert not wrong, f"op {n}: after the disk recovered, {wrong} do not read back what was just put"
        finally:
            faults.arm(0, 0, 0)
            s.close()
        with blockstore.open(path, **opts) as s:
            assert s.get(b"after") == b"works", f"op {n}: put acknowledged after the fault lost on reopen"
            for k, v in attempted.items():
                assert s.get(k) == v, f"op {n}: {k!r} lost on reopen"
            assert s.get(b"k0") is None, f"op {n}: deleted key came back"
            keys = list(attempted) + [b"after"]
            assert s.stats().records == len(keys), f"op {n}: block counters disagree with the directory"
            assert sorted(s.iter_keys()) == sorted(keys)
        _assert_blocks_sealed(path, n)


@pytest.mark.parametrize("durability", ["cache", "sync"])
def test_acknowledged_data_survives_a_fault_then_reopen(tmp_path: Path, faults: FaultInjector, durability: str) -> None:
    """Same as above without the recovery puts: reopen straight after the failed call."""
    opts = {"durability": durability, "block_size": MiB, "backend": "native"}
    with blockstore.open(tmp_path / "count", **opts) as s:
        faults.arm(FaultInjector.WRITE, 0, 0)
        _workload(s, {}, {})
        n_ops = faults.op_count()
    for n in range(1, n_ops + 1):
        path = tmp_path / f"n{n}"
        acked: dict[bytes, bytes] = {}
        attempted: dict[bytes, bytes] = {}
        with blockstore.open(path, **opts) as s:
            faults.arm(FaultInjector.WRITE, n, errno.ENOSPC)
            with pytest.raises(NoSpace):
                _workload(s, acked, attempted)
            faults.arm(0, 0, 0)
        with blockstore.open(path, **opts) as s:
            _check_acked(s, acked, attempted, n)
            for k in set(attempted) - set(acked):
                assert s.get(k) in (None, attempted[k])
            live = [k for k in set(attempted) | {b"k0"} if s.get(k) is not None]
            assert s.stats().records == len(live), f"op {n}: block counters disagree with the directory"


def test_persistent_enospc_then_recovery(tmp_path: Path, faults: FaultInjector) -> None:
    with blockstore.open(tmp_path / "s", block_size=MiB, backend="native") as s:
        s.put(b"old", b"kept")
        faults.arm(FaultInjector.WRITE, 1, errno.ENOSPC, persistent=True)
        for i in range(5):
            with pytest.raises(NoSpace):
                s.put(b"new%d" % i, _value(i))
        assert s.get(b"old") == b"kept"
        faults.arm(0, 0, 0)
        s.put(b"new0", b"finally")
    with blockstore.open(tmp_path / "s", block_size=MiB, backend="native") as s:
        assert s.get(b"old") == b"kept" and s.get(b"new0") == b"finally"
        assert [s.get(b"new%d" % i) for i in range(1, 5)] == [None] * 4
        assert s.stats().records == 2


@pytest.mark.parametrize("on_corrupt", ["raise", "miss"])
def test_read_eio(tmp_path: Path, faults: FaultInjector, on_corrupt: str) -> None:
    path = tmp_path / "s"
    vals = {b"a": _value(1), b"b": _value(2), b"c": _value(3)}
    with blockstore.open(path, backend="native") as s:
        s.put_many(list(vals.items()))
    with blockstore.open(path, backend="native", on_corrupt=on_corrupt) as s:
        faults.arm(FaultInjector.READ, 1, errno.EIO)
        if on_corrupt == "raise":
            with pytest.raises(IOErrorBS) as ei:
                s.get(b"b")
            assert type(ei.value) is IOErrorBS and ei.value.errno == errno.EIO and "EIO" in str(ei.value)
        else:
            assert s.get(b"b") is None
        faults.arm(FaultInjector.READ, 1, errno.EIO, persistent=True)
        if on_corrupt == "raise":
            with pytest.raises(IOErrorBS):
                s.get_many(list(vals))
            with pytest.raises(IOErrorBS):
                s.get_many([b"a"], out=[bytearray(len(vals[b"a"]))])
        else:
            assert s.get_many(list(vals)) == [None, None, None]
            buf = bytearray(len(vals[b"a"]))
            assert s.get_many([b"a"], out=[buf]) == [None]
        faults.arm(0, 0, 0)
        assert [bytes(v) for v in s.get_many(list(vals))] == list(vals.values())


def test_read_eio_hits_only_the_failed_block(tmp_path: Path, faults: FaultInjector) -> None:
    """One failed read in a multi-block get_many: with on_corrupt="miss" only that block's keys miss;
    the rest are returned, and correct."""
    path = tmp_path / "s"
    with blockstore.open(path, backend="native") as s:
        s.put(b"p1", b"one" * 1000, partition="A")
        s.put(b"p2", b"two" * 1000, partition="B")
    with blockstore.open(path, backend="native", on_corrupt="miss") as s:
        faults.arm(FaultInjector.READ, 1, errno.EIO)
        got = s.get_many([b"p1", b"p2"])
        faults.arm(0, 0, 0)
        assert sum(g is None for g in got) == 1
        for g, want in zip(got, [b"one" * 1000, b"two" * 1000]):
            assert g is None or bytes(g) == want
