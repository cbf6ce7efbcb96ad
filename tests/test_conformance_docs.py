"""Conformance with the documents, tested from outside: each test checks one promise of README.md,
docs/*.md or ../shared/DESIGN.md through the public API, the `blockstore` command or the bytes the format
documents (docs/format.md), the way a party that has only the documents would check it. Each test names
the promise it checks."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from rocksdict import Options, Rdict

import blockstore
from blockstore import (
    BlockstoreError,
    ChecksumMismatch,
    CorruptionError,
    FormatVersionError,
    InvalidArgument,
    IOErrorBS,
    NoSpace,
    NotFound,
    ReadOnlyStore,
    RemoteNotConfirmed,
    StoreClosed,
    StoreLocked,
    TruncatedError,
)

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockstore.tools.cli", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120)


def xxh(b: bytes) -> int:
    return xxhash.xxh3_64_intdigest(b)


def small_store(path: Path, **kw: Any) -> Path:
    """A closed store: a small record (8-aligned), an aligned one (≥ 4096 bytes), a deleted key."""
    with blockstore.open(path, **kw) as s:
        s.put(b"small", b"abc")
        s.put(b"big", b"y" * 5000)
        s.put(b"gone", b"x")
        s.delete(b"gone")
    return path


def block_files(path: Path) -> list[Path]:
    return sorted((path / "blocks").iterdir())


@pytest.fixture
def rdict_raw() -> Iterator[Any]:
    opened: list[Rdict] = []

    def open_(path: Path) -> Rdict:
        db = Rdict(str(path / "directory"), options=Options(raw_mode=True))
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


# ---------------------------------------------------------------------------------------- docs/format.md

def test_format_store_directory_layout_and_manifest(tmp_path: Path) -> None:
    """§1: MANIFEST.json's fields; LOCK holds the writer's pid as ASCII; block files are named by 16
    lower-case hex digits + .blk."""
    p = tmp_path / "s"
    with blockstore.open(p, durability="sync") as s:
        s.put(b"k", b"v")
        assert (p / "LOCK").read_text().strip() == str(os.getpid())
    m = json.loads((p / "MANIFEST.json").read_text())
    assert set(m) == {"magic", "format_version", "store_id", "block_size", "durability", "created"}
    assert m["magic"] == "blockstore" and m["format_version"] == 1 and m["durability"] == "sync"
    assert m["block_size"] == blockstore.DEFAULT_BLOCK_SIZE == 64 << 20 and isinstance(m["store_id"], int)
    assert {"MANIFEST.json", "LOCK", "directory", "blocks"} <= set(os.listdir(p))
    names = [f.name for f in block_files(p)]
    assert names and all(len(n) == 20 and n.endswith(".blk") and int(n[:16], 16) >= 1 and n[:16] == n[:16].lower()
                         for n in names)


def test_format_block_header_footer_and_records(tmp_path: Path) -> None:
    """§2: header (BSBLOCK, version, block id = file name, store id, header_xxh3), records (BSR1, kinds,
    8-aligned, ALIGNED payloads on 4096, both checksums, a tombstone's one-byte meta), footer of a sealed
    block (BSFOOTER at data_end = size - 64, record count, seq range, footer_xxh3)."""
    p = small_store(tmp_path / "s")
    sid = json.loads((p / "MANIFEST.json").read_text())["store_id"]
    [f] = block_files(p)
    b = f.read_bytes()
    magic, ver, flags, bid, store_id, _created, _ph, reserved, hx = struct.unpack_from("<8sIIQQQQQQ", b, 0)
    assert (magic, ver, flags, reserved) == (b"BSBLOCK\0", 1, 0, 0)
    assert bid == int(f.name[:16], 16) and store_id == sid and hx == xxh(b[:56]) and b[64:4096] == bytes(4032)
    fm, fv, ff, fbid, data_end, count, min_seq, max_seq, fx = struct.unpack("<8sIIQQQQQQ", b[-64:])
    assert (fm, fv, ff, fbid, data_end) == (b"BSFOOTER", 1, 0, bid, len(b) - 64) and fx == xxh(b[-64:-8])
    off, recs = 4096, []
    while off < data_end:
        rm, rv, kind, rfl, kl, ml, po, _ns, pl, rl, seq, px, rhx = struct.unpack_from("<4sBBHIIIIQQQQQ", b, off)
        key, meta = b[off + 64:off + 64 + kl], b[off + 64 + kl:off + 64 + kl + ml]
        assert (rm, rv) == (b"BSR1", 1) and off % 8 == 0 and rl % 8 == 0 and po >= 64 + kl + ml
        assert rhx == xxh(b[off:off + 56] + key + meta) and px == xxh(b[off + po:off + po + pl])
        assert rl - po - pl < 4096
        if rfl & 1:  # ALIGNED: payload and record end on 4096
            assert (off + po) % 4096 == 0 and (off + rl) % 4096 == 0
        assert rfl & ~1 == 0
        recs.append((kind, key, meta, pl, rfl & 1, seq))
        off += rl
    assert off == data_end and count == len(recs)
    assert [r[:2] for r in recs] == [(1, b"small"), (1, b"big"), (1, b"gone"), (3, b"gone")]
    assert recs[1][4] == 1 and recs[0][4] == 0  # a payload of ≥ 4096 bytes is ALIGNED, a small one not
    assert recs[3][2] == b"\x01" and recs[3][3] == 0  # a tombstone: meta = the key space (1 kv), no payload
    seqs = [r[5] for r in recs]
    assert seqs == sorted(seqs) and (min_seq, max_seq) == (seqs[0], seqs[-1])


def test_format_directory_counters_and_entries(tmp_path: Path, rdict_raw: Any) -> None:
    """§4/§5: after a clean close `M clean` is 1; the counters exist and are above what is on disk;
    namespaces are mirrored by N and I entries (ids from 1); every K entry has its R entry; block entry
    counters (written, live, records, tombstones, data_end) agree with the file."""
    p = small_store(tmp_path / "s")
    db = rdict_raw(p)
    items = {bytes(k): bytes(v) for k, v in db.items()}
    m = {k[1:].decode(): int.from_bytes(v, "little") for k, v in items.items() if k[:1] == b"M" and len(v) == 8}
    assert m["clean"] == 1 and m["format_version"] == 1
    for name in ("next_seq", "next_block", "next_ns", "bytes_put", "bytes_written", "session_first_block"):
        assert name in m, name
    assert m["next_seq"] > 4 and m["next_block"] > 1
    ns = {k[1:].decode(): int.from_bytes(v, "little") for k, v in items.items() if k[:1] == b"N"}
    ids = {int.from_bytes(k[1:5], "big"): v.decode() for k, v in items.items() if k[:1] == b"I"}
    assert ns == {"default": 1} and ids == {1: "default"}
    keys = {k[1:]: v for k, v in items.items() if k[:1] == b"K"}
    assert set(keys) == {b"\0\0\0\x01\x01small", b"\0\0\0\x01\x01big"}  # ns id BE + space 1 + key
    rev = {v for k, v in items.items() if k[:1] == b"R"}
    assert rev == set(keys)
    [(bk, bv)] = [(k, v) for k, v in items.items() if k[:1] == b"B"]
    ver, state, _r, plen, written, live, live_recs, total, tombs, data_end = struct.unpack_from("<BBHIQQQQQQ", bv)
    size = block_files(p)[0].stat().st_size
    assert (ver, state, live_recs, total, tombs) == (1, 2, 2, 4, 1) and data_end == size - 64
    assert written == data_end - 4096 and live < written and bv[88:88 + plen] == b"default"
    for v in keys.values():  # location value version 1 (no copies), naming the block above
        assert v[0] == 1 and int.from_bytes(v[8:16], "little") == int.from_bytes(bk[1:], "big")


def _bump_version(raw: bytes, version: int) -> bytes:
    return bytes([version]) + raw[1:]


@pytest.mark.parametrize("what", ["location", "block-entry"])
def test_format_newer_directory_value_is_not_repaired_as_damage(tmp_path: Path, what: str) -> None:
    """format.md §7: a newer version is FormatVersionError, never a guess; fsck.md: repair refuses whenever
    anything on disk is of a newer version (that is not damage). A directory value of a newer version is
    reported (exit 4) and `fsck --repair` changes nothing (it used to rewrite a newer location as damage)."""
    p = small_store(tmp_path / "s")
    db = Rdict(str(p / "directory"), options=Options(raw_mode=True))
    key = b"K\0\0\0\x01\x01small" if what == "location" else next(bytes(k) for k in db.keys() if k[:1] == b"B")
    newer = _bump_version(bytes(db[key]), 3 if what == "location" else 2)
    db[key] = newer
    db.close()
    with pytest.raises(FormatVersionError), blockstore.open(p, read_only=True) as s:
        s.get(b"small")
    r = cli("fsck", str(p))
    assert r.returncode == 4 and "newer" in r.stdout, r.stdout
    r = cli("fsck", "--repair", str(p))
    assert r.returncode == 4 and "refused" in r.stderr, (r.stdout, r.stderr)
    db2 = Rdict(str(p / "directory"), options=Options(raw_mode=True))
    try:
        assert bytes(db2[key]) == newer  # left as it was
    finally:
        db2.close()


def test_format_newer_block_structures_are_not_repaired(tmp_path: Path) -> None:
    """format.md §7 and fsck.md (repair refuses whenever anything on disk is of a newer version): a block
    header, record header or footer of version 2 (checksums right) is a finding, and `--repair` refuses."""
    for what in ("header", "record", "footer"):
        p = small_store(tmp_path / what)
        [f] = block_files(p)
        b = bytearray(f.read_bytes())
        if what == "header":
            struct.pack_into("<I", b, 8, 2)
            struct.pack_into("<Q", b, 56, xxh(bytes(b[:56])))
        elif what == "record":
            b[4096 + 4] = 2
            kl, ml = struct.unpack_from("<II", b, 4096 + 8)
            struct.pack_into("<Q", b, 4096 + 56, xxh(bytes(b[4096:4096 + 56]) + bytes(b[4096 + 64:4096 + 64 + kl + ml])))
        else:
            n = len(b)
            struct.pack_into("<I", b, n - 56, 2)
            struct.pack_into("<Q", b, n - 8, xxh(bytes(b[n - 64:n - 8])))
        f.write_bytes(bytes(b))
        r = cli("fsck", str(p))
        assert r.returncode == 4 and "newer format version" in r.stdout, (what, r.stdout)
        r = cli("fsck", "--repair", str(p))
        assert r.returncode == 4 and "refused" in r.stderr, (what, r.stdout, r.stderr)
        assert f.read_bytes() == bytes(b), what  # nothing changed


def test_format_manifest_versions(tmp_path: Path) -> None:
    """§1: a MANIFEST whose format_version is newer is FormatVersionError (read-only opens too); one whose
    magic differs is refused with a CorruptionError."""
    p = small_store(tmp_path / "s")
    m = json.loads((p / "MANIFEST.json").read_text())
    (p / "MANIFEST.json").write_text(json.dumps({**m, "format_version": 2}))
    for ro in (False, True):
        with pytest.raises(FormatVersionError):
            blockstore.open(p, read_only=ro)
    (p / "MANIFEST.json").write_text(json.dumps({**m, "magic": "other"}))
    with pytest.raises(CorruptionError):
        blockstore.open(p)


def test_format_block_size_limits_and_own_block_for_a_large_record(tmp_path: Path) -> None:
    """§2: block_size 64 KiB to 1 TiB (else InvalidArgument); a record larger than the block size gets a
    block of its own."""
    for bad in (64 * 1024 - 1, (1 << 40) + 1, 0):
        with pytest.raises(InvalidArgument):
            blockstore.open(tmp_path / f"bad{bad}", block_size=bad)
    with blockstore.open(tmp_path / "s", block_size=64 * 1024) as s:
        s.put(b"a", b"1" * 100)
        s.put(b"huge", b"H" * 200_000)
        s.put(b"b", b"2" * 100)
        a, huge, b = s.locate_many([b"a", b"huge", b"b"])
        assert a is not None and huge is not None and b is not None
        assert huge.block_id not in (a.block_id, b.block_id)
    sizes = {int(f.name[:16], 16): f.stat().st_size for f in block_files(tmp_path / "s")}
    assert sizes[huge.block_id] > 200_000 and sizes[a.block_id] < 64 * 1024


def test_format_limits_raise_invalid_argument_before_writing(tmp_path: Path) -> None:
    """§6 and README Limits: key 1..4096 bytes, namespace 1..255 bytes, meta ≤ 65536 bytes; violations (and
    wrong types and sequence lengths) raise InvalidArgument before anything is written."""
    with blockstore.open(tmp_path / "s") as s:
        s.put(b"k" * 4096, b"x")
        s.put(b"a", b"x", ns="n" * 255)
        s.put(b"m", b"x", meta=b"m" * 65536)
        before = s.stats().bytes_appended
        bad: list[Any] = [
            lambda: s.put(b"", b"x"), lambda: s.put(b"k" * 4097, b"x"), lambda: s.put("str", b"x"),
            lambda: s.put(b"a", b"x", ns=""), lambda: s.put(b"a", b"x", ns="n" * 256),
            lambda: s.put(b"a", b"x", meta=b"m" * 65537), lambda: s.put(b"a", "text"),
            lambda: s.put_chunk("u", "s", "c", "t", meta={"x": "a" * 70_000}),
            lambda: s.put_many([(b"q", b"1")], metas=[b"", b""]), lambda: s.put_many([(b"q", b"1", b"2")]),
            lambda: s.get_many([b"a"], out=[bytearray(8), bytearray(8)]), lambda: s.delete_many([b""]),
            lambda: s.get_many([b"k" * 4097]),
        ]
        for i, call in enumerate(bad):
            with pytest.raises(InvalidArgument):
                call()
            assert s.stats().bytes_appended == before, i


# -------------------------------------------------------------------------------- README: the Python API

def test_api_error_hierarchy() -> None:
    """README Errors: one hierarchy under BlockstoreError; ChecksumMismatch, TruncatedError and
    FormatVersionError are CorruptionErrors; RemoteNotConfirmed is an IOErrorBS."""
    for exc in (InvalidArgument, NoSpace, IOErrorBS, CorruptionError, NotFound, StoreLocked, ReadOnlyStore,
                StoreClosed, RemoteNotConfirmed, ChecksumMismatch, TruncatedError, FormatVersionError):
        assert issubclass(exc, BlockstoreError), exc
        assert exc.__name__ in blockstore.__all__
    for exc in (ChecksumMismatch, TruncatedError, FormatVersionError):
        assert issubclass(exc, CorruptionError)
    assert issubclass(RemoteNotConfirmed, IOErrorBS)


def test_api_open_options(tmp_path: Path) -> None:
    """blockstore.open: an option Store does not take is InvalidArgument naming it; bad values of
    durability / on_corrupt are InvalidArgument; create=False on nothing is NotFound saying `no store at`;
    a file, or a non-empty directory that is not a store, is refused unless allow_non_empty=True."""
    with pytest.raises(InvalidArgument, match="blok_size"):
        blockstore.open(tmp_path / "a", blok_size=1)
    with pytest.raises(InvalidArgument):
        blockstore.open(tmp_path / "b", durability="fast")
    with pytest.raises(InvalidArgument):
        blockstore.open(tmp_path / "c", on_corrupt="ignore")
    with pytest.raises(NotFound, match="no store at"):
        blockstore.open(tmp_path / "missing", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgument):
        blockstore.open(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(InvalidArgument):
        blockstore.open(tmp_path / "full")
    blockstore.open(tmp_path / "full", allow_non_empty=True).close()
    assert (tmp_path / "full" / "f").read_text() == "x"


def test_api_basic_contract(tmp_path: Path) -> None:
    """README Use: put replaces; delete returns whether the key existed; get_many gives memoryviews
    (page-aligned from a page up) and None for a miss; out= fills caller buffers and returns lengths;
    namespaces isolate; tensors keep shape and dtype; list_chunks is in temporal order."""
    np = pytest.importorskip("numpy")
    with blockstore.open(tmp_path / "s") as s:
        s.put(b"a", b"old")
        s.put(b"a", b"new")
        s.put(b"big", b"B" * 8192)
        va, vbig, miss = s.get_many([b"a", b"big", b"nope"])
        assert bytes(va) == b"new" and miss is None and isinstance(vbig, memoryview)
        assert np.frombuffer(vbig, np.uint8).ctypes.data % 4096 == 0
        buf = bytearray(8192)
        assert s.get_many([b"big", b"nope"], out=[buf, bytearray(1)]) == [8192, None] and buf == b"B" * 8192
        assert s.delete(b"a") is True and s.delete(b"a") is False and s.get(b"a") is None
        s.put(b"iso", b"1", ns="t1")
        assert s.get(b"iso", ns="t2") is None and s.get(b"iso") is None and s.get(b"iso", ns="t1") == b"1"
        arr = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
        s.put_tensor(b"kv", arr, ns="m")
        back = s.get_tensor(b"kv", ns="m")
        assert back.shape == (2, 3, 4) and back.dtype == np.float16 and (back == arr).all()
        s.put_chunk("alice", "s1", "c2", "second")
        s.put_chunk("alice", "s1", "c1", "first", meta={"turn": 2}, kv_keys=[b"kv"])
        s.put_chunks([blockstore.ChunkWrite("alice", "s1", "c0", "third")])
        assert [c.chunk_id for c in s.list_chunks("alice", "s1")] == ["c2", "c1", "c0"]
        c1 = s.get_chunk("alice", "s1", "c1")
        assert c1 is not None and c1.text == "first" and c1.meta == {"turn": 2} and c1.kv_keys == (b"kv",)
        assert s.contains_many([b"big", b"a"]) == [True, False]


def test_api_closed_read_only_and_locked(tmp_path: Path) -> None:
    """README Durability/Errors: one writer process per store (StoreLocked names the holder's pid); any
    number of read_only openers, which refuse writes with ReadOnlyStore; a closed store raises StoreClosed;
    close() twice is harmless."""
    p = tmp_path / "s"
    s = blockstore.open(p)
    s.put(b"k", b"v")
    code = (f"import blockstore\ntry:\n    blockstore.open({str(p)!r})\nexcept blockstore.StoreLocked as e:\n"
            f"    print('LOCKED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "LOCKED" in r.stdout and str(os.getpid()) in r.stdout, (r.stdout, r.stderr)
    s.close()
    s.close()
    for call in (lambda: s.put(b"k", b"v"), lambda: s.get_many([b"k"]), lambda: s.delete(b"k")):
        with pytest.raises(StoreClosed):
            call()
    with blockstore.open(p, read_only=True) as ro1, blockstore.open(p, read_only=True) as ro2:
        assert ro1.get(b"k") == ro2.get(b"k") == b"v"
        for call in (lambda: ro1.put(b"k", b"w"), lambda: ro1.delete(b"k")):
            with pytest.raises(ReadOnlyStore):
                call()


def test_api_corruption_is_an_error_or_a_miss_never_wrong_bytes(tmp_path: Path) -> None:
    """DESIGN invariant 1 / README Errors: a payload that fails its checksum raises ChecksumMismatch, or is
    a miss with on_corrupt="miss"; a sealed block cut short raises a CorruptionError (TruncatedError)."""
    p = small_store(tmp_path / "s")
    [f] = block_files(p)
    b = bytearray(f.read_bytes())
    b[4096 + 72] ^= 1  # the first record's payload ("abc" of key small)
    f.write_bytes(bytes(b))
    with blockstore.open(p, read_only=True) as s:
        with pytest.raises(ChecksumMismatch):
            s.get(b"small")
        assert s.get(b"big") == b"y" * 5000
    with blockstore.open(p, read_only=True, on_corrupt="miss") as s:
        assert s.get_many([b"small", b"big"])[0] is None
    os.truncate(f, 9000)
    with blockstore.open(p, read_only=True) as s, pytest.raises(TruncatedError):
        s.get(b"big")


def test_api_compaction_knobs_and_policies(tmp_path: Path) -> None:
    """README Compaction: GC threshold `gc_invalid_ratio` 0.5 by default, min_hits 2, relocation_slack 1,
    budgets 0.1, 64 MB/s, at most 4096 groups; the six named policies; an unknown policy or knob is
    InvalidArgument."""
    with blockstore.open(tmp_path / "s", compaction="full") as s:
        st = s.compactor.status()
        assert st["policy"] == "full" and st["running"] is True
        pol = s.compactor.policy
        assert (pol.gc_invalid_ratio, pol.min_hits, pol.relocation_slack) == (0.5, 2, 1)
        assert (pol.relocation_budget, pol.gc_budget, pol.rate_mb_s, pol.max_groups, pol.max_copies) == \
            (0.1, 0.1, 64.0, 4096, 0)
    for name in ("full", "no-gc", "no-relocation", "semantic-only", "append-only", "aggressive"):
        with blockstore.open(tmp_path / name, compaction=name) as s:
            assert s.compactor.status()["policy"] == name
    with blockstore.open(tmp_path / "k", compaction={"policy": "full", "gc_invalid_ratio": 0.4}) as s:
        assert s.compactor.policy.gc_invalid_ratio == 0.4
    with pytest.raises(InvalidArgument):
        blockstore.open(tmp_path / "x", compaction="bogus")
    with pytest.raises(InvalidArgument, match="nope"):
        blockstore.open(tmp_path / "y", compaction={"policy": "full", "nope": 1})


def test_api_remote_durability_needs_a_tier(tmp_path: Path) -> None:
    """README Durability: `remote` acknowledges a write only once a RemoteTier confirms it; with no tier
    attached a write is refused (InvalidArgument) before anything is written (docs/remote.md)."""
    with blockstore.open(tmp_path / "s", durability="remote", remote_timeout=0.5) as s:
        with pytest.raises(InvalidArgument):
            s.put(b"a", b"1")
        assert s.stats().bytes_appended == 0 and s.get(b"a") is None  # refused before anything is written


def test_api_idle_blocks_are_sealed_at_the_next_write(tmp_path: Path) -> None:
    """README Limits/format §2: a block idle for idle_seal_seconds is sealed at the next write."""
    import time
    with blockstore.open(tmp_path / "s", idle_seal_seconds=0.2) as s:
        s.put(b"a", b"1")
        [first] = s.block_table()
        assert first.state == 1  # open
        time.sleep(0.5)
        s.put(b"b", b"2", ns="other")
        states = {e.block_id: e.state for e in s.block_table()}
        assert states[first.block_id] == 2  # sealed


# ---------------------------------------------------------------------------------------------- logging

def test_logging_is_quiet_until_configured() -> None:
    """docs/observability.md: the `blockstore` logger has only a NullHandler. In a fresh interpreter: the CLI,
    run in-process by other tests, configures logging for its own output."""
    code = ("import logging, blockstore; hs = logging.getLogger('blockstore').handlers; "
            "print(bool(hs) and all(isinstance(h, logging.NullHandler) for h in hs))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", (r.stdout, r.stderr)


def test_logging_open_and_seal_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """docs/observability.md: INFO on `blockstore.open` for each open and on `blockstore.blocks` for a seal."""
    with caplog.at_level(logging.INFO, logger="blockstore"):
        with blockstore.open(tmp_path / "s") as s:
            s.put(b"a", b"1")
    names = {r.name for r in caplog.records if r.levelno == logging.INFO}
    assert "blockstore.open" in names and "blockstore.blocks" in names, names


# ------------------------------------------------------------------------------------ README: the CLI

@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conf") / "s"
    with blockstore.open(path) as s:
        s.put(b"plain", b"hello")
        s.put(b"we\x01ird\\k", b"bin\x00ary")
        s.put(b"k2", b"x" * 10, ns="t1")
    return path


def test_cli_keys_escape_and_paste_back(cli_store: Path) -> None:
    """README Command line: keys printed as ldb does (visible ASCII, `\\\\`, `\\xNN`) or hex with --hex; a key
    `scan` prints can be pasted into `get`; scan --json streams an array; get --json gives the value."""
    r = cli("scan", str(cli_store), "--ns", "default")
    assert r.returncode == 0
    printed = [line.split("key=")[1].split()[0] for line in r.stdout.splitlines()]
    assert printed == ["plain", "we\\x01ird\\\\k"]
    assert cli("get", str(cli_store), printed[1]).stdout == "bin\x00ary"
    r = cli("scan", str(cli_store), "--hex", "--ns", "default")
    hexed = [line.split("key=")[1].split()[0] for line in r.stdout.splitlines()]
    assert hexed == [b"plain".hex(), b"we\x01ird\\k".hex()]
    assert cli("get", str(cli_store), "--hex", hexed[0]).stdout == "hello"
    rows = json.loads(cli("scan", str(cli_store), "--json").stdout)
    assert isinstance(rows, list) and {(row["ns"], row["size"]) for row in rows} == {("default", 5), ("default", 7),
                                                                                     ("t1", 10)}
    assert len(json.loads(cli("scan", str(cli_store), "--limit", "1", "--json").stdout)) == 1
    got = json.loads(cli("get", str(cli_store), "plain", "--json").stdout)
    assert got["size"] == 5 and got["block"] == "0000000000000001"


def test_cli_exit_codes(cli_store: Path, tmp_path: Path) -> None:
    """README: 0 ok; 8 operational error (not a store, said as `no store at 'PATH' (why)`; a key,
    namespace or block that is not there); 16 usage error (bad flag, value or key), printed with usage."""
    p = str(cli_store)
    nostore = str(tmp_path / "nostore")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    for where in (nostore, str(tmp_path / "empty"), str(tmp_path / "afile")):
        for args in (("get", where, "k"), ("scan", where), ("stats", where), ("dump", where), ("fsck", where),
                     ("fsck", "--repair", where), ("metrics", where), ("compact", where), ("top", where, "--once")):
            r = cli(*args)
            assert r.returncode == 8 and f"no store at {where!r} (" in r.stderr, (args, r.stderr)
    assert not os.path.exists(nostore) and not os.listdir(tmp_path / "empty")  # the tools create nothing
    for args in (("get", p, "nope"), ("get", p, "plain", "--ns", "nons"), ("dump", p, "--block", "99")):
        assert cli(*args).returncode == 8, args
    for args in (("bogus",), ("scan", p, "--limit", "x"), ("get", p, "bad\\xZZ"), ("dump", p, "--block", "zz"),
                 ("stats", p, "--nope"), ("get", p), ("get", p, "plain", "--ns", ""), ("scan", p, "--ns", ""),
                 ("scan", p, "--ns", "n" * 256), ("fsck", "--repair", p, "--namespace", "")):
        # (the last four: a namespace that cannot be one is a bad flag value)
        r = cli(*args)
        assert r.returncode == 16 and "usage: blockstore" in r.stderr, (args, r.stderr)
    assert cli("--version").stdout.strip() == f"blockstore {blockstore.__version__}"


def test_cli_stats_and_dump_json(cli_store: Path) -> None:
    """README/`stats --help`: stats gives records, bytes, blocks, space/write amplification; space
    amplification is (block files + directory) / live logical bytes (DESIGN §6); dump --json streams the
    block table."""
    st = json.loads(cli("stats", str(cli_store), "--json").stdout)
    for k in ("records", "live_bytes", "live_logical_bytes", "blocks", "space_amplification", "write_amplification"):
        assert k in st, k
    assert st["records"] == 3
    assert st["space_amplification"] == pytest.approx((st["block_file_bytes"] + st["directory_bytes"])
                                                      / st["live_logical_bytes"])
    assert st["write_amplification"] == pytest.approx(st["bytes_appended"] / st["bytes_put"])
    rows = json.loads(cli("dump", str(cli_store), "--json").stdout)
    assert [r["state"] for r in rows] == ["sealed", "sealed"]
    assert {"block", "written_bytes", "live_bytes", "invalid_ratio", "partition"} <= set(rows[0])


def test_cli_fsck_output_exit_codes_and_repair(tmp_path: Path) -> None:
    """docs/fsck.md: `OK` and exit 0 on a clean store; one finding per line `<kind> <block>[:<offset>]
    <detail>`, exit 4; --json's document; --repair ends lines with [corrected: ...], exit 1, moves the
    block to lost+found with fsck-log.jsonl; a second fsck is clean; --repair beside a writer: exit 8."""
    p = small_store(tmp_path / "s")
    r = cli("fsck", str(p))
    assert (r.returncode, r.stdout) == (0, "OK\n")
    [f] = block_files(p)
    b = bytearray(f.read_bytes())
    b[4096 + 72] ^= 1
    f.write_bytes(bytes(b))
    r = cli("fsck", str(p))
    assert r.returncode == 4 and r.stdout.splitlines() == [r.stdout.splitlines()[0]]
    kind, where, _detail = r.stdout.split(" ", 2)
    assert kind == "payload" and where == f"{f.name[:16]}:4096"
    doc = json.loads(cli("fsck", str(p), "--json").stdout)
    assert set(doc) == {"path", "mode", "findings", "summary", "exit_code"} and doc["exit_code"] == 4
    assert doc["mode"] == "check" and set(doc["findings"][0]) == {"kind", "block", "offset", "detail", "corrected",
                                                                  "action"}
    for k in ("blocks", "block_files", "keys", "records", "bytes", "findings", "by_kind", "writer_pid", "passes",
              "notes", "corrected", "uncorrected", "refused", "lost_found"):
        assert k in doc["summary"], k
    r = cli("fsck", "--repair", "--json", str(p))
    doc = json.loads(r.stdout)
    assert r.returncode == doc["exit_code"] == 1 and doc["mode"] == "repair"
    assert doc["findings"][0]["corrected"] is True and doc["findings"][0]["action"]
    summary = doc["summary"]
    assert (summary["findings"], summary["corrected"], summary["uncorrected"]) == (1, 1, 0)
    assert summary["by_kind"] == {"payload": 1}  # the findings reported (it said {}: the final check's)
    assert summary["lost_found"] == [str(p / "lost+found" / f.name)]
    assert (p / "lost+found" / f.name).exists()
    log = [json.loads(line) for line in (p / "lost+found" / "fsck-log.jsonl").read_text().splitlines()]
    assert log and log[0]["file"] == f.name
    assert cli("fsck", str(p)).returncode == 0
    with blockstore.open(p) as s:
        assert s.get(b"big") == b"y" * 5000 and s.get(b"small") is None  # salvaged; the damaged one a miss
        r = cli("fsck", "--repair", str(p))
        assert r.returncode == 8 and "locked" in r.stderr
        assert cli("fsck", str(p)).returncode == 0  # safe beside the writer


def test_cli_metrics_names(cli_store: Path) -> None:
    """docs/observability.md: `blockstore metrics PATH` prints the store's scrape-time gauges (Prometheus
    text, or --json)."""
    r = cli("metrics", str(cli_store))
    assert r.returncode == 0
    names = {line.split("{")[0].split(" ")[0] for line in r.stdout.splitlines() if line and line[0] != "#"}
    for n in ("blockstore_records", "blockstore_live_bytes", "blockstore_live_logical_bytes", "blockstore_written_bytes",
              "blockstore_blocks", "blockstore_open_blocks", "blockstore_block_file_bytes",
              "blockstore_directory_bytes", "blockstore_space_amplification", "blockstore_write_amplification",
              "blockstore_put_bytes_total", "blockstore_appended_bytes_total", "blockstore_block_invalid_ratio_count",
              "blockstore_recovered", "blockstore_recovery_scanned_blocks", "blockstore_recovery_truncated_bytes",
              "blockstore_recovery_dropped_entries", "blockstore_recovery_missing_blocks",
              "blockstore_recovery_forgotten_blocks", "blockstore_read_only"):
        assert n in names, n
    doc = json.loads(cli("metrics", str(cli_store), "--json").stdout)
    assert "blockstore_records" in {m["name"] for m in doc["metrics"]}
    top = json.loads(cli("top", str(cli_store), "--once", "--json").stdout)
    assert top["stats"]["records"] == 3


# ------------------------------------------------------------------------ README: placement, durability

def test_placement_session_partition_and_put_many(tmp_path: Path) -> None:
    """README Placement: records of one put_many are written next to each other; session_partition(user,
    session) is the partition= that puts KV records next to that chunk session's records; a chunk's user,
    session and chunk id are 1..1024 bytes (format §5)."""
    with blockstore.open(tmp_path / "s") as s:
        part = s.session_partition("alice", "s1")
        s.put_chunk("alice", "s1", "c1", "text", kv_keys=[b"kv-0"])
        s.put(b"other", b"z", partition="elsewhere")
        s.put_many([(b"kv-0", b"x" * 100), (b"kv-1", b"y" * 100)], partition=part)
        kv0, kv1, other = s.locate_many([b"kv-0", b"kv-1", b"other"])
        assert kv0 is not None and kv1 is not None and other is not None
        assert kv0.block_id == kv1.block_id != other.block_id
        assert kv1.offset == kv0.offset + kv0.record_len  # next to each other
        chunk_blocks = {e.block_id for e in s.block_table() if e.partition.endswith(b"alice\x00\x02s1")}
        assert chunk_blocks == {kv0.block_id}
        for user, session, chunk in (("u" * 1025, "s", "c"), ("u", "s" * 1025, "c"), ("", "s", "c"),
                                     ("u", "s", "c" * 1025), ("u", "s", "")):
            with pytest.raises(InvalidArgument):
                s.put_chunk(user, session, chunk, "t")
        s.put_chunk("u" * 1024, "s" * 1024, "c" * 1024, "t")


def test_chunk_record_meta_as_documented(tmp_path: Path) -> None:
    """format §2.2: a chunk record's meta is JSON {"user", "session", "chunk", "ts_ns", "meta", "kv_keys":
    [hex]}, its payload the text in UTF-8, kind 2."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put_chunk("alice", "s1", "c7", "text of the memory é", meta={"turn": 3}, kv_keys=[b"kv-0"])
    [f] = block_files(p)
    b = f.read_bytes()
    _m, _v, kind, _fl, kl, ml, po, _ns, pl = struct.unpack_from("<4sBBHIIIIQ", b, 4096)
    meta = json.loads(b[4096 + 64 + kl:4096 + 64 + kl + ml])
    assert kind == 2 and {"user", "session", "chunk", "ts_ns", "meta", "kv_keys"} <= set(meta)
    assert (meta["user"], meta["session"], meta["chunk"], meta["meta"], meta["kv_keys"]) == \
        ("alice", "s1", "c7", {"turn": 3}, [b"kv-0".hex()])
    assert b[4096 + po:4096 + po + pl].decode("utf-8") == "text of the memory é"
    assert b[4096 + 64:4096 + 64 + kl] == b"\x00\x05alice\x00\x02s1c7"  # u16 BE len + user + ... + chunk id


def test_manifest_durability_follows_the_last_writer(tmp_path: Path) -> None:
    """format §1: MANIFEST's durability is rewritten by a writer whose durability differs."""
    p = tmp_path / "s"
    blockstore.open(p).close()
    assert json.loads((p / "MANIFEST.json").read_text())["durability"] == "cache"
    blockstore.open(p, durability="sync").close()
    assert json.loads((p / "MANIFEST.json").read_text())["durability"] == "sync"
    blockstore.open(p, read_only=True).close()
    assert json.loads((p / "MANIFEST.json").read_text())["durability"] == "sync"


def test_python_backend_on_request(tmp_path: Path) -> None:
    """README Install: BLOCKSTORE_BACKEND=python picks the pure-Python backend (same format)."""
    p = tmp_path / "s"
    code = ("import blockstore, sys\ns = blockstore.open(sys.argv[1])\ns.put(b'k', b'v' * 5000)\n"
            "print(type(s.backend).__module__)\ns.close()")
    r = subprocess.run([sys.executable, "-c", code, str(p)], env={**os.environ, "BLOCKSTORE_BACKEND": "python"},
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "blockstore.purepy", r.stderr
    with blockstore.open(p, backend="native") as s:
        assert s.get(b"k") == b"v" * 5000


def test_unclean_stop_scans_only_open_blocks_and_keeps_acknowledged_puts(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """README/format §4: after an unclean stop (kill -9 in sync mode), opening scans only the blocks that
    were still open, and every acknowledged put is there; fsck before that reports `unsealed` and `unclean`
    (exit 4); the store then opens clean; recovery logs INFO on blockstore.recovery."""
    p = tmp_path / "s"
    code = (f"import blockstore, os, signal\ns = blockstore.open({str(p)!r}, durability='sync', block_size=65536)\n"
            "for i in range(10):\n    s.put(b'k%d' % i, b'x' * 30000)\n"
            "s.put(b'last', b'y' * 10, ns='other')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    r = cli("fsck", str(p))
    kinds = {line.split()[0] for line in r.stdout.splitlines()}
    assert r.returncode == 4 and kinds == {"unsealed", "unclean"}, r.stdout
    with blockstore.open(p, read_only=True) as ro:
        open_blocks = sorted(e.block_id for e in ro.block_table() if e.state == 1)
        sealed = [e for e in ro.block_table() if e.state == 2]
    assert open_blocks and len(sealed) >= 3
    with caplog.at_level(logging.INFO, logger="blockstore"), blockstore.open(p) as s:
        assert sorted(s.recovery_report["scanned_blocks"]) == open_blocks
        # observability.md: INFO on blockstore.recovery says what recovery did, and the open's line
        assert {"blockstore.recovery", "blockstore.open"} <= {r.name for r in caplog.records}
        assert s.get(b"last", ns="other") == b"y" * 10
        assert all(s.get(b"k%d" % i) == b"x" * 30000 for i in range(10))
    assert cli("fsck", str(p)).returncode == 0
    with blockstore.open(p) as s:  # format §4: opening with clean == 1 scans nothing
        assert not (s.recovery_report or {}).get("scanned_blocks")  # None: no recovery ran


def test_fsck_repair_refuses_when_lost_found_is_not_a_folder(tmp_path: Path) -> None:
    """docs/fsck.md: when something other than a folder has the name lost+found, repair refuses before it
    changes anything (exit 8, naming it)."""
    p = small_store(tmp_path / "s")
    [f] = block_files(p)
    b = bytearray(f.read_bytes())
    b[4096 + 72] ^= 1
    f.write_bytes(bytes(b))
    (p / "lost+found").write_text("not a folder")
    r = cli("fsck", "--repair", str(p))
    assert r.returncode == 8 and "lost+found" in r.stderr, (r.stdout, r.stderr)
    assert f.read_bytes() == bytes(b) and (p / "lost+found").read_text() == "not a folder"


def test_cli_verbosity_flags(cli_store: Path) -> None:
    """README/observability: `blockstore -v COMMAND` logs INFO to stderr (an open's line); -q errors only."""
    r = cli("-v", "stats", str(cli_store))
    assert r.returncode == 0 and "blockstore.open" in r.stderr, r.stderr
    r = cli("-q", "stats", str(cli_store))
    assert r.returncode == 0 and r.stderr == ""


def test_a_block_file_the_directory_does_not_name_is_never_deleted(tmp_path: Path) -> None:
    """DESIGN invariant 4 / format §4: a file the directory does not account for is never deleted by an open
    or a repair; a writable open refuses (CorruptionError naming `fsck --repair`), a read-only one reads;
    fsck reports an `orphan-block` (exit 4), and --repair moves it to lost+found (exit 1)."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"a", b"1")
    stray = p / "blocks" / "0000000000000002.blk"
    stray.write_bytes(b"junk" * 100)
    with blockstore.open(p, read_only=True) as ro:
        assert ro.get(b"a") == b"1"
    with pytest.raises(CorruptionError, match="fsck --repair"):
        blockstore.open(p)
    assert stray.read_bytes() == b"junk" * 100
    r = cli("fsck", str(p))
    assert r.returncode == 4 and r.stdout.startswith("orphan-block 0000000000000002 ")
    assert cli("fsck", "--repair", str(p)).returncode == 1
    assert (p / "lost+found" / stray.name).read_bytes() == b"junk" * 100
    with blockstore.open(p) as s:
        assert s.get(b"a") == b"1"


def test_gc_copies_go_back_to_their_partition_and_keep_their_seq(tmp_path: Path) -> None:
    """README Compaction / format §5.3: GC reclaims sealed blocks at φ ≥ 0.5, copying their live records back
    into their own partition's stream, each keeping its sequence number; `blockstore compact` prints what it
    moved and exits 0; the blocks it empties are deleted; reads are unchanged."""
    p = tmp_path / "s"
    with blockstore.open(p, block_size=65536) as s:
        for i in range(12):
            s.put(b"k%02d" % i, bytes([i]) * 5000, partition="p1")
        for i in range(12):
            s.put(b"j%02d" % i, b"x" * 5000, partition="p2")
        for i in range(12):
            if i % 4:
                s.delete(b"k%02d" % i)
        before = {k: loc for k, loc in zip((b"k00", b"k04", b"k08"), s.locate_many([b"k00", b"k04", b"k08"]))}
        victims = {loc.block_id for loc in before.values() if loc is not None}
    r = cli("-v", "compact", str(p), "--no-budget")
    assert r.returncode == 0 and "gc: collected 3 blocks" in r.stdout, r.stdout
    assert "INFO blockstore.compaction" in r.stderr  # observability.md: a pass that moved something
    with blockstore.open(p, read_only=True) as s:
        table = {e.block_id: e for e in s.block_table()}
        after = dict(zip(before, s.locate_many(list(before))))
        for k, loc in after.items():
            assert loc is not None and loc.block_id not in victims
            assert table[loc.block_id].partition == b"default\x00p1"  # the victims' partition, not a GC stream
            assert loc.seq == before[k].seq  # type: ignore[union-attr]
            assert s.get(k) == bytes([int(k[1:])]) * 5000
        assert not victims & set(table)
    assert not {f"{b:016x}.blk" for b in victims} & {f.name for f in block_files(p)}
    # format §5/§5.3: A#counters (GC bytes, relocated bytes, blocks reclaimed, groups, read bytes), and
    # M block_min_seq/<id> written with a seal and deleted with its block
    db = Rdict(str(p / "directory"), options=Options(raw_mode=True))
    try:
        raw = bytes(db[b"A#counters"])
        gc_bytes, relocated, reclaimed, _groups, _read = struct.unpack("<5Q", raw)
        assert (gc_bytes, relocated, reclaimed) == (36_864, 0, 3)
        min_seqs = {int(bytes(k)[len(b"Mblock_min_seq/"):], 16): int.from_bytes(bytes(v), "little")
                    for k, v in db.items() if bytes(k).startswith(b"Mblock_min_seq/")}
    finally:
        db.close()
    assert set(min_seqs) == set(table)
    gc_block = after[b"k00"].block_id  # type: ignore[union-attr]
    assert min_seqs[gc_block] == min(loc.seq for loc in before.values())  # type: ignore[union-attr]


def test_value_limit_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    """README Limits / format §6: a value of 4 GiB or more raises InvalidArgument before anything is written
    (numpy's zeros are not touched: this costs no memory)."""
    np = pytest.importorskip("numpy")
    with blockstore.open(tmp_path / "s") as s:
        with pytest.raises(InvalidArgument):
            s.put(b"k", np.zeros(4 << 30, np.uint8))
        assert s.stats().bytes_appended == 0 and s.get(b"k") is None


def test_read_only_commands_beside_a_writer(tmp_path: Path) -> None:
    """README Command line: get, scan, stats, dump and fsck open the store read-only, so they are safe beside
    a running writer and see what it had committed (an open block included, up to its committed end)."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"a", b"1" * 100)
        s.put(b"b", b"2" * 10)
        s.delete(b"b")
        out = tmp_path / "out"
        assert cli("get", str(p), "a", "--out", str(out)).returncode == 0 and out.read_bytes() == b"1" * 100
        assert cli("get", str(p), "b").returncode == 8
        assert [line.split()[1] for line in cli("scan", str(p)).stdout.splitlines()] == ["key=a"]
        st = json.loads(cli("stats", str(p), "--json").stdout)
        assert (st["records"], st["open_blocks"]) == (1, 1)
        [row] = json.loads(cli("dump", str(p), "--json").stdout)
        assert (row["state"], row["live_records"], row["total_records"], row["tombstones"]) == ("open", 1, 3, 1)
        recs = json.loads(cli("dump", str(p), "--block", row["block"], "--json").stdout)
        assert [(r["kind"], r["live"]) for r in recs] == [("kv", True), ("kv", False), ("tombstone", False)]
        r = cli("fsck", str(p))
        assert (r.returncode, r.stdout) == (0, "OK\n") and "writer" in r.stderr
        s.put(b"c", b"3")  # the writer goes on
        assert s.get(b"c") == b"3"


def test_compaction_learns_one_request_per_get_many_or_request_block(tmp_path: Path) -> None:
    """README Compaction/Placement: every get_many is one request; `with store.request():` makes every read
    inside it one request; requests sharing at least half their keys fold into one group; hint() adds a
    group of keys."""
    with blockstore.open(tmp_path / "s", compaction={"policy": "full", "background": False}) as s:
        for i in range(4):
            s.put(b"k%d" % i, b"x" * 100)
        s.get_many([b"k0", b"k1"])
        s.get_many([b"k2"])
        st = s.compactor.status()
        assert (st["requests_observed"], st["groups_tracked"], st["keys_tracked"]) == (2, 1, 2)
        with s.request():
            s.get_many([b"k0"])
            s.get(b"k3")
        st = s.compactor.status()
        assert (st["requests_observed"], st["groups_tracked"], st["keys_tracked"]) == (3, 1, 3)  # k3 joined
        s.compactor.hint([b"k1", b"k2"], ns="default")
        assert s.compactor.status()["keys_tracked"] == 4


def test_reserve_is_ignored_by_fsck_and_absent_on_a_roomy_disk(tmp_path: Path) -> None:
    """format §1 / README: STORE/RESERVE holds no data, fsck ignores it; on a roomy disk there is no file (a
    held one is removed at the next write that adds data)."""
    st = os.statvfs(tmp_path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if free < max(total // 5, 8 << 30):
        pytest.skip("the disk is not roomy enough for 'no reserve file'")
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"a", b"1")
    assert not (p / "RESERVE").exists()
    (p / "RESERVE").write_bytes(bytes(1 << 20))  # as a store that was low holds it
    assert cli("fsck", str(p)).stdout == "OK\n"
    with blockstore.open(p) as s:
        s.put(b"b", b"2")
        assert s.get(b"a") == b"1"
    assert not (p / "RESERVE").exists()


def test_a_creation_cut_short_before_its_manifest_is_created_again(tmp_path: Path) -> None:
    """format §1: MANIFEST.json is written last at creation, so a creation cut short leaves no MANIFEST and
    the next open creates the store again (not refused as a non-empty folder)."""
    p = tmp_path / "s"
    blockstore.open(p).close()
    (p / "MANIFEST.json").unlink()
    with blockstore.open(p) as s:
        s.put(b"a", b"1")
    assert json.loads((p / "MANIFEST.json").read_text())["magic"] == "blockstore"
    with blockstore.open(p, create=False) as s:
        assert s.get(b"a") == b"1"
    (p / "MANIFEST.json").unlink()  # now with block files: a lost MANIFEST, not a creation cut short
    with pytest.raises(CorruptionError, match="fsck --repair"):
        blockstore.open(p)
    assert cli("fsck", "--repair", str(p)).returncode == 1
    with blockstore.open(p, create=False) as s:
        assert s.get(b"a") == b"1"


def test_fsck_help_explains_every_documented_kind() -> None:
    """README: `blockstore COMMAND --help` explains each command and its output; docs/fsck.md lists the
    finding kinds: `fsck --help` explains each of them and the exit codes."""
    table = (ROOT / "docs" / "fsck.md").read_text().split("## Finding kinds")[1].split("**Evacuation**")[0]
    kinds = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert len(kinds) >= 20 and "orphan-block" in kinds
    r = cli("fsck", "--help")
    assert r.returncode == 0
    helped = {line.strip() for line in r.stdout.splitlines() if line and not line[0].isspace()}
    assert set(kinds) <= helped, set(kinds) - helped
    for code in ("0 clean", "1 findings corrected", "4 findings left", "8 operational error", "16 usage error"):
        assert code in " ".join(r.stdout.split()), code


def _documented_metric_names() -> list[str]:
    """The names in docs/observability.md's metrics table: `blockstore_x_y`, `_z` (same first two words) and
    `blockstore_x_{a,b}` forms."""
    doc = (ROOT / "docs" / "observability.md").read_text().split("## Metrics")[1].split("## `blockstore top`")[0]
    names: list[str] = []
    for line in doc.splitlines():
        if not line.startswith("| `blockstore_"):
            continue
        base = None
        for tok in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if tok.startswith("blockstore_") and "{" in tok:
                pre, alts = tok.split("{")
                names += [pre + a for a in alts.rstrip("}").split(",")]
            elif tok.startswith("blockstore_"):
                names.append(tok)
                base = "_".join(tok.split("_")[:2])
            elif tok.startswith("_") and base:
                names.append(base + tok)
    return names


def test_every_documented_metric_is_exported(tmp_path: Path) -> None:
    """docs/observability.md: every metric of its table is in blockstore.metrics.REGISTRY for a store with
    compaction and an L2 adapter, with metrics enabled."""
    pytest.importorskip("lmcache")
    from prometheus_client import generate_latest

    from blockstore import metrics
    from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig

    names = _documented_metric_names()
    assert len(names) >= 50
    was = metrics.enabled
    metrics.enable()
    adapter = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict({"path": str(tmp_path / "kv")}))
    try:
        with blockstore.open(tmp_path / "s", compaction="full") as s:
            s.put(b"a", b"1")
            s.get_many([b"a"])
            s.delete(b"a")
            s.seal_open_blocks()
            text = generate_latest(metrics.REGISTRY).decode()
    finally:
        adapter.close()
        if not was:
            metrics.disable()
    have = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    missing = [n for n in names if not any(h == n or h.startswith(n + "_") for h in have)]
    assert not missing, missing


def test_compact_dry_run_beside_a_writer_and_refusal_without(tmp_path: Path) -> None:
    """README Command line: `compact --dry-run` plans on the store opened read-only, so it works beside a
    writer and changes nothing; without --dry-run a store in use is refused (exit 8); with nothing to do on
    a store of its own it writes nothing (exit 0)."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"a", b"1")
        r = cli("compact", str(p), "--dry-run")
        assert r.returncode == 0 and "dry run" in r.stdout
        r = cli("compact", str(p))
        assert r.returncode == 8 and "locked" in r.stderr
    listing = sorted(os.listdir(p / "directory"))
    r = cli("compact", str(p))
    assert r.returncode == 0 and "nothing written" in r.stdout
    assert sorted(os.listdir(p / "directory")) == listing  # not even opened for writing


def test_every_command_speaks_json(cli_store: Path) -> None:
    """README Command line: `--json` gives every command's output as JSON."""
    p = str(cli_store)
    for args in (("get", p, "plain"), ("scan", p), ("stats", p), ("dump", p), ("dump", p, "--keys"),
                 ("dump", p, "--block", "1"), ("fsck", p), ("metrics", p), ("top", p, "--once"),
                 ("compact", p, "--dry-run")):
        r = cli(*args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        json.loads(r.stdout, parse_constant=_not_json)  # NaN / Infinity are Python's, not JSON


def _not_json(token: str) -> Any:
    raise AssertionError(f"{token} is not JSON")


def test_namespace_isolation_across_every_call(tmp_path: Path) -> None:
    """DESIGN §3 / README: a reader of one namespace can never see another's records: KV and chunk reads,
    listings, presence, locations and deletes of namespace b leave namespace a's records unseen and intact."""
    with blockstore.open(tmp_path / "s") as s:
        s.put_chunk("u", "s", "c", "secret", ns="a")
        s.put(b"k", b"v", ns="a")
        assert s.list_chunks("u", "s", ns="b") == [] and s.get_chunk("u", "s", "c", ns="b") is None
        assert s.get_chunk("u", "s", "c") is None and s.get_chunks([("u", "s", "c")], ns="b") == [None]
        assert list(s.iter_keys(ns="b")) == [] and s.contains_many([b"k"], ns="b") == [False]
        assert s.locate_many([b"k"], ns="b") == [None] and s.get_many([b"k"], ns="b") == [None]
        assert s.delete(b"k", ns="b") is False and s.delete_chunk("u", "s", "c", ns="b") is False
        assert s.get(b"k", ns="a") == b"v" and s.get_chunk("u", "s", "c", ns="a").text == "secret"  # type: ignore[union-attr]
        assert list(s.iter_keys(ns="a")) == [b"k"]


def test_tensor_record_meta_as_documented(tmp_path: Path) -> None:
    """format §2.2: a tensor record (kind kv) carries {"lib", "dtype", "shape"} as JSON meta."""
    np = pytest.importorskip("numpy")
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put_tensor(b"t", np.zeros((2, 3), np.float16))
        s.put(b"raw", b"x", meta=b"opaque")
    b = block_files(p)[0].read_bytes()
    metas = []
    off = 4096
    for _ in range(2):
        _m, _v, kind, _fl, kl, ml, _po, _ns, _pl, rl = struct.unpack_from("<4sBBHIIIIQQ", b, off)
        metas.append((kind, b[off + 64 + kl:off + 64 + kl + ml]))
        off += rl
    assert metas[0][0] == 1 and json.loads(metas[0][1]) == {"lib": "numpy", "dtype": "<f2", "shape": [2, 3]}
    assert metas[1] == (1, b"opaque")


def test_chunk_listing_key_and_chunk_tombstone_as_documented(tmp_path: Path) -> None:
    """format §5: the listing entry is S + ns id (BE u32) + u16 BE len + user + u16 BE len + session + ts_ns
    (BE u64) + chunk id, empty value; a chunk key is K + ns + space 2 + user key; format §2.2: a chunk's
    tombstone has the one-byte meta 2; a deleted chunk loses both entries."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put_chunk("al", "s1", "c7", "text", ts_ns=12345)
        s.put_chunk("al", "s1", "c8", "more", ts_ns=12346)
        s.delete_chunk("al", "s1", "c8")
    db = Rdict(str(p / "directory"), options=Options(raw_mode=True))
    try:
        items = {bytes(k): bytes(v) for k, v in db.items()}
    finally:
        db.close()
    ns = struct.pack(">I", 1)
    user_key = b"\x00\x02al\x00\x02s1"
    assert {k: v for k, v in items.items() if k[:1] == b"S"} == {b"S" + ns + user_key + struct.pack(">Q", 12345) + b"c7": b""}
    assert [k for k in items if k[:1] == b"K"] == [b"K" + ns + b"\x02" + user_key + b"c7"]
    tombs = []
    for f in block_files(p):
        b = f.read_bytes()
        off = 4096
        while off + 64 <= len(b) and b[off:off + 4] == b"BSR1":
            _m, _v, kind, _fl, kl, ml, _po, _ns, _pl, rl = struct.unpack_from("<4sBBHIIIIQQ", b, off)
            if kind == 3:
                tombs.append((b[off + 64:off + 64 + kl], b[off + 64 + kl:off + 64 + kl + ml]))
            off += rl
    assert tombs == [(user_key + b"c8", b"\x02")]


def test_documented_defaults() -> None:
    """README / blockstore.open's docstring / docs/remote.md: durability "cache", 64 MiB blocks, 64 open
    blocks, 30 s idle seal, read_gap 128 KiB, read_ahead on, on_corrupt "raise", remote_seal_seconds 0.2,
    remote_timeout 30 s, no compaction unless asked, allow_non_empty off."""
    import inspect
    params = inspect.signature(blockstore.Store).parameters
    defaults = {name: p.default for name, p in params.items() if name != "path"}
    assert defaults == {
        "create": True, "read_only": False, "durability": "cache", "block_size": None, "max_open_blocks": 64,
        "idle_seal_seconds": 30.0, "read_gap": 128 * 1024, "read_ahead": True, "on_corrupt": "raise",
        "backend": None, "compaction": None, "allow_non_empty": False, "remote_seal_seconds": 0.2,
        "remote_timeout": 30.0,
    }
    assert blockstore.DEFAULT_BLOCK_SIZE == 64 << 20


def test_readme_blend_example(tmp_path: Path) -> None:
    """README Blended chunk KV: the example runs as written on the trained model; chunks missing from the store
    are computed and stored on the way; the same chunks in another order are loaded, ratio 0.15 of the
    tokens recomputed and the rest reused; a ChunkKVStore of another checkpoint is refused by the Blender."""
    torch = pytest.importorskip("torch")
    from blockstore.blend import Blender, ChunkKVStore, LlamaWeights

    w = LlamaWeights.from_pretrained(str(ROOT / "jobs" / "models" / "trained-llama"))
    ids = torch.randint(5, 1000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, ns="kv-blend", model_id=w.model_id)
        first = Blender(w, kv, ratio=0.15).blend(ids, spans=[(0, 300), (300, 700)])
        assert len(first.missing_chunks) == 2
        again = Blender(w, kv, ratio=0.15).blend(ids[300:] + ids[:300], spans=[(0, 400), (400, 700)])
        assert again.missing_chunks == [] and again.reused_tokens == 700 - 105  # 15 % of 700 recomputed
        assert len(again.recomputed) == 105
        with pytest.raises(InvalidArgument):
            Blender(w, ChunkKVStore(store, ns="kv-blend", model_id="another-checkpoint"))


def test_chunk_meta_is_json_or_refused(tmp_path: Path) -> None:
    """format §2.2: a chunk record's meta is UTF-8 JSON; README Limits: a wrong argument raises
    InvalidArgument before anything is written. NaN and infinities have no JSON form (RFC 8259): Python's
    json.dumps wrote `NaN`, which other JSON readers refuse."""
    with blockstore.open(tmp_path / "s") as s:
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(InvalidArgument, match="JSON"):
                s.put_chunk("u", "s", "c", "t", meta={"score": bad})
        assert s.stats().bytes_appended == 0 and s.list_chunks("u", "s") == []
        s.put_chunk("u", "s", "c", "t", meta={"score": 0.5})
        assert s.get_chunk("u", "s", "c").meta == {"score": 0.5}  # type: ignore[union-attr]


def test_cli_get_on_a_terminal_escapes_control_bytes(tmp_path: Path) -> None:
    """`get --help` / README: the value goes to stdout as raw bytes, but on a terminal as text with control
    bytes escaped (no escape sequence reaches the terminal)."""
    import pty
    p = tmp_path / "s"
    value = b"bin\x00ary\x1b[31mred\xff"
    with blockstore.open(p) as s:
        s.put(b"k", value)
    assert subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "get", str(p), "k"], capture_output=True,
                          cwd=str(ROOT), timeout=60).stdout == value  # a pipe: raw bytes
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "blockstore.tools.cli", "get", str(p), "k"], stdout=slave,
                            stderr=subprocess.DEVNULL, cwd=str(ROOT))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO once the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    assert b"\x1b" not in out and b"\x00" not in out and b"\\x1b[31mred" in out and b"\\x00" in out


def test_location_value_names_its_record(tmp_path: Path) -> None:
    """format §5.1: a location value (version 1) holds kind, flags, payload_off, block_id, offset, record_len,
    payload_len, seq, payload_xxh3 of its record, then a copy of the record's meta."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"small", b"abc", meta=b"m1")
        s.put(b"big", b"y" * 5000)
    db = Rdict(str(p / "directory"), options=Options(raw_mode=True))
    try:
        values = {k: bytes(db[b"K\0\0\0\x01\x01" + k]) for k in (b"small", b"big")}
    finally:
        db.close()
    [f] = block_files(p)
    b = f.read_bytes()
    for key, v in values.items():
        ver, kind, flags, po, bid, off, rl, pl, seq, px = struct.unpack_from("<BBHIQQQQQQ", v)
        assert ver == 1 and bid == int(f.name[:16], 16)
        _m, _rv, rkind, rfl, kl, ml, rpo, _ns, rpl, rrl, rseq, rpx = struct.unpack_from("<4sBBHIIIIQQQQ", b, off)
        assert (kind, flags, po, rl, pl, seq, px) == (rkind, rfl, rpo, rrl, rpl, rseq, rpx)
        assert b[off + 64:off + 64 + kl] == key and v[56:] == b[off + 64 + kl:off + 64 + kl + ml]
    assert values[b"small"][56:] == b"m1"


def test_repair_of_a_lost_directory_names_namespaces_by_partition_hash(tmp_path: Path) -> None:
    """docs/fsck.md: a lost directory is rebuilt from the blocks; namespace names live only in the
    directory, so an id is named by a --namespace candidate (or `default`) whose xxh3 matches the partition
    hash of a block holding only its records (a KV block of its default partition, or a chunk block);
    others become recovered-ns-<id>, their records still readable there."""
    import shutil
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"a", b"1", ns="tenant")
        s.put(b"b", b"2", ns="other", partition="custom")
        s.put(b"c", b"3")
        s.put_chunk("u", "s", "c", "text", ns="mem")
        other_id = s.namespace_id("other")
    shutil.rmtree(p / "directory")
    r = cli("fsck", "--repair", str(p), "--namespace", "tenant", "--namespace", "mem")
    assert r.returncode == 1 and r.stdout.startswith("directory - "), r.stdout
    with blockstore.open(p) as s:
        assert sorted(s.namespaces()) == sorted(["default", "mem", "tenant", f"recovered-ns-{other_id}"])
        assert s.get(b"a", ns="tenant") == b"1" and s.get(b"c") == b"3"
        assert s.get(b"b", ns=f"recovered-ns-{other_id}") == b"2"
        assert s.get_chunk("u", "s", "c", ns="mem").text == "text"  # type: ignore[union-attr]
    assert cli("fsck", str(p)).returncode == 0


def test_remote_tier_adapter_params(tmp_path: Path) -> None:
    """README (LMCache across nodes): RemoteTierL2Adapter needs adapter_params.remote with endpoint, bucket,
    access_key, secret_key and node_id; unknown keys and bad values stop the server with a message naming the
    key (a ValueError, as LMCache's config classes raise)."""
    pytest.importorskip("lmcache")
    from blockstore.connector.remote_tier import RemoteTierL2AdapterConfig

    base = {"endpoint": "http://127.0.0.1:1", "bucket": "kv", "access_key": "a", "secret_key": "s", "node_id": "node-a"}
    cfg = RemoteTierL2AdapterConfig.from_dict({"path": str(tmp_path / "kv"), "remote": base})
    assert cfg.remote.node_id == "node-a"  # type: ignore[attr-defined]
    for remote, named in ((None, "'remote'"), ({k: v for k, v in base.items() if k != "node_id"}, "node_id"),
                          ({**base, "nodeid": 1}, "nodeid"), ({**base, "client": "curl"}, "'client'")):
        params: dict[str, Any] = {"path": str(tmp_path / "kv")}
        if remote is not None:
            params["remote"] = remote
        with pytest.raises(ValueError, match=named):
            RemoteTierL2AdapterConfig.from_dict(params)


def test_a_sealed_block_left_with_nothing_is_deleted(tmp_path: Path) -> None:
    """format §5.2: a sealed block with live_records == 0 and tombstones == 0 is deleted (file and entry)
    once no reader holds it; while a reader holds it (hold_blocks), its file stays."""
    p = tmp_path / "s"
    with blockstore.open(p) as s:
        s.put(b"a", b"1" * 100, partition="p1")
        s.seal_open_blocks()
        [first] = s.block_table()
        path = p / "blocks" / f"{first.block_id:016x}.blk"
        with s.hold_blocks([first.block_id]):
            s.put(b"a", b"2" * 100, partition="p2")  # the only record of the first block dies
            assert path.exists()
        s.put(b"b", b"x", partition="p3")
        assert not path.exists() and first.block_id not in {e.block_id for e in s.block_table()}
        assert s.get(b"a") == b"2" * 100


def test_chunk_listing_follows_ts_overwrites_and_deletes(tmp_path: Path) -> None:
    """README / format §5 (S entries, in temporal order): list_chunks orders a session by ts_ns; an
    overwrite re-lists the chunk at its new time, once; the last write of a key in one put_chunks wins; a
    delete unlists it; sessions do not leak into each other (a NUL inside a session name included)."""
    with blockstore.open(tmp_path / "s") as s:
        s.put_chunk("u", "s", "c1", "a", ts_ns=200)
        s.put_chunk("u", "s", "c2", "b", ts_ns=100)
        assert [c.chunk_id for c in s.list_chunks("u", "s")] == ["c2", "c1"]
        s.put_chunk("u", "s", "c1", "a2", ts_ns=50)
        assert [(c.chunk_id, c.text) for c in s.list_chunks("u", "s")] == [("c1", "a2"), ("c2", "b")]
        s.put_chunks([blockstore.ChunkWrite("u", "s", "c3", "x", ts_ns=10),
                      blockstore.ChunkWrite("u", "s", "c3", "y", ts_ns=20)])
        assert [(c.chunk_id, c.text) for c in s.list_chunks("u", "s")] == [("c3", "y"), ("c1", "a2"), ("c2", "b")]
        assert s.delete_chunk("u", "s", "c1") is True and s.delete_chunk("u", "s", "c1") is False
        s.put_chunk("u", "s\x00x", "c9", "nul session")
        s.put_chunk("u", "s2", "c8", "other session")
        assert [c.chunk_id for c in s.list_chunks("u", "s")] == ["c3", "c2"]
        assert [c.chunk_id for c in s.list_chunks("u", "s\x00x")] == ["c9"]


def test_documented_modules_and_scripts_exist() -> None:
    """README.md and docs/*.md: every `python -m MODULE` they tell a user to run, and every script they
    name, is in the repository."""
    texts = [(ROOT / "README.md").read_text()] + [f.read_text() for f in sorted((ROOT / "docs").glob("*.md"))]
    modules = {m for t in texts for m in re.findall(r"python -m ([A-Za-z_][\w.]*)", t)} - {"build", "pytest", "jobs.NAME"}
    assert len(modules) > 10
    missing = [m for m in sorted(modules) if not (ROOT / (m.replace(".", "/") + ".py")).exists()
               and not (ROOT / m.replace(".", "/") / "__main__.py").exists()]
    assert not missing, missing
    scripts = {s for t in texts for s in re.findall(r"bash ((?:scripts|\.ci)/[\w.-]+)", t)}
    assert scripts and all((ROOT / s).exists() for s in scripts), scripts
    assert (ROOT / ".ci" / "run").exists()


def test_readme_command_synopsis_matches_help() -> None:
    """README Command line: every flag its synopsis gives a command is one that command's --help offers."""
    text = (ROOT / "README.md").read_text().split("## Command line")[1].split("```")[1]
    flags: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"blockstore (\w+) PATH(.*?)(?:  |$)", line.strip())
        if m:
            flags.setdefault(m.group(1), set()).update(re.findall(r"--[a-z][a-z-]*", m.group(2)))
    assert {"get", "scan", "stats", "dump", "compact", "fsck", "metrics", "top"} <= set(flags)
    for command, wanted in flags.items():
        r = cli(command, "--help")
        assert r.returncode == 0
        offered = set(re.findall(r"--[a-z][a-z-]*", r.stdout))
        assert wanted <= offered, (command, wanted - offered)


# the scripts strace runs: a failed stat of a marker path in the trace starts each phase
_MARKS = """
import os, sys, threading
import blockstore
def mark(name):
    try:
        os.stat("/nonexistent-MARK-" + name)
    except OSError:
        pass
"""

_SYNC_SCRIPT = _MARKS + """
s = blockstore.open(sys.argv[1], durability=sys.argv[2])
s.put(b"warm", b"w")
mark("puts")
for i in range(20):
    s.put(b"k%d" % i, b"x" * 1000)
s.put(b"over", b"1")
mark("overwrite")
s.put(b"over", b"2")
mark("delete")
s.delete(b"k1")
mark("close")
s.close()
"""


def _syncs_by_phase(path: Path, durability: str, script_text: str = _SYNC_SCRIPT) -> dict[str, int]:
    import shutil
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    script, trace = path.parent / "syncs.py", path.parent / f"strace-{durability}.out"
    script.write_text(script_text)
    r = subprocess.run([strace, "-f", "-qq", "-e", "trace=fsync,fdatasync,newfstatat,stat,statx", "-o", str(trace),
                        sys.executable, str(script), str(path), durability], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and ("ptrace" in r.stderr.lower() or "not permitted" in r.stderr):
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    counts: dict[str, int] = {}
    phase = None
    for line in trace.read_text().splitlines():
        m = re.search(r"nonexistent-MARK-(\w+)", line)
        if m:
            phase = m.group(1)
            counts[phase] = 0
        elif phase and re.search(r"\b(fsync|fdatasync)\(", line):
            counts[phase] += 1
    return counts


def test_durability_modes_sync_what_they_promise(tmp_path: Path) -> None:
    """README Durability / format §3: `cache` never syncs per put; it syncs an overwrite's new record (its
    directory write stays unsynced) and a delete (its tombstone and its directory batch); `sync` syncs every
    put (counted with strace: fsync and fdatasync calls between markers)."""
    cache = _syncs_by_phase(tmp_path / "cache", "cache")
    assert cache["puts"] == 0, cache  # 20 new keys (and the first write of `over`)
    assert cache["overwrite"] >= 1, cache
    assert cache["delete"] >= 2, cache  # the tombstone's block, then the directory batch
    sync = _syncs_by_phase(tmp_path / "sync", "sync")
    assert sync["puts"] >= 21, sync  # every put, one after another


_GROUP_SCRIPT = _MARKS + """
s = blockstore.open(sys.argv[1], durability="sync")
s.put(b"warm", b"w")
def writer(t):
    for i in range(25):
        s.put(b"t%d-%d" % (t, i), b"x" * 1000)
threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
mark("puts")
for t in threads:
    t.start()
for t in threads:
    t.join()
mark("close")
s.close()
"""


def test_sync_mode_group_commit_across_threads(tmp_path: Path) -> None:
    """README Durability: `sync` ... with group commit across threads: 8 threads' 200 durable puts need far
    fewer syncs than 2 a put (block file and directory); measured 102-106 on the 2-core VM."""
    counts = _syncs_by_phase(tmp_path / "s", "sync", _GROUP_SCRIPT)
    assert 0 < counts["puts"] < 300, counts


def test_documented_names_exist() -> None:
    """README and docs name these public entry points: each is importable where they say."""
    import importlib
    import importlib.util
    names = {
        "blockstore.compaction": ["AffinityJudge"],
        "blockstore.remote": ["RemoteTier", "S3Settings", "make_object_store", "restore_node"],
        "blockstore.metrics": ["serve", "REGISTRY", "enable", "disable"],
        "blockstore.logs": ["configure"],
        "blockstore.blend": ["Blender", "ChunkKVStore", "LlamaWeights"],
        "blockstore.tiering": ["RemoteNotConfirmed"],
    }
    if importlib.util.find_spec("lmcache") is not None:
        names["blockstore.connector.l2_adapter"] = ["BlockstoreL2Adapter", "BlockstoreL2AdapterConfig"]
        names["blockstore.connector.remote_plugin"] = ["BlockstoreConnectorAdapter", "BlockstorePluginConfigError"]
        names["blockstore.connector.remote_tier"] = ["RemoteTierL2Adapter"]
        names["blockstore.connector.blend_connector"] = ["multi_connector_config"]
    for module, attrs in names.items():
        mod = importlib.import_module(module)
        for attr in attrs:
            assert hasattr(mod, attr), f"{module}.{attr}"
    assert importlib.import_module("blockstore.tiering").RemoteNotConfirmed is blockstore.RemoteNotConfirmed
    for method in ("put", "put_many", "get", "get_many", "delete", "delete_many", "put_tensor", "get_tensor",
                   "put_chunk", "put_chunks", "get_chunk", "list_chunks", "delete_chunk", "stats", "session_partition",
                   "request", "evict_blocks", "seal_open_blocks", "close"):
        assert callable(getattr(blockstore.Store, method)), method


def test_manifest_naming_another_store_is_repaired_from_block_headers(tmp_path: Path) -> None:
    """docs/fsck.md `manifest`: a MANIFEST whose store id differs from every block header's is what is
    damaged; the open refuses (naming fsck --repair), fsck reports it (exit 4), --repair rewrites it from the
    headers (the old one to lost+found, exit 1) and every record reads again."""
    p = small_store(tmp_path / "s")
    m = json.loads((p / "MANIFEST.json").read_text())
    bad = {**m, "store_id": m["store_id"] + 1}
    (p / "MANIFEST.json").write_text(json.dumps(bad))
    with pytest.raises(CorruptionError, match="fsck --repair"):
        blockstore.open(p)
    r = cli("fsck", str(p))
    assert r.returncode == 4 and r.stdout.startswith("manifest - ")
    assert cli("fsck", "--repair", str(p)).returncode == 1
    assert json.loads((p / "MANIFEST.json").read_text())["store_id"] == m["store_id"]
    assert json.loads((p / "lost+found" / "MANIFEST.json").read_text()) == bad
    with blockstore.open(p) as s:
        assert s.get(b"big") == b"y" * 5000 and s.get(b"small") == b"abc"


def test_block_id_arguments_are_checked(tmp_path: Path) -> None:
    """README Limits / DESIGN invariant 7: a wrong argument (type, size) raises InvalidArgument naming it,
    never a TypeError or ValueError from inside, and is never taken for another: `evict_blocks([True])`
    evicted block 1 (a bool is an int to Python), `evict_blocks(5)` raised TypeError, `drop_local_copy("x")`
    ValueError. Covers the block-id arguments of Store's documented seams (README Capacity, docs/remote.md)."""
    with blockstore.open(tmp_path / "s") as s:
        s.put(b"a", b"1")
        s.seal_open_blocks()
        calls: list[Any] = [
            lambda: s.evict_blocks([True]), lambda: s.evict_blocks(5), lambda: s.evict_blocks(None),
            lambda: s.evict_blocks("x"), lambda: s.evict_blocks([1.5]), lambda: s.evict_blocks([-1]),
            lambda: s.evict_blocks([1 << 64]), lambda: s.hold_blocks(5), lambda: s.hold_blocks([None]),
            lambda: s.block_read_fd("x"), lambda: s.block_read_fd(None), lambda: s.drop_local_copy("x"),
            lambda: s.drop_local_copy(None), lambda: s.has_local_copy("x"), lambda: s.mark_block_remote(None, b"o"),
            lambda: s.restore_local_copy("1", b""),
        ]
        for i, call in enumerate(calls):
            with pytest.raises(InvalidArgument, match="block"):
                call()
            assert s.get(b"a") == b"1", i
        assert [e.block_id for e in s.block_table()] == [1]
        assert s.evict_blocks([]).blocks == []


def _stderr_on_a_terminal(args: list[str]) -> tuple[int, bytes]:
    """Run the command with stderr on a pseudo-terminal of 100 columns (tqdm draws nothing at width 0)."""
    import fcntl
    import pty
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "blockstore.tools.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=str(ROOT))
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out


def test_fsck_progress_bar_only_on_a_terminal_and_not_with_quiet(tmp_path: Path) -> None:
    """docs/fsck.md / README: fsck shows a progress bar over the bytes read on stderr, only on a terminal;
    --quiet (or --json) turns it off."""
    p = tmp_path / "s"
    with blockstore.open(p, block_size=1 << 20) as s:
        for i in range(8):
            s.put(b"k%d" % i, os.urandom(500_000))
    rc, err = _stderr_on_a_terminal(["fsck", str(p)])
    assert rc == 0 and b"fsck:" in err and b"%|" in err
    for flag in ("--quiet", "--json"):
        rc, err = _stderr_on_a_terminal(["fsck", str(p), flag])
        assert rc == 0 and b"%|" not in err, flag
    assert b"%|" not in cli("fsck", str(p)).stderr.encode()  # not a terminal: no bar
