"""The on-disk format (docs/format.md §2): the C core and its pure-Python twin must write the same
bytes, read each other's output, follow the record layout rules, and reject damaged or newer
structures with the same exception classes."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import hypothesis.strategies as st
import pytest
import xxhash
from hypothesis import given

import blockstore
from blockstore.errors import (
    BlockstoreError,
    ChecksumMismatch,
    CorruptionError,
    FormatVersionError,
    TruncatedError,
)
from blockstore.native import NativeBackend
from blockstore.purepy import PythonBackend
from blockstore.records import (
    BLOCK_HEADER_SIZE,
    PAGE,
    REC_ALIGNED,
    RECORD_HEADER_SIZE,
    AppendRecord,
    BlockHeader,
    Footer,
    Kind,
    ScanStop,
)

BACKENDS = {"native": NativeBackend(), "python": PythonBackend()}
MiB = 1 << 20
INTERESTING_PAYLOADS = [0, 1, 7, 8, 9, 4095, 4096, 4097, 8191, 8192, 65536, MiB]


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _write_block(b, path: Path, records: list[AppendRecord], *, seal: bool = True, block_id: int = 7) -> tuple[list, int]:  # type: ignore[no-untyped-def]
    """A block file written by one backend: header page, the records (one append call), footer."""
    fd = b.open(str(path), True)
    try:
        header = b.encode_block_header(BlockHeader(block_id, 0xABCDEF, 1234567890, 42))
        b.pwrite(fd, header + bytes(BLOCK_HEADER_SIZE - len(header)), 0)
        placements, end = b.append(fd, BLOCK_HEADER_SIZE, records, False)
        if seal:
            seqs = [r.seq for r in records]
            footer = Footer(block_id, end, len(records), min(seqs, default=0), max(seqs, default=0))
            b.pwrite(fd, b.encode_footer(footer), end)
    finally:
        b.close(fd)
    return placements, end


def _records(specs: list[tuple[int, int, int, int]]) -> list[AppendRecord]:
    """(key_len, meta_len, payload_len, kind) -> records with deterministic, distinct contents."""
    out = []
    for i, (kl, ml, pl, kind) in enumerate(specs):
        payload = b"" if kind == Kind.TOMBSTONE else _bytes(pl, 1000 + i)
        out.append(AppendRecord(kind, 3 + i % 2, _bytes(kl, 2000 + i) or b"k", _bytes(ml, 3000 + i), payload, 10 + i))
    return out


RECORD_SPEC = st.tuples(
    st.sampled_from([1, 2, 7, 8, 100, 4031, 4032, 4033, 4095, 4096]),
    st.sampled_from([0, 1, 5, 8, 100, 4000, 65536]),
    st.one_of(st.sampled_from(INTERESTING_PAYLOADS), st.integers(0, 20_000)),
    st.sampled_from([Kind.KV, Kind.KV, Kind.CHUNK, Kind.TOMBSTONE]),
)


def _check_layout(raw: bytes, rec: AppendRecord, p) -> None:  # type: ignore[no-untyped-def]
    plen = len(rec.payload)
    head = RECORD_HEADER_SIZE + len(rec.key) + len(rec.meta)
    assert p.offset % 8 == 0
    assert p.record_len % 8 == 0
    assert p.payload_off >= head
    assert p.record_len >= p.payload_off + plen
    if plen >= PAGE:
        assert p.flags & REC_ALIGNED
        assert (p.offset + p.payload_off) % PAGE == 0, "aligned payload must start on a page"
        assert (p.offset + p.record_len) % PAGE == 0, "aligned record must end on a page"
        assert p.payload_off - head < PAGE, "no more padding than needed to reach the page"
    else:
        assert p.flags == 0
        assert (p.offset + p.payload_off) % 8 == 0
        assert p.payload_off == -(-head // 8) * 8, "small records are packed (8-byte aligned)"
        assert p.record_len == -(-(p.payload_off + plen) // 8) * 8
    start = p.offset
    # the header itself, as written
    magic, ver, kind, flags, kl, ml, poff, ns, pl, rl, seq, pcks, hcks = struct.unpack_from("<4sBBHIIIIQQQQQ", raw, start)
    assert (magic, ver, kind, flags) == (b"BSR1", 1, rec.kind, p.flags)
    assert (kl, ml, poff, ns, pl, rl, seq) == (len(rec.key), len(rec.meta), p.payload_off, rec.ns, plen, p.record_len, rec.seq)
    assert pcks == xxhash.xxh3_64_intdigest(bytes(rec.payload)) == p.payload_xxh3
    assert hcks == xxhash.xxh3_64_intdigest(raw[start : start + 56] + rec.key + rec.meta)
    assert raw[start + 64 : start + head] == rec.key + rec.meta
    # zero padding between meta and payload, and after the payload
    assert raw[start + head : start + p.payload_off] == bytes(p.payload_off - head)
    assert raw[start + p.payload_off : start + p.payload_off + plen] == bytes(rec.payload)
    assert raw[start + p.payload_off + plen : start + p.record_len] == bytes(p.record_len - p.payload_off - plen)


# ---------------------------------------------------------------------------------------------
# byte-identical output


@pytest.mark.parametrize("payload_len", INTERESTING_PAYLOADS)
def test_fixed_sizes_give_identical_files(tmp_path: Path, payload_len: int) -> None:
    recs = _records([(5, 0, payload_len, Kind.KV), (1, 1, 1, Kind.KV), (3, 17, payload_len, Kind.CHUNK),
                     (4096, 65536, payload_len, Kind.KV), (2, 0, 0, Kind.TOMBSTONE)])
    pn, en = _write_block(BACKENDS["native"], tmp_path / "n.blk", recs)
    pp, ep = _write_block(BACKENDS["python"], tmp_path / "p.blk", recs)
    raw_n, raw_p = (tmp_path / "n.blk").read_bytes(), (tmp_path / "p.blk").read_bytes()
    assert en == ep and pn == pp
    assert raw_n == raw_p
    assert len(raw_n) == en + 64
    for rec, p in zip(recs, pn):
        _check_layout(raw_n, rec, p)


@given(specs=st.lists(RECORD_SPEC, min_size=1, max_size=6), precomputed=st.booleans())
def test_backends_write_byte_identical_blocks(tmp_path_factory: pytest.TempPathFactory,
                                              specs: list[tuple[int, int, int, int]], precomputed: bool) -> None:
    d = tmp_path_factory.mktemp("fmt")
    recs = _records(specs)
    if precomputed:  # the engine may hand the core checksums it computed already
        for r in recs:
            r.payload_xxh3 = xxhash.xxh3_64_intdigest(bytes(r.payload))
    pn, en = _write_block(BACKENDS["native"], d / "n.blk", recs)
    pp, ep = _write_block(BACKENDS["python"], d / "p.blk", recs)
    raw = (d / "n.blk").read_bytes()
    assert raw == (d / "p.blk").read_bytes()
    assert (en, pn) == (ep, pp)
    pos = BLOCK_HEADER_SIZE
    for rec, p in zip(recs, pn):
        assert p.offset == pos, "records follow each other with no gap"
        _check_layout(raw, rec, p)
        pos += p.record_len
    assert pos == en


def test_multi_mib_batch_uses_the_hash_thread_and_stays_identical(tmp_path: Path) -> None:
    """Over 4 MiB in one append: the C core hashes on a helper thread; bytes must not change."""
    recs = _records([(8, 0, 3 * MiB, Kind.KV), (9, 10, 100, Kind.KV), (10, 0, 2 * MiB + 5, Kind.KV),
                     (11, 0, 0, Kind.KV), (12, 50, MiB, Kind.CHUNK)])
    pn, en = _write_block(BACKENDS["native"], tmp_path / "n.blk", recs)
    pp, ep = _write_block(BACKENDS["python"], tmp_path / "p.blk", recs)
    raw = (tmp_path / "n.blk").read_bytes()
    assert raw == (tmp_path / "p.blk").read_bytes()
    for rec, p in zip(recs, pn):
        _check_layout(raw, rec, p)


def test_adjacent_aligned_records_are_one_header_page_apart(tmp_path: Path) -> None:
    recs = _records([(16, 32, 8192, Kind.KV), (16, 32, 4096, Kind.KV), (16, 32, 5000, Kind.KV), (3, 0, 4096, Kind.KV)])
    for name, b in BACKENDS.items():
        placements, _end = _write_block(b, tmp_path / f"{name}.blk", recs)
        for prev, cur in zip(placements, placements[1:]):
            gap = (cur.offset + cur.payload_off) - (prev.offset + prev.record_len)
            assert gap == PAGE, f"{name}: payloads separated by {gap} bytes, not one header page"


def test_stores_on_both_backends_write_identical_records(tmp_path: Path, backend: str) -> None:
    """Same operations through the whole engine on both backends: block files equal from the first
    record to the footer; headers differ only in store_id and created_ns."""
    backend, other = "native", "python"
    files = {}
    for name in (backend, other):
        path = tmp_path / name
        with blockstore.open(path, backend=name, block_size=MiB) as s:
            s.put_many([(b"k%d" % i, _bytes(n, i)) for i, n in enumerate([0, 1, 4095, 4096, 4097, 300_000])])
            s.put(b"meta", b"x" * 10, meta=b'{"dtype":"float16","shape":[5]}')
            s.put_chunk("user", "session", "c1", "chunk text", ts_ns=1)
            s.put(b"k2", _bytes(700_000, 99))  # rotates the default partition's block
            s.delete(b"k1")
        files[name] = {p.name: p.read_bytes() for p in sorted((path / "blocks").iterdir())}
    assert files[backend].keys() == files[other].keys() and len(files[backend]) >= 3
    for name, a in files[backend].items():
        b = files[other][name]
        assert len(a) == len(b), name
        assert a[BLOCK_HEADER_SIZE:] == b[BLOCK_HEADER_SIZE:], f"{name}: records or footer differ"
        assert a[:24] == b[:24] and a[40:56] == b[40:56] and a[64:BLOCK_HEADER_SIZE] == b[64:BLOCK_HEADER_SIZE]
        for be in BACKENDS.values():
            ha, hb = be.decode_block_header(a), be.decode_block_header(b)
            assert ha.block_id == hb.block_id == int(name[:16], 16)
            assert be.decode_footer(a[-64:]).data_end == len(a) - 64


# ---------------------------------------------------------------------------------------------
# reading each other's output


@pytest.mark.parametrize("writer", ["native", "python"])
def test_each_backend_decodes_the_others_blocks(tmp_path: Path, writer: str) -> None:
    recs = _records([(5, 0, 0, Kind.KV), (6, 30, 1, Kind.KV), (7, 0, 4095, Kind.CHUNK), (8, 4, 4096, Kind.KV),
                     (9, 0, 4097, Kind.KV), (10, 0, 0, Kind.TOMBSTONE), (11, 3, MiB, Kind.KV)])
    path = tmp_path / "b.blk"
    placements, end = _write_block(BACKENDS[writer], path, recs)
    raw = path.read_bytes()
    results = {}
    for name, b in BACKENDS.items():
        h = b.decode_block_header(raw[:BLOCK_HEADER_SIZE])
        assert (h.block_id, h.store_id, h.created_ns, h.partition_hash, h.format_version, h.flags) == (
            7, 0xABCDEF, 1234567890, 42, 1, 0)
        f = b.decode_footer(raw[-64:])
        assert (f.block_id, f.data_end, f.record_count, f.min_seq, f.max_seq) == (7, end, len(recs), 10, 10 + len(recs) - 1)
        for rec, p in zip(recs, placements):
            info = b.decode_record(raw[p.offset : p.offset + p.payload_off])
            assert (info.kind, info.flags, info.key_len, info.meta_len, info.payload_off, info.ns, info.payload_len,
                    info.record_len, info.seq, info.payload_xxh3) == (
                rec.kind, p.flags, len(rec.key), len(rec.meta), p.payload_off, rec.ns, len(rec.payload),
                p.record_len, rec.seq, p.payload_xxh3)
        fd = b.open_ro(str(path))
        try:
            res = b.scan(fd, BLOCK_HEADER_SIZE, len(raw), True)
        finally:
            b.close(fd)
        assert res.stop == ScanStop.END and res.next_offset == end
        assert [r.offset for r in res.records] == [p.offset for p in placements]
        assert [(r.key, r.meta) for r in res.records] == [(rec.key, rec.meta) for rec in recs]
        assert all(r.payload_ok for r in res.records)
        results[name] = res
    assert results["native"] == results["python"]


@pytest.mark.parametrize("writer", ["native", "python"])
def test_each_backend_reads_the_others_payloads(tmp_path: Path, writer: str) -> None:
    from blockstore.records import ReadRequest

    recs = _records([(5, 0, 10, Kind.KV), (6, 30, 5000, Kind.KV), (7, 0, 4096, Kind.KV), (8, 0, 0, Kind.KV)])
    path = tmp_path / "b.blk"
    placements, _ = _write_block(BACKENDS[writer], path, recs)
    for b in BACKENDS.values():
        fd = b.open_ro(str(path))
        try:
            dsts = [bytearray(len(r.payload)) for r in recs]
            reqs = [ReadRequest(p.offset + p.payload_off, len(r.payload), d, p.payload_xxh3)
                    for p, r, d in zip(placements, recs, dsts)]
            assert b.read_many(fd, reqs, 128 << 10, True) == [0] * len(recs)
            assert [bytes(d) for d in dsts] == [bytes(r.payload) for r in recs]
        finally:
            b.close(fd)


# ---------------------------------------------------------------------------------------------
# header / footer / record round trip and rejection, identical on both backends

HEADER = BlockHeader(0x0123456789ABCDEF, 77, 1_700_000_000_000_000_000, 0xFEDCBA9876543210)
FOOTER = Footer(0x0123456789ABCDEF, 1 << 33, 12345, 5, 99999)


def _recompute(buf: bytearray) -> bytes:
    buf[56:64] = xxhash.xxh3_64_intdigest(bytes(buf[:56])).to_bytes(8, "little")
    return bytes(buf)


def _record_bytes() -> bytes:
    recs = _records([(5, 9, 100, Kind.KV)])
    b = PythonBackend()
    from blockstore.purepy import _encode_header
    from blockstore.records import RecordInfo, record_layout

    r = recs[0]
    poff, rlen = record_layout(0, len(r.key), len(r.meta), len(r.payload), 0)
    cks = b.xxh3(r.payload)
    raw = _encode_header(RecordInfo(r.kind, 0, len(r.key), len(r.meta), poff, r.ns, len(r.payload), rlen, r.seq, cks),
                         r.key, r.meta)
    return raw


@pytest.mark.parametrize("name", ["native", "python"])
def test_block_header_round_trip(name: str) -> None:
    b = BACKENDS[name]
    raw = b.encode_block_header(HEADER)
    assert len(raw) == 64 and raw[:8] == b"BSBLOCK\0"
    assert raw == BACKENDS["python" if name == "native" else "native"].encode_block_header(HEADER)
    assert struct.unpack_from("<IIQQQQQ", raw, 8) == (1, 0, HEADER.block_id, HEADER.store_id, HEADER.created_ns,
                                                      HEADER.partition_hash, 0)
    assert int.from_bytes(raw[56:], "little") == xxhash.xxh3_64_intdigest(raw[:56])
    assert b.decode_block_header(raw) == HEADER
    assert b.decode_block_header(raw + bytes(4096 - 64)) == HEADER  # the padded page decodes too


@pytest.mark.parametrize("name", ["native", "python"])
def test_footer_round_trip(name: str) -> None:
    b = BACKENDS[name]
    raw = b.encode_footer(FOOTER)
    assert len(raw) == 64 and raw[:8] == b"BSFOOTER"
    assert raw == BACKENDS["python" if name == "native" else "native"].encode_footer(FOOTER)
    assert struct.unpack_from("<IIQQQQQ", raw, 8) == (1, 0, FOOTER.block_id, FOOTER.data_end, FOOTER.record_count,
                                                      FOOTER.min_seq, FOOTER.max_seq)
    assert int.from_bytes(raw[56:], "little") == xxhash.xxh3_64_intdigest(raw[:56])
    assert b.decode_footer(raw) == FOOTER


def _damaged(kind: str, good: bytes) -> dict[str, tuple[bytes, type[BlockstoreError]]]:
    bad_magic = bytearray(good)
    bad_magic[0] ^= 0x01
    if kind != "record":
        _recompute(bad_magic)
    flipped = bytearray(good)
    flipped[20] ^= 0x10  # a field byte, covered by the checksum
    flipped_cks = bytearray(good)
    flipped_cks[60] ^= 0x80  # the checksum itself
    bumped = bytearray(good)
    v0 = 4 if kind == "record" else 8
    bumped[v0] += 1
    zero = bytearray(good)
    zero[v0] = 0
    if kind == "record":
        kl, ml = struct.unpack_from("<II", good, 8)
        for b in (bumped, zero):
            b[56:64] = xxhash.xxh3_64_intdigest(bytes(b[:56]) + good[64 : 64 + kl + ml]).to_bytes(8, "little")
        in_key = bytearray(good)
        in_key[64] ^= 0x04
        extra = {"key byte": (bytes(in_key), ChecksumMismatch),
                 "header only": (good[:64 + 2], TruncatedError)}
    else:
        _recompute(bumped)
        _recompute(zero)
        extra = {}
    return {
        "bad magic": (bytes(bad_magic), CorruptionError),
        "flipped field": (bytes(flipped), ChecksumMismatch),
        "flipped checksum": (bytes(flipped_cks), ChecksumMismatch),
        "version bumped": (bytes(bumped), FormatVersionError),
        "version zero": (bytes(zero), CorruptionError),
        "short": (good[:63], TruncatedError),
        "empty": (b"", TruncatedError),
        **extra,
    }


@pytest.mark.parametrize("name", ["native", "python"])
@pytest.mark.parametrize("kind", ["header", "footer", "record"])
def test_damaged_structures_are_rejected_with_the_same_class(name: str, kind: str) -> None:
    b = BACKENDS[name]
    good = {"header": lambda: b.encode_block_header(HEADER), "footer": lambda: b.encode_footer(FOOTER),
            "record": _record_bytes}[kind]()
    decode = {"header": b.decode_block_header, "footer": b.decode_footer, "record": b.decode_record}[kind]
    decode(good)  # the undamaged one decodes
    for what, (raw, cls) in _damaged(kind, good).items():
        with pytest.raises(BlockstoreError) as ei:
            decode(raw)
        assert type(ei.value) is cls, f"{name} {kind} {what}: {type(ei.value).__name__}, expected {cls.__name__}"


def test_flipped_version_with_stale_checksum_is_a_checksum_error_not_a_version_error() -> None:
    for b in BACKENDS.values():
        raw = bytearray(b.encode_footer(FOOTER))
        raw[8] = 2
        with pytest.raises(ChecksumMismatch):
            b.decode_footer(bytes(raw))


# ---------------------------------------------------------------------------------------------
# fuzz: never crash, and both backends agree


def _outcome(fn, buf: bytes):  # type: ignore[no-untyped-def]
    try:
        return ("ok", fn(buf))
    except BlockstoreError as exc:
        return ("error", type(exc))


def _mutated(good: bytes, kind: str) -> st.SearchStrategy[bytes]:
    """Valid structures with a few bytes changed, sometimes with a fixed-up checksum, sometimes cut."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        buf = bytearray(good)
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        if kind == "record":
            fields = draw(st.lists(st.tuples(st.sampled_from([5, 6, 8, 12, 16, 24, 32]), st.integers(0, 2**32 - 1)),
                                   max_size=2))
            for off, val in fields:
                size = 1 if off == 5 else 2 if off == 6 else 8 if off >= 24 else 4
                buf[off : off + size] = (val % (1 << (8 * size))).to_bytes(size, "little")
        if draw(st.booleans()):
            if kind == "record":
                kl, ml = struct.unpack_from("<II", buf, 8)
                tail = bytes(buf[64 : 64 + kl + ml])
                buf[56:64] = xxhash.xxh3_64_intdigest(bytes(buf[:56]) + tail).to_bytes(8, "little")
            else:
                _recompute(buf)
        cut = draw(st.one_of(st.none(), st.integers(0, len(buf))))
        return bytes(buf if cut is None else buf[:cut])

    return build()


@given(raw=st.one_of(st.binary(max_size=200), _mutated(_record_bytes(), "record")))
def test_fuzz_decode_record(raw: bytes) -> None:
    got = {name: _outcome(b.decode_record, raw) for name, b in BACKENDS.items()}
    for status, value in got.values():
        assert status == "ok" or issubclass(value, BlockstoreError)
        if status == "ok":  # what decodes satisfies the format's own limits
            assert 1 <= value.key_len <= 4096 and value.meta_len <= 65536 and value.kind in (1, 2, 3)
            assert value.record_len % 8 == 0 and value.payload_off >= 64 + value.key_len + value.meta_len
    assert got["native"] == got["python"]


@given(raw=st.one_of(st.binary(max_size=100), _mutated(PythonBackend().encode_footer(FOOTER), "footer")))
def test_fuzz_decode_footer(raw: bytes) -> None:
    got = {name: _outcome(b.decode_footer, raw) for name, b in BACKENDS.items()}
    for status, value in got.values():
        assert status == "ok" or issubclass(value, BlockstoreError)
    assert got["native"] == got["python"]


@given(raw=st.one_of(st.binary(max_size=100), _mutated(PythonBackend().encode_block_header(HEADER), "header")))
def test_fuzz_decode_block_header(raw: bytes) -> None:
    got = {name: _outcome(b.decode_block_header, raw) for name, b in BACKENDS.items()}
    for status, value in got.values():
        assert status == "ok" or issubclass(value, BlockstoreError)
    assert got["native"] == got["python"]


# ---------------------------------------------------------------------------------------------
# scans of torn blocks


def _scan(b, path: Path, verify: bool = True):  # type: ignore[no-untyped-def]
    fd = b.open_ro(str(path))
    try:
        return b.scan(fd, BLOCK_HEADER_SIZE, os.path.getsize(path), verify)
    finally:
        b.close(fd)


@given(specs=st.lists(RECORD_SPEC, min_size=1, max_size=5), data=st.data())
def test_scan_stops_at_a_torn_tail(tmp_path_factory: pytest.TempPathFactory, specs: list, data: st.DataObject) -> None:  # type: ignore[type-arg]
    d = tmp_path_factory.mktemp("torn")
    recs = _records(specs)
    path = d / "b.blk"
    placements, end = _write_block(BACKENDS["native"], path, recs, seal=False)
    victim = data.draw(st.integers(0, len(recs) - 1), label="torn record")
    p = placements[victim]
    cut = data.draw(st.integers(p.offset + 1, p.offset + p.record_len - 1), label="cut at")
    os.truncate(path, cut)
    for name, b in BACKENDS.items():
        res = _scan(b, path)
        assert res.stop == ScanStop.INVALID, name
        assert res.next_offset == p.offset, f"{name}: stopped at {res.next_offset}, torn record at {p.offset}"
        assert [r.offset for r in res.records] == [q.offset for q in placements[:victim]]
        assert all(r.payload_ok for r in res.records)


@pytest.mark.parametrize("name", ["native", "python"])
def test_scan_of_torn_tails(tmp_path: Path, name: str) -> None:
    b = BACKENDS[name]
    recs = _records([(5, 0, 100, Kind.KV), (6, 0, 5000, Kind.KV), (7, 3, 10, Kind.KV)])
    path = tmp_path / "b.blk"
    placements, end = _write_block(BACKENDS["native"], path, recs, seal=False)
    # exactly at a record boundary: a clean end, not a torn record
    os.truncate(path, placements[2].offset)
    res = _scan(b, path)
    assert res.stop == ScanStop.END and res.next_offset == placements[2].offset and len(res.records) == 2
    # zero-filled tail (the file grew, the bytes never landed)
    _write_block(BACKENDS["native"], path, recs, seal=False)
    os.truncate(path, end + 8192)
    res = _scan(b, path)
    assert res.stop == ScanStop.INVALID and res.next_offset == end and len(res.records) == 3
    # garbage in the middle record's header: the scan stops there, the earlier record survives
    raw = bytearray(path.read_bytes()[:end])
    raw[placements[1].offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    res = _scan(b, path)
    assert res.stop == ScanStop.INVALID and res.next_offset == placements[1].offset and len(res.records) == 1
    # a damaged payload keeps the scan going but is reported
    raw = bytearray(path.read_bytes())
    raw[placements[1].offset + 10] ^= 0xFF
    raw[placements[1].offset + placements[1].payload_off + 7] ^= 0x01
    path.write_bytes(bytes(raw))
    res = _scan(b, path)
    assert res.stop == ScanStop.END and [r.payload_ok for r in res.records] == [True, False, True]
    unverified = _scan(b, path, verify=False)
    assert [r.payload_ok for r in unverified.records] == [None, None, None]
    # a sealed file: the scan ends at the footer
    _write_block(BACKENDS["native"], path, recs, seal=True)
    res = _scan(b, path)
    assert res.stop == ScanStop.END and res.next_offset == end and len(res.records) == 3
