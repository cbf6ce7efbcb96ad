"""Damaged block files: a read returns the record's bytes, a miss, or an error -- never other bytes.

Records are written, the store is closed, one byte of a block file is flipped (or the file is cut or
deleted), and the store is reopened. A damaged payload must be detected (ChecksumMismatch, or None
with on_corrupt="miss"). Damage outside the payload (record header, key, meta, footer, block header)
is not read by a get, which verifies exactly the payload bytes it returns (docs/format.md §2.2), so
there a get may still return the right bytes; it must never return different ones.
Every record the damage does not touch reads back exactly.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import blockstore
from blockstore import ChecksumMismatch, CorruptionError, NotFound, TruncatedError
from blockstore.chunks import encode_chunk_key
from blockstore.directory import Location
from blockstore.keys import SPACE_CHUNK, key_suffix

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Rec:
    name: str  # KV key, or "chunk:<id>"
    value: bytes
    loc: Location

    @property
    def is_chunk(self) -> bool:
        return self.name.startswith("chunk:")


def _val(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


KV_SIZES = [0, 1, 100, 4095, 4096, 4097, 70_000, 300_000]
CHUNKS = {"c1": "short memory", "c2": "a longer memory " * 400, "c3": "ünïcödé text"}


def _build(path: Path, backend: str) -> dict[str, Rec]:
    """KV records of many sizes (two partitions, so two blocks) and chunk records (a third block)."""
    out: dict[str, Rec] = {}
    with blockstore.open(path, backend=backend, block_size=MiB) as s:
        kv = {f"k{i}-{n}".encode(): _val(n, i) for i, n in enumerate(KV_SIZES)}
        items = list(kv.items())
        s.put_many(items[:5], metas=[b'{"m":%d}' % i for i in range(5)], partition="A")
        s.put_many(items[5:], partition="B")
        for cid, text in CHUNKS.items():
            s.put_chunk("user", "sess", cid, text, meta={"turn": cid}, kv_keys=[b"k0-0"], ts_ns=len(out))
        nid = s.namespace_id("default")
        assert nid is not None
        for k, loc in zip(kv, s.locate_many(list(kv))):
            assert loc is not None
            out[k.decode()] = Rec(k.decode(), kv[k], loc)
        sfx = [key_suffix(nid, SPACE_CHUNK, encode_chunk_key(b"user", b"sess", c.encode())) for c in CHUNKS]
        for cid, loc in zip(CHUNKS, s.dir.get_locations(sfx)):
            assert loc is not None
            out["chunk:" + cid] = Rec("chunk:" + cid, CHUNKS[cid].encode(), loc)
    assert len({r.loc.block_id for r in out.values()}) == 3
    return out


def _block_path(store: Path, bid: int) -> Path:
    return store / "blocks" / f"{bid:016x}.blk"


def _flip(path: Path, offset: int, mask: int = 0x20) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def _read(s: blockstore.Store, rec: Rec) -> Any:
    """The record through the public API: bytes, None (miss), or the exception raised."""
    try:
        if rec.is_chunk:
            c = s.get_chunk("user", "sess", rec.name[6:])
            return None if c is None else c.text.encode()
        return s.get(rec.name.encode())
    except blockstore.BlockstoreError as exc:
        return exc


def _check_all(s: blockstore.Store, recs: dict[str, Rec], damaged: set[str], on_corrupt: str,
               payload_damaged: bool) -> None:
    for name, rec in recs.items():
        got = _read(s, rec)
        if name not in damaged:
            assert got == rec.value, f"undamaged {name} read back as {got!r:.80}"
        elif payload_damaged:
            if on_corrupt == "raise":
                assert isinstance(got, ChecksumMismatch), f"damaged {name}: {got!r:.80}"
            else:
                assert got is None, f"damaged {name} with on_corrupt=miss: {got!r:.80}"
        else:
            assert got == rec.value or got is None or isinstance(got, CorruptionError), f"{name}: {got!r:.80}"
    # the batched read path agrees
    kv = [r for r in recs.values() if not r.is_chunk]
    try:
        many = s.get_many([r.name.encode() for r in kv])
    except CorruptionError:
        assert on_corrupt == "raise" and damaged & {r.name for r in kv}
        return
    for r, got in zip(kv, many):
        if got is not None:
            assert bytes(got) == r.value, f"get_many returned wrong bytes for {r.name}"
        else:
            assert r.name in damaged


@pytest.fixture(scope="module", params=["native", "python"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Rec]]:
    path = tmp_path_factory.mktemp(f"pristine-{request.param}") / "s"
    recs = _build(path, request.param)
    return path, request.param, recs


@pytest.fixture
def damaged_store(pristine: tuple[Path, str, dict[str, Rec]], tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private copy of the pristine store for one test to damage."""
    import shutil

    src, backend, recs = pristine
    dst = tmp_path / "s"
    shutil.copytree(src, dst)
    return dst, backend, recs


REGIONS = ["payload-first", "payload-middle", "payload-last", "record-header", "key", "meta", "footer", "block-header"]


def _target(recs: dict[str, Rec], region: str, rec_name: str) -> tuple[int, int] | None:
    """(block id, file offset) of the byte to flip for this region of this record (None: not there)."""
    loc = recs[rec_name].loc
    key_len = len(recs[rec_name].name) if not recs[rec_name].is_chunk else len(
        encode_chunk_key(b"user", b"sess", rec_name[6:].encode()))
    meta_len = len(loc.meta)
    p0 = loc.offset + loc.payload_off
    if region.startswith("payload"):
        if loc.payload_len == 0:
            return None
        i = {"payload-first": 0, "payload-middle": loc.payload_len // 2, "payload-last": loc.payload_len - 1}[region]
        return loc.block_id, p0 + i
    if region == "record-header":
        return loc.block_id, loc.offset + 24  # payload_len
    if region == "key":
        return loc.block_id, loc.offset + 64 + key_len - 1
    if region == "meta":
        return (loc.block_id, loc.offset + 64 + key_len) if meta_len else None
    if region == "footer":
        return loc.block_id, -40  # data_end, counted from the end of the file
    return loc.block_id, 16  # block header: block_id


@pytest.mark.parametrize("on_corrupt", ["raise", "miss"])
@pytest.mark.parametrize("region", REGIONS)
def test_byte_flip_by_region(damaged_store: tuple[Path, str, dict[str, Rec]], region: str, on_corrupt: str) -> None:
    path, backend, recs = damaged_store
    victims = [n for n in recs if _target(recs, region, n) is not None]
    # one KV record and one chunk record per region (they live in different blocks)
    kv_victim = next(n for n in victims if not recs[n].is_chunk)
    chunk_victim = next(n for n in victims if recs[n].is_chunk)
    for name in (kv_victim, chunk_victim):
        bid, off = _target(recs, region, name)  # type: ignore[misc]
        f = _block_path(path, bid)
        _flip(f, off if off >= 0 else f.stat().st_size + off)
    payload = region.startswith("payload")
    if region in ("footer", "block-header"):  # damage that belongs to the whole block
        blocks = {recs[kv_victim].loc.block_id, recs[chunk_victim].loc.block_id}
        damaged = {n for n, r in recs.items() if r.loc.block_id in blocks}
    else:
        damaged = {kv_victim, chunk_victim}
    with blockstore.open(path, backend=backend, on_corrupt=on_corrupt) as s:
        _check_all(s, recs, damaged, on_corrupt, payload)
    with blockstore.open(path, backend=backend, on_corrupt=on_corrupt, read_only=True) as s:
        _check_all(s, recs, damaged, on_corrupt, payload)


def test_damaged_chunk_is_left_out_of_listings_or_raises(damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    path, backend, recs = damaged_store
    loc = recs["chunk:c2"].loc
    _flip(_block_path(path, loc.block_id), loc.offset + loc.payload_off + 123)
    with blockstore.open(path, backend=backend) as s:
        with pytest.raises(ChecksumMismatch):
            s.list_chunks("user", "sess")
        with pytest.raises(ChecksumMismatch):
            s.get_chunks([("user", "sess", "c1"), ("user", "sess", "c2")])
        assert s.get_chunk("user", "sess", "c1").text == CHUNKS["c1"]  # type: ignore[union-attr]
    with blockstore.open(path, backend=backend, on_corrupt="miss") as s:
        assert [c.chunk_id for c in s.list_chunks("user", "sess")] == ["c1", "c3"]
        assert [c.text for c in s.list_chunks("user", "sess")] == [CHUNKS["c1"], CHUNKS["c3"]]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_any_payload_byte_flip_is_caught(pristine: tuple[Path, str, dict[str, Rec]], data: st.DataObject) -> None:
    """Hypothesis picks the record, the byte in its payload and the bit pattern; the flip is undone
    after each example, so every example starts from the pristine store."""
    path, backend, recs = pristine
    names = sorted(n for n, r in recs.items() if r.loc.payload_len > 0)
    name = data.draw(st.sampled_from(names), label="record")
    loc = recs[name].loc
    i = data.draw(st.integers(0, loc.payload_len - 1), label="payload byte")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    on_corrupt = data.draw(st.sampled_from(["raise", "miss"]), label="on_corrupt")
    f = _block_path(path, loc.block_id)
    _flip(f, loc.offset + loc.payload_off + i, mask)
    try:
        with blockstore.open(path, backend=backend, on_corrupt=on_corrupt, read_only=True) as s:
            got = _read(s, recs[name])
            if on_corrupt == "raise":
                assert isinstance(got, ChecksumMismatch), f"{name} byte {i}: {got!r:.80}"
            else:
                assert got is None, f"{name} byte {i}: {got!r:.80}"
            # its neighbours in the same coalesced read are unaffected
            same_block = [r for r in recs.values() if r.loc.block_id == loc.block_id and r.name != name]
            for r in same_block:
                assert _read(s, r) == r.value
            if not recs[name].is_chunk and on_corrupt == "miss":
                keys = [r.name.encode() for r in recs.values() if not r.is_chunk]
                for k, got_many in zip(keys, s.get_many(keys)):
                    want = next(r.value for r in recs.values() if r.name.encode() == k)
                    assert (got_many is None) if k == name.encode() else bytes(got_many) == want
    finally:
        _flip(f, loc.offset + loc.payload_off + i, mask)


# ---------------------------------------------------------------------------------------------
# truncated and deleted block files


def _blocks_of(recs: dict[str, Rec]) -> dict[int, list[Rec]]:
    out: dict[int, list[Rec]] = {}
    for r in recs.values():
        out.setdefault(r.loc.block_id, []).append(r)
    return out


@pytest.mark.parametrize("on_corrupt", ["raise", "miss"])
@pytest.mark.parametrize("cut", ["mid-payload", "mid-header", "header-page", "empty"])
def test_truncated_block_file(damaged_store: tuple[Path, str, dict[str, Rec]], cut: str, on_corrupt: str) -> None:
    path, backend, recs = damaged_store
    by_block = _blocks_of(recs)
    bid, members = max(by_block.items(), key=lambda kv: len(kv[1]))
    members.sort(key=lambda r: r.loc.offset)
    victim = next(r for r in members[1:] if r.loc.payload_len > 10)
    size = {"mid-payload": victim.loc.offset + victim.loc.payload_off + victim.loc.payload_len // 2,
            "mid-header": victim.loc.offset + 30, "header-page": 4096, "empty": 0}[cut]
    os.truncate(_block_path(path, bid), size)
    # an empty payload has no bytes to lose: reading it back as b"" is reading it right
    lost = {r.name for r in members if r.loc.payload_len and r.loc.offset + r.loc.payload_off + r.loc.payload_len > size}
    assert victim.name in lost
    with blockstore.open(path, backend=backend, on_corrupt=on_corrupt) as s:
        for r in recs.values():
            got = _read(s, r)
            if r.name not in lost:
                assert got == r.value, f"{r.name}: {got!r:.80}"
            elif on_corrupt == "raise":
                assert isinstance(got, TruncatedError), f"{r.name}: {got!r:.80}"
            else:
                assert got is None
        st = s.stats()  # the store still answers
        assert st.records == len(recs)


@pytest.mark.parametrize("on_corrupt", ["raise", "miss"])
def test_deleted_block_file(damaged_store: tuple[Path, str, dict[str, Rec]], on_corrupt: str) -> None:
    path, backend, recs = damaged_store
    by_block = _blocks_of(recs)
    bid = next(b for b, rs in by_block.items() if not rs[0].is_chunk)
    os.unlink(_block_path(path, bid))
    lost = {r.name for r in by_block[bid]}
    with blockstore.open(path, backend=backend, on_corrupt=on_corrupt) as s:
        for r in recs.values():
            got = _read(s, r)
            if r.name in lost:
                assert got is None or isinstance(got, (NotFound, CorruptionError)), f"{r.name}: {got!r:.80}"
            else:
                assert got == r.value
        kv = [r for r in recs.values() if not r.is_chunk]
        if on_corrupt == "raise":
            # a block the directory names whose file is missing is damage, never a silent miss (issue 13)
            with pytest.raises(CorruptionError, match="missing"):
                s.get_many([r.name.encode() for r in kv])
            intact = [r for r in kv if r.name not in lost]
            assert [bytes(g) for g in s.get_many([r.name.encode() for r in intact])] == [r.value for r in intact]
        else:
            many = s.get_many([r.name.encode() for r in kv])
            for r, g in zip(kv, many):
                assert (g is None) if r.name in lost else bytes(g) == r.value
        s.put(b"new", b"still writable")
        assert s.get(b"new") == b"still writable"


def test_recovery_keeps_naming_a_lost_block_file(
        damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    """A sealed block file lost by damage (not by a crash: it was written in an earlier session) is
    reported by recovery but not forgotten by an open: its records raise CorruptionError, the rest
    reads, and only fsck --repair may drop them (issue 13, item 5)."""
    path, backend, recs = damaged_store
    by_block = _blocks_of(recs)
    bid = next(b for b, rs in by_block.items() if not rs[0].is_chunk)
    s = blockstore.open(path, backend=backend)
    s.put(b"extra", b"x")
    os.unlink(_block_path(path, bid))
    s.abandon()  # not closed cleanly: the next writer runs recovery
    lost = {r.name for r in by_block[bid]}
    with blockstore.open(path, backend=backend) as s:
        assert s.recovery_report is not None and bid in s.recovery_report["missing_blocks"]
        for r in recs.values():
            got = _read(s, r)
            if r.name in lost:
                assert isinstance(got, CorruptionError), f"{r.name}: {got!r:.80}"
            else:
                assert got == r.value
        assert s.get(b"extra") == b"x"
    with blockstore.open(path, backend=backend, on_corrupt="miss") as s:
        for r in recs.values():
            assert _read(s, r) == (None if r.name in lost else r.value)


def test_recovery_of_a_block_with_a_damaged_footer_keeps_its_records(
        damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    path, backend, recs = damaged_store
    bid = next(iter(_blocks_of(recs)))
    f = _block_path(path, bid)
    _flip(f, f.stat().st_size - 40)
    s = blockstore.open(path, backend=backend)
    s.put(b"extra", b"x")
    s.abandon()
    with blockstore.open(path, backend=backend) as s:
        assert s.recovery_report is not None and bid in s.recovery_report["scanned_blocks"]
        for r in recs.values():
            assert _read(s, r) == r.value
        assert s.stats().records == len(recs) + 1
    # and the footer was rewritten validly
    from blockstore.purepy import PythonBackend

    raw = f.read_bytes()
    footer = PythonBackend().decode_footer(raw[-64:])
    assert footer.block_id == bid and footer.data_end == len(raw) - 64


# ---------------------------------------------------------------------------------------------
# the dump command reports the damage


def _dump(path: Path, bid: int) -> list[dict[str, Any]]:
    r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "dump", str(path), "--block", f"{bid:x}", "--json"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_dump_reports_a_damaged_payload(damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    path, _backend, recs = damaged_store
    victim = recs["k6-70000"]
    _flip(_block_path(path, victim.loc.block_id), victim.loc.offset + victim.loc.payload_off + 999)
    rows = _dump(path, victim.loc.block_id)
    by_off = {row["offset"]: row for row in rows}
    assert by_off[victim.loc.offset]["payload_ok"] is False
    assert by_off[victim.loc.offset]["key"] == victim.name.encode().hex()
    others = [r for r in recs.values() if r.loc.block_id == victim.loc.block_id and r is not victim]
    assert others and all(by_off[r.loc.offset]["payload_ok"] is True for r in others)
    assert all(row["kind"] != "invalid" for row in rows)


def test_dump_reports_a_damaged_record_header(damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    path, _backend, recs = damaged_store
    members = sorted((r for r in recs.values() if r.loc.block_id == recs["k1-1"].loc.block_id),
                     key=lambda r: r.loc.offset)
    victim = members[2]
    _flip(_block_path(path, victim.loc.block_id), victim.loc.offset + 64)  # first key byte
    rows = _dump(path, victim.loc.block_id)
    assert [row["offset"] for row in rows[:2]] == [m.loc.offset for m in members[:2]]
    assert all(row["payload_ok"] for row in rows[:2])
    invalid = [row for row in rows if row["kind"] == "invalid"]
    assert len(invalid) == 1 and invalid[0]["offset"] == victim.loc.offset


def test_dump_of_a_truncated_block(damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    path, _backend, recs = damaged_store
    members = sorted((r for r in recs.values() if r.loc.block_id == recs["k1-1"].loc.block_id),
                     key=lambda r: r.loc.offset)
    victim = members[-1]
    os.truncate(_block_path(path, victim.loc.block_id), victim.loc.offset + 10)
    rows = _dump(path, victim.loc.block_id)
    assert rows[-1]["kind"] == "invalid" and rows[-1]["offset"] == victim.loc.offset
    assert len(rows) == len(members)


def test_dump_of_a_deleted_block_is_a_clean_error(damaged_store: tuple[Path, str, dict[str, Rec]]) -> None:
    path, _backend, recs = damaged_store
    bid = recs["k1-1"].loc.block_id
    os.unlink(_block_path(path, bid))
    r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "dump", str(path), "--block", f"{bid:x}"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 8 and "NotFound" in r.stderr and "Traceback" not in r.stderr
    # the KV space index survives: other tools still list the keys
    with blockstore.open(path, read_only=True) as s:
        assert len(list(s.iter_keys())) == len([n for n in recs if not recs[n].is_chunk])
