"""`blockstore fsck` and `fsck --repair` against a corpus of damaged stores.

One store (built once) holds KV records of many sizes in two namespaces and three partitions, chunk
records of two users, an overwritten record whose first version is still on disk, and tombstones
whose deleted records still sit in other blocks. Each corpus test damages a private copy in one spot
(a byte of one structure, a cut, a missing file, the directory or one of its values, the MANIFEST)
with tests/test_corruption.py's helpers, and checks, through the command line run in-process:

1. reads through the public API return the right bytes, a miss, or a clean error, never other bytes;
2. `fsck` reports a finding of the right kind naming the right block, and exits 4;
3. `fsck --repair` exits 1 (everything corrected), every record outside the damaged spot reads back
   exactly, deleted keys stay deleted (no older version comes back), the damaged bytes are in
   lost+found/, a directory rebuilt from the block files agrees with the repaired one
   (compaction_helpers.rebuild_violations), and the store takes writes again;
4. a second `fsck` prints OK and exits 0.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from compaction_helpers import rebuild_violations
from test_corruption import _block_path, _flip

import blockstore
from blockstore import BlockstoreError
from blockstore.chunks import encode_chunk_key
from blockstore.directory import Directory, DirectoryBatch, Location
from blockstore.keys import SPACE_CHUNK, TAG_META, TAG_NS_ID, block_key, key_suffix, location_key, reverse_key
from blockstore.tools import cli
from blockstore.tools.fsck_report import KINDS

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 256 << 10
CHUNKS = {"c1": "short memory", "c2": "a longer memory " * 400, "c3": "to be forgotten"}
A2_FIRST = b"a2, first version"


@dataclass(frozen=True)
class Rec:
    name: str
    ns: str
    key: bytes  # KV key, or the chunk id
    value: bytes | None  # None: deleted
    loc: Location | None
    chunk: tuple[str, str] | None = None  # (user, session)


def _build(path: Path) -> dict[str, Rec]:
    """Blocks (256 KiB): 1 a0..a7 (and a2's first version, dead), 2 b0..b2, 3 b3..b5, 4 t0..t3 of tenant-b,
    the tombstone of t1 and bob's chunk (tenant-b has written less than a block: one lineage,
    placement_choice.py), 5 alice's chunks and the tombstone of c3, 6 a2's second version, 7 the tombstone
    of b1."""
    rnd = random.Random(11)
    kv: dict[tuple[str, bytes], bytes | None] = {}
    with blockstore.open(path, block_size=BLOCK) as s:
        a = [(b"a%d" % i, rnd.randbytes(n)) for i, n in enumerate([0, 1, 100, 4095, 4096, 5000, 70_000, 100_000])]
        a[2] = (b"a2", A2_FIRST)
        s.put_many(a, partition="A", metas=[b'{"m":%d}' % i for i in range(len(a))])
        b = [(b"b%d" % i, rnd.randbytes(60_000)) for i in range(6)]
        s.put_many(b, partition="B")
        t = [(b"t%d" % i, rnd.randbytes(n)) for i, n in enumerate([10, 5000, 40_000, 90_000])]
        s.put_many(t, ns="tenant-b")
        for i, (cid, text) in enumerate(CHUNKS.items()):
            s.put_chunk("alice", "s1", cid, text, meta={"turn": i}, kv_keys=[b"a0"], ts_ns=1000 + i)
        s.put_chunk("bob", "s2", "c1", "a tenant's memory", ns="tenant-b", ts_ns=5)
        s.put(b"a2", b"a2, second version", partition="C")
        s.delete(b"b1")
        s.delete(b"t1", ns="tenant-b")
        s.delete_chunk("alice", "s1", "c3")
        kv.update({("default", k): v for k, v in a + b})
        kv.update({("tenant-b", k): v for k, v in t})
        kv[("default", b"a2")] = b"a2, second version"
        kv[("default", b"b1")] = kv[("tenant-b", b"t1")] = None
        out: dict[str, Rec] = {}
        for (ns, k), v in kv.items():
            loc = s.locate_many([k], ns=ns)[0]
            assert (loc is None) == (v is None)
            out[k.decode()] = Rec(k.decode(), ns, k, v, loc)
        for ns, user, session, cid, text in [("default", "alice", "s1", c, t) for c, t in CHUNKS.items()] + [
                ("tenant-b", "bob", "s2", "c1", "a tenant's memory")]:
            nid = s.namespace_id(ns)
            assert nid is not None
            sfx = key_suffix(nid, SPACE_CHUNK, encode_chunk_key(user.encode(), session.encode(), cid.encode()))
            loc = s.dir.get_locations([sfx])[0]
            value = None if cid == "c3" else text.encode()
            out[f"{user}/{cid}"] = Rec(f"{user}/{cid}", ns, cid.encode(), value, loc, (user, session))
    assert [r.loc.block_id for r in out.values() if r.loc] and len({r.loc.block_id for r in out.values() if r.loc}) == 6, {k: r.loc.block_id for k, r in out.items() if r.loc}
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Rec]]:
    path = tmp_path_factory.mktemp("fsck") / "s"
    return path, _build(path)


@pytest.fixture
def store(pristine: tuple[Path, dict[str, Rec]], tmp_path: Path) -> tuple[Path, dict[str, Rec]]:
    src, recs = pristine
    dst = tmp_path / "s"
    shutil.copytree(src, dst)
    return dst, recs


# ------------------------------------------------------------------------------------------ helpers


def fsck(*args: Any) -> tuple[int, str, str]:
    """`blockstore fsck ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["fsck", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def fsck_json(*args: Any) -> tuple[int, dict[str, Any]]:
    code, out, err = fsck(*args, "--json")
    assert out, err
    return code, json.loads(out)


def _read(s: blockstore.Store, r: Rec, ns: str) -> Any:
    try:
        if r.chunk is not None:
            c = s.get_chunk(r.chunk[0], r.chunk[1], r.key.decode(), ns=ns)
            return None if c is None else c.text.encode()
        return s.get(r.key, ns=ns)
    except BlockstoreError as exc:
        return exc


def reads(path: Path, recs: dict[str, Rec], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Every record through the public API (one by one, and KV batched per namespace): its bytes, None
    for a miss, or the BlockstoreError raised (a store that refuses to open raises it for all)."""
    rename = rename or {}
    try:
        s = blockstore.open(path, read_only=True)
    except BlockstoreError as exc:
        return {n: exc for n in recs}
    with s:
        got = {n: _read(s, r, rename.get(r.ns, r.ns)) for n, r in recs.items()}
        for ns in ("default", "tenant-b"):
            names = [n for n, r in recs.items() if r.ns == ns and r.chunk is None]
            try:
                many = s.get_many([recs[n].key for n in names], ns=rename.get(ns, ns))
            except BlockstoreError:
                continue
            for n, v in zip(names, many):
                assert (v is None and got[n] is None) or (v is not None and bytes(v) == got[n]), n
    return got


def assert_never_wrong(got: dict[str, Any], recs: dict[str, Rec], also_ok: dict[str, bytes] | None = None) -> None:
    for n, r in recs.items():
        g = got[n]
        ok = g is None or isinstance(g, BlockstoreError) or g == r.value or g == (also_ok or {}).get(n)
        assert ok, f"{n} read back other bytes: {g!r:.60}"


def assert_exact(got: dict[str, Any], recs: dict[str, Rec], lost: set[str], want: dict[str, bytes] | None = None) -> None:
    for n, r in recs.items():
        expect = (want or {}).get(n, None if n in lost else r.value)
        assert got[n] == expect, f"{n}: {got[n]!r:.60} instead of {expect!r:.60}"


def lost_found_bytes(path: Path) -> list[bytes]:
    lf = path / "lost+found"
    return [p.read_bytes() for p in lf.rglob("*") if p.is_file()] if lf.exists() else []


def edit_directory(path: Path, change: Callable[[Directory, DirectoryBatch], None]) -> None:
    d = Directory(str(path / "directory"), read_only=False, sync=True, create=False)
    try:
        b = DirectoryBatch()
        change(d, b)
        d.write(b, force_sync=True)
        d.flush()
    finally:
        d.close()


def suffix_of(path: Path, r: Rec) -> bytes:
    with blockstore.open(path, read_only=True) as s:
        nid = s.namespace_id(r.ns)
    assert nid is not None
    if r.chunk is None:
        return key_suffix(nid, 1, r.key)
    return key_suffix(nid, SPACE_CHUNK, encode_chunk_key(r.chunk[0].encode(), r.chunk[1].encode(), r.key))


@dataclass
class Case:
    """What one kind of damage must produce."""

    kind: str
    block: int | None = None
    offset: int | None = None
    lost: set[str] = field(default_factory=set)
    evidence: list[bytes] = field(default_factory=list)  # bytes that must be found in lost+found/
    repair_args: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)  # namespace names after repair
    want: dict[str, bytes] = field(default_factory=dict)  # values after repair, where not the record's own
    before_ok: dict[str, bytes] = field(default_factory=dict)  # other bytes a read may return before repair


def run_case(path: Path, recs: dict[str, Rec], case: Case) -> dict[str, Any]:
    assert_never_wrong(reads(path, recs), recs, case.before_ok)
    code, doc = fsck_json(path)
    assert code == 4, doc
    label = None if case.block is None else f"{case.block:016x}"
    hits = [f for f in doc["findings"] if f["kind"] == case.kind and f["block"] == label
            and (case.offset is None or f["offset"] == case.offset)]
    assert hits, f"no {case.kind} finding for {label}:{case.offset} in {doc['findings']}"
    assert not any(f["corrected"] for f in doc["findings"])
    code, rep = fsck_json(path, "--repair", *case.repair_args)
    assert code == 1, rep
    assert rep["findings"] and all(f["corrected"] for f in rep["findings"]), rep["findings"]
    code, out, err = fsck(path)
    assert (code, out) == (0, "OK\n"), out + err
    assert_exact(reads(path, recs, case.rename), recs, case.lost, case.want)
    kept = lost_found_bytes(path)
    for ev in case.evidence:
        assert any(ev in k for k in kept), "the damaged bytes are not in lost+found/"
    with blockstore.open(path, read_only=True) as s:
        assert rebuild_violations(s) == []
    with blockstore.open(path) as s:  # writable again, and what it writes is consistent
        s.put(b"after-repair", b"x")
        s.put(b"a0", b"overwritten after repair")
    assert fsck(path)[0] == 0
    return rep


# ------------------------------------------------------------------------------------------ the corpus
# Each function damages the store and says what fsck and repair must make of it.


def payload_kv(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["a6"].loc
    assert loc is not None
    _flip(_block_path(p, loc.block_id), loc.offset + loc.payload_off + loc.payload_len // 2)
    return Case("payload", loc.block_id, loc.offset, {"a6"}, [_block_path(p, loc.block_id).read_bytes()])


def payload_chunk(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["alice/c2"].loc
    assert loc is not None
    _flip(_block_path(p, loc.block_id), loc.offset + loc.payload_off + 7)
    return Case("payload", loc.block_id, loc.offset, {"alice/c2"}, [_block_path(p, loc.block_id).read_bytes()])


def record_header(p: Path, recs: dict[str, Rec]) -> Case:
    """a5's header is damaged but its payload is intact (reads of it still work, through its entry):
    evacuation salvages it by the entry's offset, length and checksum (issue 13). a6 and a7 follow it
    in its block: the scan must resume and save them."""
    loc = recs["a5"].loc
    assert loc is not None
    _flip(_block_path(p, loc.block_id), loc.offset + 24)  # payload_len
    return Case("record", loc.block_id, loc.offset, set(), [_block_path(p, loc.block_id).read_bytes()])


def record_key(p: Path, recs: dict[str, Rec]) -> Case:
    """A flipped byte in b3's key: its header checksum fails, its entry still names the key and payload."""
    loc = recs["b3"].loc  # the block's first record
    assert loc is not None
    _flip(_block_path(p, loc.block_id), loc.offset + 64)
    return Case("record", loc.block_id, loc.offset, set(), [_block_path(p, loc.block_id).read_bytes()])


def record_meta(p: Path, recs: dict[str, Rec]) -> Case:
    """The copy of the meta that reads return is the entry's: the record is salvaged with it."""
    loc = recs["alice/c1"].loc
    assert loc is not None
    key_len = len(encode_chunk_key(b"alice", b"s1", b"c1"))
    _flip(_block_path(p, loc.block_id), loc.offset + 64 + key_len + 3)
    return Case("record", loc.block_id, loc.offset, set(), [_block_path(p, loc.block_id).read_bytes()])


def record_payload_overlap(p: Path, recs: dict[str, Rec]) -> Case:
    """a5's header and payload both damaged: nothing verifies, the key is lost (a miss), and a5's
    first version is not involved (it has only one)."""
    loc = recs["a5"].loc
    assert loc is not None
    _flip(_block_path(p, loc.block_id), loc.offset + 24)
    _flip(_block_path(p, loc.block_id), loc.offset + loc.payload_off + 10)
    return Case("record", loc.block_id, loc.offset, {"a5"}, [_block_path(p, loc.block_id).read_bytes()])


def zeroed_page(p: Path, recs: dict[str, Rec]) -> Case:
    """A 4 KiB page of zeros over a6's header (its payload, 70 KB, runs on past the page): a6 still
    reads before repair, and after it, salvaged by its entry."""
    loc = recs["a6"].loc
    assert loc is not None
    f = _block_path(p, loc.block_id)
    page = loc.offset // 4096 * 4096
    assert loc.payload_offset + loc.payload_len > page + 4096
    with open(f, "r+b") as fh:
        fh.seek(page)
        fh.write(bytes(4096))
    return Case("record", loc.block_id, None, set(), [f.read_bytes()])


def footer(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["b0"].loc
    assert loc is not None
    f = _block_path(p, loc.block_id)
    _flip(f, f.stat().st_size - 40)  # data_end
    return Case("footer", loc.block_id, evidence=[f.read_bytes()[-64:]])


def footer_cut(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["a0"].loc
    assert loc is not None
    f = _block_path(p, loc.block_id)
    os.truncate(f, f.stat().st_size - 20)
    return Case("footer", loc.block_id, evidence=[f.read_bytes()[-44:]])


def block_header(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["t0"].loc
    assert loc is not None
    f = _block_path(p, loc.block_id)
    _flip(f, 16)  # block_id
    return Case("block-header", loc.block_id, evidence=[f.read_bytes()[:64]])


def truncated_mid_record(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["b4"].loc  # b5 follows it: both lost, b3 kept
    assert loc is not None
    f = _block_path(p, loc.block_id)
    os.truncate(f, loc.offset + loc.payload_off + 1000)
    return Case("truncated", loc.block_id, lost={"b4", "b5"}, evidence=[f.read_bytes()])


def missing_block(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["a2"].loc  # a2's second version alone: its first version must not come back
    assert loc is not None
    os.unlink(_block_path(p, loc.block_id))
    return Case("missing-block", loc.block_id, lost={"a2"}, before_ok={"a2": A2_FIRST})


def missing_tombstone_block(p: Path, recs: dict[str, Rec]) -> Case:
    """The block holding only b1's tombstone: b1's record (block 2) must not come back."""
    bid = max(r.loc.block_id for r in recs.values() if r.loc) + 1
    os.unlink(_block_path(p, bid))
    return Case("missing-block", bid)


def directory_deleted(p: Path, recs: dict[str, Rec]) -> Case:
    shutil.rmtree(p / "directory")
    return Case("directory", repair_args=("--namespace", "tenant-b"))


def directory_deleted_names_unknown(p: Path, recs: dict[str, Rec]) -> Case:
    """Without --namespace, tenant-b's name is lost with the directory; 'default' is found by its
    partition hash. Every record is still there, under the recovered name."""
    shutil.rmtree(p / "directory")
    return Case("directory", rename={"tenant-b": "recovered-ns-2"})


def directory_garbled(p: Path, recs: dict[str, Rec]) -> Case:
    """RocksDB cannot open it; its own repair salvages the namespace names from the old files."""
    (p / "directory" / "CURRENT").write_text("garbage\n")
    return Case("directory", evidence=[b"garbage\n"])


def directory_sst_garbled(p: Path, recs: dict[str, Rec]) -> Case:
    ssts = sorted((p / "directory").glob("*.sst"))
    assert ssts
    for sst in ssts:
        _flip(sst, sst.stat().st_size // 2, 0xFF)
    return Case("directory", repair_args=("--namespace", "tenant-b"))


def entry_offset(p: Path, recs: dict[str, Rec]) -> Case:
    """a3's entry names a place 8 bytes off: re-pointed to its record (the same sequence number)."""
    loc = recs["a3"].loc
    assert loc is not None
    sfx = suffix_of(p, recs["a3"])
    bad = Location(loc.kind, loc.flags, loc.payload_off, loc.block_id, loc.offset + 8, loc.record_len,
                   loc.payload_len, loc.seq, loc.payload_xxh3, loc.meta)
    edit_directory(p, lambda d, b: b.put(location_key(sfx), bad.encode()))
    return Case("dangling", loc.block_id, loc.offset + 8)


def entry_undecodable(p: Path, recs: dict[str, Rec]) -> Case:
    """t2's entry is cut to 20 bytes: re-pointed to the newest record of t2."""
    sfx = suffix_of(p, recs["t2"])
    edit_directory(p, lambda d, b: b.put(location_key(sfx), b"\x01" * 20))
    return Case("dangling")


def entry_meta(p: Path, recs: dict[str, Rec]) -> Case:
    """c1's entry carries a copy of the record's meta; the copy changed (a read would return it)."""
    loc = recs["alice/c1"].loc
    assert loc is not None
    sfx = suffix_of(p, recs["alice/c1"])
    bad = Location(loc.kind, loc.flags, loc.payload_off, loc.block_id, loc.offset, loc.record_len, loc.payload_len,
                   loc.seq, loc.payload_xxh3, loc.meta.replace(b'"turn":0', b'"turn":7'))
    assert bad.meta != loc.meta
    edit_directory(p, lambda d, b: b.put(location_key(sfx), bad.encode()))
    return Case("dangling", loc.block_id, loc.offset)


def entry_lost(p: Path, recs: dict[str, Rec]) -> Case:
    """b0's entry is gone (its reverse entry stays): the directory says absent, so repair keeps it
    absent with a tombstone (a rebuild would otherwise bring it back)."""
    loc = recs["b0"].loc
    assert loc is not None
    sfx = suffix_of(p, recs["b0"])
    edit_directory(p, lambda d, b: b.delete(location_key(sfx)))
    return Case("unreferenced", loc.block_id, loc.offset, lost={"b0"})


def entry_stale(p: Path, recs: dict[str, Rec]) -> Case:
    """a2's entry names its first version (dead) instead of its second: reads return the first version,
    and repair keeps it so (a fresh copy of it, newer than the second)."""
    old_off = 4264  # a2's first version in block 1 (see _build)
    with blockstore.open(p, read_only=True) as s:
        fd = s.backend.open_ro(s.blocks.path(1))
        try:
            r = s.backend.scan(fd, old_off, s.backend.size(fd), False).records[0]
        finally:
            s.backend.close(fd)
    assert r.key == b"a2"
    new = recs["a2"].loc
    assert new is not None
    sfx = suffix_of(p, recs["a2"])
    old = Location(r.info.kind, r.info.flags, r.info.payload_off, 1, r.offset, r.info.record_len, r.info.payload_len,
                   r.info.seq, r.info.payload_xxh3, bytes(r.meta))

    def change(d: Directory, b: DirectoryBatch) -> None:
        b.put(location_key(sfx), old.encode())
        b.delete(reverse_key(new.block_id, new.offset))
        b.put(reverse_key(1, old_off), sfx)

    edit_directory(p, change)
    return Case("unreferenced", new.block_id, new.offset, want={"a2": A2_FIRST}, before_ok={"a2": A2_FIRST})


def reverse_missing(p: Path, recs: dict[str, Rec]) -> Case:
    loc = recs["b4"].loc
    assert loc is not None
    edit_directory(p, lambda d, b: b.delete(reverse_key(loc.block_id, loc.offset)))
    return Case("reverse", loc.block_id, loc.offset)


def block_counts(p: Path, recs: dict[str, Rec]) -> Case:
    bid = recs["b3"].loc.block_id  # type: ignore[union-attr]

    def change(d: Directory, b: DirectoryBatch) -> None:
        raw = d.get(block_key(bid))
        assert raw is not None
        e = __import__("blockstore.directory").directory.BlockEntry.decode(bid, raw)
        e.live_bytes += 4096
        e.total_records += 1
        b.put_block(e)

    edit_directory(p, change)
    return Case("block-counts", bid)


def block_entry_lost(p: Path, recs: dict[str, Rec]) -> Case:
    """Block 3's table entry is gone while its records are named: re-created from the file."""
    bid = recs["b3"].loc.block_id  # type: ignore[union-attr]
    edit_directory(p, lambda d, b: b.delete(block_key(bid)))
    return Case("block-entry", bid)


def block_entry_garbled(p: Path, recs: dict[str, Rec]) -> Case:
    bid = recs["t0"].loc.block_id  # type: ignore[union-attr]
    edit_directory(p, lambda d, b: b.put(block_key(bid), b"\x01\x02" + bytes(30)))
    return Case("block-entry", bid)


def listing_without_chunk(p: Path, recs: dict[str, Rec]) -> Case:
    from blockstore.keys import session_key

    edit_directory(p, lambda d, b: b.put(session_key(1, b"alice", b"s1", 7, b"ghost"), b""))
    return Case("session-index")


def namespace_id_lost(p: Path, recs: dict[str, Rec]) -> Case:
    edit_directory(p, lambda d, b: b.delete(TAG_NS_ID + (2).to_bytes(4, "big")))
    return Case("namespace")


def session_listing_lost(p: Path, recs: dict[str, Rec]) -> Case:
    from blockstore.keys import session_key

    loc = recs["alice/c2"].loc
    assert loc is not None
    with blockstore.open(p, read_only=True) as s:
        nid = s.namespace_id("default")
    assert nid is not None
    edit_directory(p, lambda d, b: b.delete(session_key(nid, b"alice", b"s1", 1001, b"c2")))
    return Case("session-index", loc.block_id, loc.offset)


def counter_behind(p: Path, recs: dict[str, Rec]) -> Case:
    edit_directory(p, lambda d, b: b.put(TAG_META + b"next_seq", (5).to_bytes(8, "little")))
    return Case("counter")


def manifest_version(p: Path, recs: dict[str, Rec]) -> Case:
    m = json.loads((p / "MANIFEST.json").read_text())
    m["format_version"] = 2
    raw = json.dumps(m).encode()
    (p / "MANIFEST.json").write_bytes(raw)
    return Case("manifest", evidence=[raw])


def manifest_missing(p: Path, recs: dict[str, Rec]) -> Case:
    os.unlink(p / "MANIFEST.json")
    return Case("manifest")


def orphan_file(p: Path, recs: dict[str, Rec]) -> Case:
    junk = random.Random(5).randbytes(10_000)
    _block_path(p, 0x40).write_bytes(junk)
    return Case("orphan-block", 0x40, evidence=[junk])


def foreign_block(p: Path, recs: dict[str, Rec]) -> Case:
    """Block 7's file replaced by a copy of block 6: its header names block 6, so the file is not the
    block the directory means. It goes to lost+found; a2's record in it is lost (and its first version,
    in block 1, must not come back)."""
    six, seven = recs["bob/c1"].loc, recs["a2"].loc
    assert six is not None and seven is not None
    raw = _block_path(p, six.block_id).read_bytes()
    _block_path(p, seven.block_id).write_bytes(raw)
    return Case("block-header", seven.block_id, lost={"a2"}, evidence=[raw], before_ok={"a2": A2_FIRST})


CORPUS = [payload_kv, payload_chunk, record_header, record_key, record_meta, record_payload_overlap, zeroed_page,
          footer, footer_cut, block_header,
          truncated_mid_record, missing_block, missing_tombstone_block, directory_deleted,
          directory_deleted_names_unknown, directory_garbled, directory_sst_garbled, entry_offset, entry_undecodable,
          entry_meta, entry_lost, entry_stale, reverse_missing, block_counts, block_entry_lost,
          block_entry_garbled, listing_without_chunk, namespace_id_lost, session_listing_lost,
          counter_behind, manifest_version, manifest_missing, orphan_file, foreign_block]


@pytest.mark.parametrize("damage", CORPUS, ids=[f.__name__ for f in CORPUS])
def test_corpus(store: tuple[Path, dict[str, Rec]], damage: Callable[[Path, dict[str, Rec]], Case]) -> None:
    path, recs = store
    case = damage(path, recs)
    rep = run_case(path, recs, case)
    if damage is entry_meta:  # the meta a read returns is the record's again
        with blockstore.open(path, read_only=True) as s:
            c = s.get_chunk("alice", "s1", "c1")
            assert c is not None and c.meta == {"turn": 0}
    if damage is directory_garbled:  # names salvaged from the old files: no --namespace needed
        with blockstore.open(path, read_only=True) as s:
            assert s.namespaces() == ["default", "tenant-b"]
    if damage in (missing_block, foreign_block, missing_tombstone_block):
        # dropping the lost record (or tombstone) uncovered an older version: superseded, not resurrected
        assert any(f["kind"] == "unreferenced" and f["corrected"] for f in rep["findings"])


def test_clean_store_is_ok(pristine: tuple[Path, dict[str, Rec]]) -> None:
    path, recs = pristine
    code, out, err = fsck(path)
    assert (code, out) == (0, "OK\n"), err
    code, doc = fsck_json(path)
    assert code == 0 and doc["findings"] == [] and doc["exit_code"] == 0
    assert doc["summary"]["blocks"] == 7 and doc["summary"]["keys"] == sum(1 for r in recs.values() if r.value is not None)


def test_repair_of_a_clean_store_changes_nothing(store: tuple[Path, dict[str, Rec]]) -> None:
    path, recs = store
    before = {p.name: p.read_bytes() for p in (path / "blocks").iterdir()}
    code, out, _err = fsck(path, "--repair")
    assert (code, out) == (0, "OK\n")
    assert {p.name: p.read_bytes() for p in (path / "blocks").iterdir()} == before
    assert not (path / "lost+found").exists()
    assert_exact(reads(path, recs), recs, set())


def test_several_damages_at_once(store: tuple[Path, dict[str, Rec]]) -> None:
    """A payload flip, a torn footer elsewhere, a lost reverse entry and a counter behind: one finding
    each (at least), one repair, a clean second check."""
    path, recs = store
    cases = [payload_kv(path, recs), footer(path, recs), reverse_missing(path, recs), counter_behind(path, recs)]
    code, doc = fsck_json(path)
    assert code == 4
    assert {c.kind for c in cases} <= {f["kind"] for f in doc["findings"]}
    code, _doc = fsck_json(path, "--repair")
    assert code == 1
    assert fsck(path)[:2] == (0, "OK\n")
    assert_exact(reads(path, recs), recs, {"a6"})


def test_unsealed_blocks_of_a_crashed_writer(tmp_path: Path) -> None:
    """A writer killed with blocks open; in one of them, after its last committed record, a put whose
    directory batch never committed and then a torn append. fsck says so (not as corruption of the
    committed records); repair seals the block after its committed records, and saves what it cuts
    (the unacknowledged put is not made visible)."""
    from blockstore import hooks

    path = tmp_path / "s"
    values = {b"k%d" % i: random.Random(i).randbytes(3000 + 20_000 * (i % 3)) for i in range(9)}
    s = blockstore.open(path, block_size=BLOCK)
    s.put_many(list(values.items())[:5], partition="p")
    s.put_many(list(values.items())[5:])
    s.put_chunk("u", "s", "c", "memory", ts_ns=1)
    loc = s.locate_many([b"k8"])[0]
    assert loc is not None

    def fail(*_a: object) -> None:
        raise OSError("the directory write fails")

    with hooks.installed("write.before_directory", fail), pytest.raises(OSError):
        s.put(b"k8", b"never acknowledged")
    s.abandon()
    assert b"never acknowledged" in _block_path(path, loc.block_id).read_bytes()
    torn = b"BSR1" + random.Random(9).randbytes(300)
    with open(_block_path(path, loc.block_id), "ab") as f:
        f.write(torn)
    code, doc = fsck_json(path)
    assert code == 4
    kinds = {(f["kind"], f["block"]) for f in doc["findings"]}
    assert ("unsealed", f"{loc.block_id:016x}") in kinds and ("unclean", None) in kinds
    assert not {"record", "payload", "dangling"} & {k for k, _b in kinds}
    code, doc = fsck_json(path, "--repair")
    assert code == 1 and all(f["corrected"] for f in doc["findings"])
    assert fsck(path)[:2] == (0, "OK\n")
    assert any(torn in b and b"never acknowledged" in b for b in lost_found_bytes(path))
    assert b"never acknowledged" not in _block_path(path, loc.block_id).read_bytes()
    with blockstore.open(path) as s:
        assert s.recovery_report is None  # repair left it clean
        assert {k: s.get(k) for k in values} == values
        assert s.get_chunk("u", "s", "c").text == "memory"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ beside a live writer

_WRITER = """
import os, random, sys, blockstore
path, stop = sys.argv[1], sys.argv[2]
s = blockstore.open(path, block_size=64 << 10, compaction={"policy": "aggressive", "interval_s": 0.05})
rnd = random.Random(3)
def step():
    k = b"k%d" % rnd.randrange(40)
    ns = rnd.choice(["default", "tenant-b"])
    op = rnd.random()
    if op < 0.55:
        s.put(k, rnd.randbytes(rnd.choice([10, 3000, 20000])), ns=ns, partition=rnd.choice([None, "r1", "r2"]))
    elif op < 0.75:
        s.delete(k, ns=ns)
    elif op < 0.85:
        s.put_chunk("u", "s%d" % rnd.randrange(3), "c%d" % rnd.randrange(10), "text " * rnd.randrange(1, 400))
    else:
        s.get_many([b"k%d" % i for i in rnd.sample(range(40), 5)], ns=ns)
for _ in range(300):
    step()
print("ready", flush=True)
n = 0
while not os.path.exists(stop):
    step()
    n += 1
s.close()
print("closed", n, flush=True)
"""


@pytest.fixture
def live_writer(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A writer process putting, overwriting, deleting and compacting (GC deletes blocks) until told
    to stop, as tests/test_errors.py's holder fixture starts one."""
    path, stop = tmp_path / "live", tmp_path / "stop"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(stop)], stdout=subprocess.PIPE, text=True,
                         cwd=str(ROOT))
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield path, stop, p
    finally:
        stop.touch()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_check_beside_a_live_writer_reports_no_false_corruption(live_writer) -> None:  # type: ignore[no-untyped-def]
    path, stop, proc = live_writer
    for _ in range(6):
        code, doc = fsck_json(path)
        assert code == 0 and doc["findings"] == [], doc["findings"]
        assert doc["summary"]["writer_pid"] == proc.pid
        time.sleep(0.1)
    code, out, err = fsck(path, "--repair")
    assert code == 8 and f"pid {proc.pid}" in err and "Traceback" not in err
    assert proc.poll() is None  # the writer was not disturbed
    stop.touch()
    assert proc.stdout.readline().startswith("closed")  # type: ignore[union-attr]
    assert proc.wait(30) == 0
    code, out, err = fsck(path)
    assert (code, out) == (0, "OK\n"), out + err


# ------------------------------------------------------------------------------------------ the command line


def test_help_explains_every_kind_and_the_exit_codes() -> None:
    code, out, _err = fsck("--help")
    assert code == 0
    for kind in KINDS:
        assert f"\n{kind}\n" in out
    for word in ("0 clean", "1 findings corrected", "4 findings left uncorrected", "8 operational error", "16 usage"):
        assert word in out
    doc = (ROOT / "docs" / "fsck.md").read_text()
    assert all(f"| `{kind}` |" in doc for kind in KINDS), "docs/fsck.md lists every finding kind"


@pytest.mark.parametrize("argv", [["fsck"], ["fsck", "x", "--bogus"], ["fsck", "x", "--namespace", "n"]])
def test_usage_errors_exit_16(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", *argv], capture_output=True, text=True,
                       cwd=str(ROOT), timeout=60)
    assert r.returncode == 16 and "usage" in r.stderr


def test_a_path_that_is_not_a_store_exits_8(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "fsck", str(tmp_path / "nothing")],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 8 and "no store" in r.stderr and "Traceback" not in r.stderr
    code, _out, err = fsck(tmp_path)  # a directory, but not a store
    assert code == 8 and "no store" in err


def test_text_output_one_finding_per_line(store: tuple[Path, dict[str, Rec]]) -> None:
    path, recs = store
    payload_kv(path, recs)
    footer(path, recs)
    r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "fsck", str(path)], capture_output=True, text=True,
                       cwd=str(ROOT), timeout=60)
    assert r.returncode == 4
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and {ln.split()[0] for ln in lines} == {"payload", "footer"}
    loc = recs["a6"].loc
    assert loc is not None
    assert f"payload {loc.block_id:016x}:{loc.offset} " in r.stdout


def test_open_refuses_to_create_over_a_store_that_lost_its_manifest(tmp_path: Path) -> None:
    """Blocks but no MANIFEST: opening must not create a new store over them (it would reuse block ids and
    overwrite acknowledged records); fsck --repair re-creates the MANIFEST and every record reads back."""
    path = tmp_path / "s"
    with blockstore.open(path, durability="sync") as s:
        s.put(b"k", b"v" * 5000)
    (path / "MANIFEST.json").unlink()
    with pytest.raises(blockstore.CorruptionError, match="MANIFEST"):
        blockstore.open(path)
    rc = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "fsck", "--repair", str(path)],
                        capture_output=True, text=True).returncode
    assert rc & 1 and not rc & 4
    with blockstore.open(path) as s:
        assert s.get(b"k") == b"v" * 5000


# ------------------------------------------------------------------------------------------ issue 13


@pytest.mark.parametrize("cycle", [2, 3])
def test_swapped_block_files_are_renamed_by_their_headers(store: tuple[Path, dict[str, Rec]], cycle: int) -> None:
    """Block files whose names were swapped (or rotated): each is the block its verified header names.
    fsck says `misnamed-block` for each (and nothing else: each file is checked as its header's block);
    repair renames them back through temporary names and keeps every record (it once moved both to
    lost+found, 41 intact records; issue 13 item 4)."""
    path, recs = store
    ids = sorted({r.loc.block_id for r in recs.values() if r.loc})[:cycle]
    raw = {b: _block_path(path, b).read_bytes() for b in ids}
    for i, b in enumerate(ids):
        _block_path(path, b).write_bytes(raw[ids[(i + 1) % cycle]])
    code, doc = fsck_json(path)
    assert code == 4
    assert sorted((f["kind"], f["block"]) for f in doc["findings"]) == \
        sorted(("misnamed-block", f"{b:016x}") for b in ids), doc["findings"]
    code, doc = fsck_json(path, "--repair")
    assert code == 1 and all(f["corrected"] for f in doc["findings"]), doc
    assert {b: _block_path(path, b).read_bytes() for b in ids} == raw
    assert not (path / "lost+found").exists() or not list((path / "lost+found").glob("*.blk*"))
    assert fsck(path)[:2] == (0, "OK\n")
    assert_exact(reads(path, recs), recs, set())


def test_a_block_file_under_an_unused_name_is_renamed_back(store: tuple[Path, dict[str, Rec]]) -> None:
    """Block 2's file renamed to an id nobody uses: not an orphan and a missing block, but block 2's
    file under the wrong name."""
    path, recs = store
    bid = recs["b0"].loc.block_id  # type: ignore[union-attr]
    os.rename(_block_path(path, bid), _block_path(path, 0x77))
    code, doc = fsck_json(path)
    assert code == 4 and [(f["kind"], f["block"]) for f in doc["findings"]] == [("misnamed-block", f"{0x77:016x}")]
    assert fsck_json(path, "--repair")[0] == 1
    assert _block_path(path, bid).exists() and not _block_path(path, 0x77).exists()
    assert fsck(path)[:2] == (0, "OK\n")
    assert_exact(reads(path, recs), recs, set())


def test_a_rename_cut_short_is_finished_by_the_next_repair(store: tuple[Path, dict[str, Rec]]) -> None:
    path, recs = store
    bid = recs["b0"].loc.block_id  # type: ignore[union-attr]
    os.rename(_block_path(path, bid), str(_block_path(path, bid)) + ".fsck-renaming")
    assert fsck_json(path, "--repair")[0] == 0
    assert _block_path(path, bid).exists()
    assert fsck(path)[:2] == (0, "OK\n")
    assert_exact(reads(path, recs), recs, set())


def test_an_orphan_file_is_not_a_counter_finding(tmp_path: Path) -> None:
    """A block file with the id next_block names (what an uncommitted block after kill -9 looked like
    before blocks were named first): one orphan-block finding, not also `next_block is N, not above N`
    (issue 13 item 6)."""
    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"k", b"v" * 3000)
    d = Directory(str(path / "directory"), read_only=True, sync=False, create=False)
    try:
        nxt = d.get_meta("next_block")
    finally:
        d.close()
    assert nxt is not None
    _block_path(path, nxt).write_bytes(random.Random(1).randbytes(9000))
    code, doc = fsck_json(path)
    assert code == 4 and [(f["kind"], f["block"]) for f in doc["findings"]] == [("orphan-block", f"{nxt:016x}")]
    assert fsck_json(path, "--repair")[0] == 1
    assert fsck(path)[:2] == (0, "OK\n")
    with blockstore.open(path) as s:
        assert s.get(b"k") == b"v" * 3000
        s.put(b"k2", b"w" * 3000, partition="new")  # a new block: next_block is above the moved file's id
    assert fsck(path)[:2] == (0, "OK\n")


@pytest.mark.parametrize("file_left", [True, False])
def test_a_block_being_reclaimed_is_not_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  file_left: bool) -> None:
    """A deletion marks the block `reclaiming` (synced) before the unlink, and drops the entry once the
    file is gone: an entry in that state, with its file or without, is a normal state (a crash between
    the steps leaves it), never a `missing-block` or `orphan-block`."""
    from blockstore.blocks import BlockFiles
    from blockstore.directory import BLOCK_RECLAIMING

    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"k", b"v1" * 1500, partition="a")
    monkeypatch.setattr(BlockFiles, "delete", lambda self, bid: None)  # the unlink never happens
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"k", b"v2" * 1500, partition="b")  # the first block's only record dies
    monkeypatch.undo()
    d = Directory(str(path / "directory"), read_only=True, sync=False, create=False)
    try:
        marked = [b for b, e in d.load_blocks().items() if e.state == BLOCK_RECLAIMING]
    finally:
        d.close()
    assert marked, "the close should have marked the dead block reclaiming"
    if not file_left:
        for b in marked:
            _block_path(path, b).unlink()
    assert fsck(path)[:2] == (0, "OK\n")
    with blockstore.open(path) as s:  # the engine finishes the deletion
        assert s.get(b"k") == b"v2" * 1500
    assert not any(_block_path(path, b).exists() for b in marked)
    assert fsck(path)[:2] == (0, "OK\n")


def test_an_old_copy_of_the_directory_put_back_is_rebuilt(tmp_path: Path) -> None:
    """The directory reads in full but lost writes (here: an old copy of it put back; a lost or
    truncated WAL does the same): block files of this store that it does not name hold records. fsck
    says `directory` (lost writes) and `orphan-block`; repair rebuilds the directory instead of moving
    the blocks to lost+found, and every key reads back, deletes staying deleted."""
    path = tmp_path / "s"
    rnd = random.Random(4)
    want: dict[bytes, bytes | None] = {}
    with blockstore.open(path, block_size=BLOCK) as s:
        for i in range(20):
            want[b"k%d" % i] = rnd.randbytes(3000)
            s.put(b"k%d" % i, want[b"k%d" % i])
    shutil.copytree(path / "directory", tmp_path / "old-directory")
    with blockstore.open(path, block_size=BLOCK) as s:
        for i in range(10, 30):
            want[b"k%d" % i] = rnd.randbytes(3000)
            s.put(b"k%d" % i, want[b"k%d" % i], partition="later")
        s.delete(b"k3")
        want[b"k3"] = None
    shutil.rmtree(path / "directory")
    shutil.copytree(tmp_path / "old-directory", path / "directory")
    code, doc = fsck_json(path)
    kinds = {f["kind"] for f in doc["findings"]}
    assert code == 4 and {"directory", "orphan-block"} <= kinds, doc["findings"]
    assert any("lost writes" in f["detail"] for f in doc["findings"] if f["kind"] == "directory")
    code, doc = fsck_json(path, "--repair")
    assert code == 1 and all(f["corrected"] for f in doc["findings"]), doc["findings"]
    assert not list((path / "lost+found").glob("*.blk"))
    assert fsck(path)[:2] == (0, "OK\n")
    with blockstore.open(path) as s:
        assert {k: s.get(k) for k in want} == want


_KILLED_WRITER = """
import os, random, sys, blockstore
path, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
s = blockstore.open(path, durability="sync", block_size=64 << 10)
print("ready", flush=True)
while True:
    k = b"k%d" % rnd.randrange(60)
    if rnd.random() < 0.15:
        s.delete(k)
    else:
        s.put(k, rnd.randbytes(rnd.choice([100, 3000, 20000])), partition=rnd.choice(["a", "b", "c"]))
"""


@pytest.mark.parametrize("cycles", [pytest.param(4, id="4-cycles"), pytest.param(30, marks=pytest.mark.slow,
                                                                                id="30-cycles")])
def test_fsck_after_kill_9_and_a_recovering_open_is_clean(tmp_path: Path, cycles: int) -> None:
    """kill -9 at a random moment of a sync writer, then: fsck before any open reports what a crash
    leaves (unsealed blocks, unclean) and never a counter finding (`next_block is N, not above ... (N)`
    came in 56 of 270 cycles, issue 13 item 6); an open (recovery) and a close leave a store that fsck
    passes with exit 0."""
    path = tmp_path / "s"
    rnd = random.Random(cycles)
    for cycle in range(cycles):
        p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(cycle)], stdout=subprocess.PIPE,
                             text=True, cwd=str(ROOT))
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            time.sleep(rnd.uniform(0.0, 0.4))
        finally:
            p.kill()
            p.wait()
        code, doc = fsck_json(path)
        kinds = {f["kind"] for f in doc["findings"]}
        assert kinds <= {"unsealed", "unclean"}, (cycle, [f"{f['kind']} {f['block']} {f['detail']}"
                                                          for f in doc["findings"]])
        with blockstore.open(path) as s:
            assert s.recovery_report is not None
        code, out, err = fsck(path)
        assert (code, out) == (0, "OK\n"), (cycle, out, err)


def test_a_block_named_but_never_created_is_a_crash_state(tmp_path: Path) -> None:
    """A new block is named (synced) before its file is created: a writer killed in between leaves an
    open entry with nothing committed and no file. fsck reports it as `unsealed` (what a crash leaves),
    not `missing-block` (lost data); repair drops the entry."""
    from blockstore.directory import BLOCK_OPEN, BlockEntry

    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"k", b"v" * 3000)

    def name_a_block(d: Directory, b: DirectoryBatch) -> None:
        nxt = d.get_meta("next_block")
        assert nxt is not None
        b.put_block(BlockEntry(nxt, BLOCK_OPEN, b"default"))
        b.put_meta("next_block", nxt + 1)

    edit_directory(path, name_a_block)
    code, doc = fsck_json(path)
    assert code == 4 and [f["kind"] for f in doc["findings"]] == ["unsealed"], doc["findings"]
    assert fsck_json(path, "--repair")[0] == 1
    assert fsck(path)[:2] == (0, "OK\n")
    with blockstore.open(path) as s:
        assert s.get(b"k") == b"v" * 3000


@pytest.mark.parametrize("size", [0, 40])
def test_a_block_file_a_crash_left_without_its_header_is_a_crash_state(tmp_path: Path, size: int) -> None:
    """Killed after creating a new block's file and before its header is written: an open entry with
    nothing committed, a file of `size` bytes. `unsealed` (not `block-header`, not `truncated`); repair
    drops the entry and moves the empty file to lost+found."""
    from blockstore.directory import BLOCK_OPEN, BlockEntry

    path = tmp_path / "s"
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put(b"k", b"v" * 3000)
    nxt = 0

    def name_a_block(d: Directory, b: DirectoryBatch) -> None:
        nonlocal nxt
        nxt = d.get_meta("next_block") or 0
        b.put_block(BlockEntry(nxt, BLOCK_OPEN, b"default"))
        b.put_meta("next_block", nxt + 1)

    edit_directory(path, name_a_block)
    _block_path(path, nxt).write_bytes(bytes(size))
    code, doc = fsck_json(path)
    assert code == 4 and [(f["kind"], f["block"]) for f in doc["findings"]] == [("unsealed", f"{nxt:016x}")], \
        doc["findings"]
    assert fsck_json(path, "--repair")[0] == 1
    assert fsck(path)[:2] == (0, "OK\n")
    assert not _block_path(path, nxt).exists()
    with blockstore.open(path) as s:
        assert s.get(b"k") == b"v" * 3000


def test_an_unsealed_block_with_a_damaged_committed_record_is_evacuated(tmp_path: Path) -> None:
    """A crash left a block open, and a committed record in it has a damaged header: sealing after the
    last good record would drop every committed record after it; the block is evacuated instead and
    the damaged record is salvaged by its key entry. Every key reads back."""
    path = tmp_path / "s"
    vals = {b"k%d" % i: random.Random(i).randbytes(3000) for i in range(8)}
    s = blockstore.open(path, block_size=BLOCK, durability="sync")
    for k, v in vals.items():
        s.put(k, v)
    loc = s.locate_many([b"k2"])[0]
    assert loc is not None
    s.abandon()
    _flip(_block_path(path, loc.block_id), loc.offset + 24)
    code, doc = fsck_json(path)
    assert code == 4 and ("unsealed", f"{loc.block_id:016x}") in {(f["kind"], f["block"]) for f in doc["findings"]}
    code, doc = fsck_json(path, "--repair")
    assert code == 1 and all(f["corrected"] for f in doc["findings"]), doc["findings"]
    assert any("evacuated" in (f["action"] or "") for f in doc["findings"])
    assert fsck(path)[:2] == (0, "OK\n")
    with blockstore.open(path) as s:
        assert {k: s.get(k) for k in vals} == vals
