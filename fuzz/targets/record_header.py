"""Record header parsing (docs/format.md §2.2): `decode_record` of the C core and of the Python twin.

Input: one control byte, then the bytes a scan would hand the decoder (header, key, meta, anything).
Control bit 0: recompute header_xxh3 over the input's own header, key and meta first, so mutated
lengths and fields get past the checksum and the checks after it run too.

Contract, for both backends: a RecordInfo or CorruptionError (TruncatedError, ChecksumMismatch,
FormatVersionError included); the two agree on every input (same class, or equal RecordInfo); a
RecordInfo obeys the format's limits and re-encodes to exactly the header bytes it came from.
"""

from __future__ import annotations

import sys

import xxhash

from fuzz import fixups, harness

with harness.instrumented(__name__):
    from blockstore.errors import CorruptionError
    from blockstore.native import NativeBackend
    from blockstore.purepy import _REC, PythonBackend
    from blockstore.records import MAX_KEY, MAX_META, MAX_PAYLOAD, REC_ALIGNED, RECORD_HEADER_SIZE, RecordInfo

NATIVE = NativeBackend()
PYTHON = PythonBackend()
FIX_CHECKSUM = 1


def decode(backend: object, buf: bytes | memoryview) -> RecordInfo | CorruptionError:
    try:
        return backend.decode_record(buf)  # type: ignore[attr-defined,no-any-return]
    except CorruptionError as exc:
        return exc


def check_info(info: RecordInfo, buf: bytes) -> None:
    assert info.kind in (1, 2, 3), info
    assert not info.flags & ~REC_ALIGNED, info
    assert 1 <= info.key_len <= MAX_KEY and 0 <= info.meta_len <= MAX_META, info
    assert 0 <= info.payload_len <= MAX_PAYLOAD, info
    head = RECORD_HEADER_SIZE + info.key_len + info.meta_len
    assert info.payload_off >= head and len(buf) >= head, info
    assert info.record_len >= info.payload_off + info.payload_len and info.record_len % 8 == 0, info
    assert info.record_len - info.payload_off - info.payload_len < 4096, info  # padding < a page
    # the header is fully determined by its fields: re-encoding gives back the same bytes
    key = buf[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + info.key_len]
    meta = buf[RECORD_HEADER_SIZE + info.key_len : head]
    fields = _REC.pack(b"BSR1", 1, info.kind, info.flags, info.key_len, info.meta_len, info.payload_off, info.ns,
                       info.payload_len, info.record_len, info.seq, info.payload_xxh3)
    again = fields + xxhash.xxh3_64_intdigest(fields + key + meta).to_bytes(8, "little") + key + meta
    assert again == buf[:head], "re-encoded header differs"


def test_one_input(data: bytes) -> None:
    ctl, body = harness.split_control(data)
    buf = bytearray(body)
    if ctl & FIX_CHECKSUM:
        fixups.fix_record_header(buf)
    raw = bytes(buf)
    got_c = decode(NATIVE, raw)
    got_py = decode(PYTHON, memoryview(raw))  # callers hand either bytes or views
    if isinstance(got_c, BaseException) or isinstance(got_py, BaseException):
        assert type(got_c) is type(got_py), f"native {got_c!r} != python {got_py!r}"
        return
    assert got_c == got_py, f"native {got_c} != python {got_py}"
    check_info(got_c, raw)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
