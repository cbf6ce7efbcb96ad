"""Block scan (docs/format.md §2, §4): a whole block file's bytes scanned for records, as recovery and
fsck do, by the C core (`bs_scan_block`) and by the Python twin, plus the sealed-block footer check.

Input: one control byte, then a block file. The file is written to a memfd and read through the
backends' real file paths (the native backend with small scan buffers, so that its resume path runs
on small files too). Control bits:
  0  recompute every record's header_xxh3 along the record chain (see fuzz/fixups.py)
  1  recompute payload_xxh3 too (so payloads verify and the scan goes on)
  2  recompute the block header's and the footer's frame checksums
  3  verify payloads while scanning (recovery does; fsck may not)
  4  the input is the record area only: a valid block header page is put in front of it
  5  also scan up to an `end` taken from the input (the u64 where a trailing footer keeps data_end),
     as a reader trusting a footer or block-table entry would: end may lie before 4096 or past EOF

Contract: scanning never raises on any file contents (end <= file size), except InvalidArgument for an
end before the first record (the C core's documented BS_EINVAL); both backends return the same
records, stop reason and resume offset (or the same exception class); every record returned is
exactly what decode_record makes of the bytes at its offset, records are contiguous from 4096,
lie within `end`, and a verified payload_ok is the truth about the payload bytes; the scan stops
INVALID only at bytes that do not decode or do not fit; the footer check accepts only a valid
footer at size - 64.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from fuzz import fixups, harness

with harness.instrumented(__name__):
    import blockstore.native as native_module
    from blockstore.blocks import BlockFiles
    from blockstore.errors import BlockstoreError, CorruptionError, InvalidArgument
    from blockstore.native import NativeBackend
    from blockstore.purepy import PythonBackend
    from blockstore.records import BLOCK_HEADER_SIZE, FOOTER_SIZE, RECORD_HEADER_SIZE, BlockHeader, ScanResult, ScanStop

import xxhash

NATIVE = NativeBackend()
PYTHON = PythonBackend()
BACKENDS = (NATIVE, PYTHON)
FILES = {b.name: BlockFiles("/nonexistent-fuzz-store", b, 1, sync=False) for b in BACKENDS}
HEADER_PAGE = NATIVE.encode_block_header(BlockHeader(1, 1, 0, 0)).ljust(BLOCK_HEADER_SIZE, b"\0")
FD = os.memfd_create("blockstore-fuzz-block")

FIX_RECORDS, FIX_PAYLOADS, FIX_FRAMES, VERIFY, SYNTH_HEADER, END_FROM_INPUT = 1, 2, 4, 8, 16, 32


def scan(backend: object, end: int, verify: bool) -> ScanResult | BlockstoreError:
    try:
        return backend.scan(FD, BLOCK_HEADER_SIZE, end, verify)  # type: ignore[attr-defined,no-any-return]
    except InvalidArgument as exc:
        assert end < BLOCK_HEADER_SIZE, f"InvalidArgument for end {end}: {exc}"
        return exc


def check_scan(res: ScanResult, file: bytes, end: int, verify: bool) -> None:
    off = BLOCK_HEADER_SIZE
    for r in res.records:
        assert r.offset == off, f"record at {r.offset}, expected {off}"
        info = NATIVE.decode_record(file[off : off + RECORD_HEADER_SIZE + r.info.key_len + r.info.meta_len])
        assert info == r.info, f"scan says {r.info}, decode says {info}"
        k0 = off + RECORD_HEADER_SIZE
        assert r.key == file[k0 : k0 + info.key_len] and r.meta == file[k0 + info.key_len : k0 + info.key_len + info.meta_len]
        assert off + info.record_len <= end, f"record at {off} ends past end {end}"
        if verify:
            p0 = off + info.payload_off
            payload = file[p0 : p0 + info.payload_len]
            ok = len(payload) == info.payload_len and xxhash.xxh3_64_intdigest(payload) == info.payload_xxh3
            assert r.payload_ok is ok, f"payload_ok {r.payload_ok} at {off}, truth {ok}"
        else:
            assert r.payload_ok is None
        off += info.record_len
    assert res.next_offset == off, f"next_offset {res.next_offset}, records end at {off}"
    assert off <= max(end, BLOCK_HEADER_SIZE)
    if res.stop == ScanStop.END:
        assert off >= end or file[off : off + 8] == b"BSFOOTER", f"END at {off} before {end} without a footer"
    else:
        assert res.stop == ScanStop.INVALID, res.stop
        assert off < end
        try:
            info = NATIVE.decode_record(file[off : off + RECORD_HEADER_SIZE + 4096 + 65536])
        except CorruptionError:
            return
        assert info.record_len > end - off, f"INVALID at {off}, but a record that fits decodes there"


@contextlib.contextmanager
def small_scan_buffers() -> Iterator[None]:
    """The C scan then runs out of entries or arena on small files too, so its resume path
    (BS_SCAN_MORE, continued by NativeBackend.scan) is fuzzed; and no 8 MiB arena per call. Restored
    after each input, so a test process importing this module keeps the real sizes elsewhere. The sizes
    are the native backend's own tuning, deliberately not API: this harness is the one place that shrinks them."""
    saved = native_module._SCAN_CAP, native_module._SCAN_ARENA  # noqa: SLF001
    native_module._SCAN_CAP = 3  # noqa: SLF001
    native_module._SCAN_ARENA = RECORD_HEADER_SIZE + 4096 + 65536 + 1024  # noqa: SLF001  (one record's key + meta)
    try:
        yield
    finally:
        native_module._SCAN_CAP, native_module._SCAN_ARENA = saved  # noqa: SLF001


def test_one_input(data: bytes) -> None:
    with small_scan_buffers():
        _one_input(data)


def _one_input(data: bytes) -> None:
    ctl, body = harness.split_control(data)
    buf = bytearray(HEADER_PAGE + body if ctl & SYNTH_HEADER else body)
    fixups.fix_block(buf, records=bool(ctl & FIX_RECORDS), payloads=bool(ctl & FIX_PAYLOADS),
                     frames=bool(ctl & FIX_FRAMES))
    file = bytes(buf)
    os.ftruncate(FD, 0)
    os.pwrite(FD, file, 0)
    size = len(file)
    verify = bool(ctl & VERIFY)

    footers = [FILES[b.name].read_footer(FD) for b in BACKENDS]
    assert footers[0] == footers[1], f"footer check: native {footers[0]} != python {footers[1]}"
    if footers[0] is not None:
        assert footers[0].data_end == size - FOOTER_SIZE
        assert NATIVE.decode_footer(file[-FOOTER_SIZE:]) == footers[0]

    ends = [size] if size > BLOCK_HEADER_SIZE else []  # what recovery scans
    if ctl & END_FROM_INPUT and size >= 40:
        ends.append(int.from_bytes(file[size - 40 : size - 32], "little"))
    for end in ends:
        got_c, got_py = scan(NATIVE, end, verify), scan(PYTHON, end, verify)
        if isinstance(got_c, BaseException) or isinstance(got_py, BaseException):
            assert type(got_c) is type(got_py), f"end {end}: native {got_c!r} != python {got_py!r}"
            continue
        assert got_c == got_py, f"end {end}: native and python scans differ:\n{got_c}\n{got_py}"
        check_scan(got_c, file, end, verify)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
