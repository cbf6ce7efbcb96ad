"""Pure-Python twin of the C core (blockstore/native.py), byte-for-byte the same format.

Kept for two reasons only: the benchmark shows what the C core buys against it, and the whole test
suite runs against both backends (tests/conftest.py), so it cannot drift. It does not go through the
C core's fault-injection seam, so fault and crash tests use the native backend.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Sequence

import xxhash

from blockstore.backend import refuse_special_file
from blockstore.errors import (
    ChecksumMismatch,
    CorruptionError,
    FormatVersionError,
    InvalidArgument,
    TruncatedError,
    error_for_os,
)
from blockstore.records import (
    FORMAT_VERSION,
    MAX_KEY,
    MAX_META,
    MAX_PAYLOAD,
    PAGE,
    REC_ALIGNED,
    RECORD_HEADER_SIZE,
    AppendRecord,
    BlockHeader,
    Footer,
    Kind,
    Placement,
    ReadRequest,
    RecordInfo,
    ScannedRecord,
    ScanResult,
    ScanStop,
    aligned_flags,
    record_layout,
)

_REC = struct.Struct("<4sBBHIIIIQQQQ")  # up to, not including, header_xxh3
_BLOCK = struct.Struct("<8sIIQQQQQ")
_FOOTER = struct.Struct("<8sIIQQQQQ")
_RECORD_MAGIC = b"BSR1"
_BLOCK_MAGIC = b"BSBLOCK\0"
_FOOTER_MAGIC = b"BSFOOTER"
_ZEROS = bytes(PAGE)

# status codes, as the C core returns them
OK, E_IO, E_CHECKSUM, E_TRUNCATED = 0, -2, -5, -9

_h = xxhash.xxh3_64_intdigest


def _check_frame(buf, layout: struct.Struct, magic: bytes, what: str) -> tuple:  # type: ignore[no-untyped-def,type-arg]
    """Block header and footer share a frame: magic, version, fields, xxh3 of [0, 56) at 56.
    Checked in the C core's order, so both backends raise the same class for the same bytes."""
    raw = bytes(buf[:64])
    if len(raw) < 64:
        raise TruncatedError(f"decode {what}: TruncatedError")
    fields = layout.unpack_from(raw)
    if fields[0] != magic:
        raise CorruptionError(f"decode {what}: CorruptionError")
    if _h(raw[:56]) != int.from_bytes(raw[56:64], "little"):
        raise ChecksumMismatch(f"decode {what}: ChecksumMismatch")
    if fields[1] == 0:
        raise CorruptionError(f"decode {what}: CorruptionError")
    if fields[1] > FORMAT_VERSION:
        raise FormatVersionError(f"decode {what}: FormatVersionError")
    return fields


def _encode_header(info: RecordInfo, key: bytes, meta: bytes) -> bytes:
    head = _REC.pack(
        _RECORD_MAGIC, FORMAT_VERSION, info.kind, info.flags, info.key_len, info.meta_len,
        info.payload_off, info.ns, info.payload_len, info.record_len, info.seq, info.payload_xxh3,
    )
    cks = _h(head + key + meta)
    pad = info.payload_off - RECORD_HEADER_SIZE - len(key) - len(meta)
    return head + cks.to_bytes(8, "little") + key + meta + bytes(pad)


class PythonBackend:
    name = "python"

    def __init__(self) -> None:
        self._errno = threading.local()

    def last_errno(self) -> int:
        return int(getattr(self._errno, "value", 0))

    def xxh3(self, buf) -> int:  # type: ignore[no-untyped-def]
        return _h(buf)

    def xxh3_many(self, bufs: Sequence) -> list[int]:  # type: ignore[type-arg]
        return [_h(b) for b in bufs]

    def decode_record(self, buf) -> RecordInfo:  # type: ignore[no-untyped-def]
        buf = memoryview(buf)
        if len(buf) < RECORD_HEADER_SIZE:
            raise TruncatedError("decode record header: TruncatedError")
        (magic, ver, kind, flags, key_len, meta_len, poff, ns, plen, rlen, seq, pcks) = _REC.unpack_from(buf)
        if magic != _RECORD_MAGIC or ver == 0:
            raise CorruptionError("decode record header: CorruptionError")
        if ver > FORMAT_VERSION:
            raise FormatVersionError("decode record header: FormatVersionError")
        if (
            kind not in (1, 2, 3) or flags & ~REC_ALIGNED or not 1 <= key_len <= MAX_KEY
            or meta_len > MAX_META or plen > MAX_PAYLOAD
        ):
            raise CorruptionError("decode record header: CorruptionError")
        head = RECORD_HEADER_SIZE + key_len + meta_len
        if poff < head or rlen < poff + plen or rlen % 8 or rlen - poff - plen >= PAGE:  # padding < a page
            raise CorruptionError("decode record header: CorruptionError")
        if len(buf) < head:
            raise TruncatedError("decode record header: TruncatedError")
        want = _h(bytes(buf[:56]) + bytes(buf[RECORD_HEADER_SIZE:head]))
        if want != int.from_bytes(buf[56:64], "little"):
            raise ChecksumMismatch("decode record header: ChecksumMismatch")
        return RecordInfo(kind, flags, key_len, meta_len, poff, ns, plen, rlen, seq, pcks)

    def encode_block_header(self, h: BlockHeader) -> bytes:
        head = _BLOCK.pack(_BLOCK_MAGIC, FORMAT_VERSION, h.flags, h.block_id, h.store_id, h.created_ns, h.partition_hash, 0)
        return head + _h(head).to_bytes(8, "little")

    def decode_block_header(self, buf) -> BlockHeader:  # type: ignore[no-untyped-def]
        _magic, ver, flags, bid, sid, created, phash, _ = _check_frame(buf, _BLOCK, _BLOCK_MAGIC, "block header")
        return BlockHeader(bid, sid, created, phash, ver, flags)

    def encode_footer(self, f: Footer) -> bytes:
        head = _FOOTER.pack(_FOOTER_MAGIC, FORMAT_VERSION, f.flags, f.block_id, f.data_end, f.record_count, f.min_seq, f.max_seq)
        return head + _h(head).to_bytes(8, "little")

    def decode_footer(self, buf) -> Footer:  # type: ignore[no-untyped-def]
        _magic, ver, flags, bid, end, count, lo, hi = _check_frame(buf, _FOOTER, _FOOTER_MAGIC, "footer")
        return Footer(bid, end, count, lo, hi, ver, flags)

    # ---- files ----
    def _os(self, what: str, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except OSError as exc:
            raise error_for_os(exc, what) from exc

    def open(self, path: str, create: bool) -> int:
        return self._os(f"open {path}", os.open, path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)

    def open_ro(self, path: str) -> int:
        refuse_special_file(path)
        return self._os(f"open {path}", os.open, path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        self._os("close", os.close, fd)

    def sync(self, fd: int) -> None:
        self._os("fdatasync", os.fdatasync, fd)

    def dir_sync(self, path: str) -> None:
        fd = self._os(f"open {path}", os.open, path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._os(f"fsync directory {path}", os.fsync, fd)
        finally:
            os.close(fd)

    def truncate(self, fd: int, length: int) -> None:
        self._os("ftruncate", os.ftruncate, fd, length)

    def unlink(self, path: str) -> None:
        self._os(f"unlink {path}", os.unlink, path)

    def size(self, fd: int) -> int:
        return self._os("fstat", os.fstat, fd).st_size

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            chunk = self._os("pread", os.pread, fd, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = self._os("pwrite", os.pwrite, fd, view, offset)
            view, offset = view[n:], offset + n

    def drop_cache(self, fd: int) -> None:
        self._os("posix_fadvise", os.posix_fadvise, fd, 0, 0, os.POSIX_FADV_DONTNEED)

    # ---- hot paths ----
    def append(self, fd: int, offset: int, records: Sequence[AppendRecord], sync: bool) -> tuple[list[Placement], int]:
        if offset % 8:
            raise InvalidArgument("append records: offset not 8-aligned")
        pos = offset
        iov: list = []  # type: ignore[type-arg]
        placements = []
        for r in records:
            payload = memoryview(r.payload).cast("B")
            if r.kind not in (Kind.KV, Kind.CHUNK, Kind.TOMBSTONE) or not 1 <= len(r.key) <= MAX_KEY \
                    or len(r.meta) > MAX_META or len(payload) > MAX_PAYLOAD:
                raise InvalidArgument("append records: InvalidArgument")
            flags = aligned_flags(len(payload))
            poff, rlen = record_layout(pos, len(r.key), len(r.meta), len(payload), flags)
            cks = r.payload_xxh3 if r.payload_xxh3 is not None else _h(payload)
            info = RecordInfo(r.kind, flags, len(r.key), len(r.meta), poff, r.ns, len(payload), rlen, r.seq, cks)
            iov.append(_encode_header(info, r.key, r.meta))
            if len(payload):
                iov.append(payload)
            pad = rlen - poff - len(payload)
            if pad:
                iov.append(_ZEROS[:pad])
            placements.append(Placement(pos, poff, rlen, cks, flags))
            pos += rlen
        off = offset
        limit = os.sysconf("SC_IOV_MAX")
        while iov:
            n = self._os("append records", os.pwritev, fd, iov[:limit], off)
            off += n
            while iov and n >= len(iov[0]):
                n -= len(iov[0])
                iov.pop(0)
            if n:
                iov[0] = memoryview(iov[0])[n:]
        if sync:
            self._os("fdatasync", os.fdatasync, fd)
        return placements, pos

    def read_files(self, files: Sequence[tuple[int, Sequence[ReadRequest]]], max_gap: int, verify: bool,
                   willneed: bool = False) -> list[list[int]]:
        # The C core reads every file in one call to release the GIL once; here there is no GIL to
        # save, so one read_many per file gives the same statuses.
        return [self.read_many(fd, reqs, max_gap, verify, willneed) for fd, reqs in files]

    def read_many(self, fd: int, reqs: Sequence[ReadRequest], max_gap: int, verify: bool,
                  willneed: bool = False) -> list[int]:
        if willneed and reqs:
            first, last = reqs[0], reqs[-1]
            os.posix_fadvise(fd, first.offset, last.offset + last.length - first.offset, os.POSIX_FADV_WILLNEED)
        statuses = []
        for r in reqs:
            dst = memoryview(r.dst).cast("B")
            try:
                got = 0
                while got < r.length:
                    n = os.preadv(fd, [dst[got : r.length]], r.offset + got)
                    if n == 0:
                        break
                    got += n
            except OSError as exc:
                self._errno.value = exc.errno or 0
                statuses.append(-3 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else E_IO)
                continue
            if got < r.length:
                statuses.append(E_TRUNCATED)
            elif verify and _h(dst[: r.length]) != r.expect_xxh3:
                statuses.append(E_CHECKSUM)
            else:
                statuses.append(OK)
        return statuses

    def scan(self, fd: int, start: int, end: int, verify_payload: bool) -> ScanResult:
        if start % 8 or start > end:  # as bs_scan_block: BS_EINVAL (found by fuzz/targets/block_scan.py)
            raise InvalidArgument("scan block: InvalidArgument")
        records: list[ScannedRecord] = []
        off = start
        head_max = RECORD_HEADER_SIZE + MAX_KEY + MAX_META
        while off < end:
            head = self.pread(fd, min(head_max, end - off), off)
            if head[:8] == _FOOTER_MAGIC:
                return ScanResult(records, ScanStop.END, off)
            try:
                info = self.decode_record(head)
            except (CorruptionError, TruncatedError):
                return ScanResult(records, ScanStop.INVALID, off)
            if info.record_len > end - off:
                return ScanResult(records, ScanStop.INVALID, off)
            ok = None
            if verify_payload:
                hasher = xxhash.xxh3_64()
                pos, left = off + info.payload_off, info.payload_len
                while left:
                    chunk = self.pread(fd, min(left, 1 << 20), pos)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    pos, left = pos + len(chunk), left - len(chunk)
                ok = not left and hasher.intdigest() == info.payload_xxh3
            k0 = RECORD_HEADER_SIZE
            records.append(ScannedRecord(off, info, head[k0 : k0 + info.key_len],
                                         head[k0 + info.key_len : k0 + info.key_len + info.meta_len], ok))
            off += info.record_len
        return ScanResult(records, ScanStop.END, off)
