"""Block scanning for fsck and repair: every record of a data area whose header verifies, resuming
past damage on the next record header that verifies, and why a record does not."""

from __future__ import annotations

from dataclasses import dataclass

from blockstore.backend import Backend
from blockstore.errors import ChecksumMismatch, CorruptionError, FormatVersionError, TruncatedError
from blockstore.records import BLOCK_HEADER_SIZE, MAX_KEY, MAX_META, RECORD_HEADER_SIZE, ScannedRecord

HEAD_MAX = RECORD_HEADER_SIZE + MAX_KEY + MAX_META
_FOOTER_MAGIC = b"BSFOOTER"
NEWER_RECORD = "a record header of a newer format version"
_RECORD_MAGIC = b"BSR1"


@dataclass(slots=True)
class Scan:
    records: list[ScannedRecord]
    damaged: list[tuple[int, int, str]]  # (offset of the bad record, where the scan resumed or `end`, why)


def why_invalid(backend: Backend, fd: int, off: int, end: int) -> str:
    """Why the record at `off` does not verify, in words."""
    head = backend.pread(fd, max(0, min(HEAD_MAX, end - off)), off)
    if head[:8] == _FOOTER_MAGIC:
        return "a footer inside the data area"
    if len(head) < RECORD_HEADER_SIZE:
        return f"torn: the data ends {len(head)} bytes into a record header"
    try:
        info = backend.decode_record(head)
    except FormatVersionError:
        return NEWER_RECORD
    except ChecksumMismatch:
        return "record header checksum mismatch (its header, key or meta changed)"
    except TruncatedError:
        return "torn: the data ends inside the record's key or meta"
    except CorruptionError:
        return "not a record header (magic, version, kind, flags or lengths)"
    if info.record_len > end - off:
        return f"a record of {info.record_len} bytes runs past the end of the data ({end - off} bytes left)"
    return "invalid record"


def resync(backend: Backend, fd: int, pos: int, end: int) -> int | None:
    """The next 8-aligned offset in [pos, end) where a record header verifies (a 64-bit checksum over
    header, key and meta: random bytes do not pass), or None."""
    pos = -(-pos // 8) * 8
    step = 1 << 20  # a multiple of 8: an aligned magic never straddles two reads
    while pos < end:
        buf = backend.pread(fd, min(step, end - pos), pos)
        if not buf:
            return None
        i = buf.find(_RECORD_MAGIC)
        while i != -1:
            p = pos + i
            if p % 8 == 0:
                head = backend.pread(fd, min(HEAD_MAX, end - p), p)
                try:
                    info = backend.decode_record(head)
                except CorruptionError:
                    info = None
                if info is not None and info.record_len <= end - p:
                    return p
            i = buf.find(_RECORD_MAGIC, i + 1)
        pos += len(buf)
    return None


def scan_records(backend: Backend, fd: int, start: int, end: int, *, resynchronize: bool = True) -> Scan:
    """Every record in [start, end) whose header verifies (payloads verified too), resuming after damage."""
    records: list[ScannedRecord] = []
    damaged: list[tuple[int, int, str]] = []
    off = start
    while off < end:
        res = backend.scan(fd, off, end, True)
        records.extend(res.records)
        bad = res.next_offset
        if bad >= end:
            break
        why = why_invalid(backend, fd, bad, end)
        nxt = resync(backend, fd, bad + 8, end) if resynchronize else None
        damaged.append((bad, end if nxt is None else nxt, why))
        if nxt is None:
            break
        off = nxt
    return Scan(records, damaged)


def record_at(backend: Backend, fd: int, off: int, end: int) -> ScannedRecord | None:
    """The record starting at `off` if its header verifies (its payload is verified too), else None."""
    if off % 8 or off < BLOCK_HEADER_SIZE or off >= end:
        return None
    try:
        info = backend.decode_record(backend.pread(fd, min(HEAD_MAX, end - off), off))
    except CorruptionError:
        return None
    if info.record_len > end - off:
        return None
    res = backend.scan(fd, off, off + info.record_len, True)
    return res.records[0] if res.records else None
