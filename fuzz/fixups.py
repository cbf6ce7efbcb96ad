"""Checksum fix-ups for structure-aware fuzzing of the block format (docs/format.md §2).

Every on-disk structure carries an xxh3 checksum, which random mutations essentially never keep
right: without help the fuzzer would only ever test the checksum check. A target whose control byte
asks for it recomputes checksums over the mutated bytes first, so lengths, versions, flags and
offsets that no writer would produce reach every check after the checksum, and the scan goes on to
the next record. These helpers only write the checksum fields; everything else is the fuzzer's.
"""

from __future__ import annotations

import xxhash

RECORD_HEADER_SIZE = 64
BLOCK_HEADER_SIZE = 4096
FRAME = 64
_RECORD_MAGIC = b"BSR1"
_FOOTER_MAGIC = b"BSFOOTER"

_h = xxhash.xxh3_64_intdigest


def _u32(buf: bytearray, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "little")


def _u64(buf: bytearray, at: int) -> int:
    return int.from_bytes(buf[at : at + 8], "little")


def fix_record_header(buf: bytearray, off: int = 0) -> bool:
    """Recompute header_xxh3 of the record header at `off`, if its key and meta lie inside `buf`."""
    if off < 0 or len(buf) < off + RECORD_HEADER_SIZE:
        return False
    head = off + RECORD_HEADER_SIZE + _u32(buf, off + 8) + _u32(buf, off + 12)
    if head > len(buf):
        return False
    cks = _h(bytes(buf[off : off + 56]) + bytes(buf[off + RECORD_HEADER_SIZE : head]))
    buf[off + 56 : off + 64] = cks.to_bytes(8, "little")
    return True


def fix_frame(buf: bytearray, off: int = 0) -> bool:
    """Recompute the xxh3 of a block header or footer frame (bytes [0, 56) at 56) at `off`."""
    if off < 0 or len(buf) < off + FRAME:
        return False
    buf[off + 56 : off + 64] = _h(bytes(buf[off : off + 56])).to_bytes(8, "little")
    return True


def fix_block(buf: bytearray, *, records: bool, payloads: bool, frames: bool) -> None:
    """Walk a block file's records as a scan would and fix their checksums (payload first: the
    header checksum covers the payload_xxh3 field); then the block header and the footer frames."""
    off = BLOCK_HEADER_SIZE
    while records and off + RECORD_HEADER_SIZE <= len(buf) and buf[off : off + 4] == _RECORD_MAGIC:
        payload_off, payload_len, record_len = _u32(buf, off + 16), _u64(buf, off + 24), _u64(buf, off + 32)
        if payloads and off + payload_off + payload_len <= len(buf):
            p = bytes(buf[off + payload_off : off + payload_off + payload_len])
            buf[off + 48 : off + 56] = _h(p).to_bytes(8, "little")
        if not fix_record_header(buf, off) or record_len == 0 or record_len % 8:
            break
        off += record_len
    if frames:
        fix_frame(buf, 0)
        if len(buf) >= BLOCK_HEADER_SIZE + FRAME:
            fix_frame(buf, len(buf) - FRAME)
        if off + FRAME <= len(buf) and buf[off : off + 8] == _FOOTER_MAGIC:
            fix_frame(buf, off)
