"""Record-level types shared by the engine and both I/O backends (docs/format.md §2)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# A payload or destination: anything exposing the buffer protocol (bytes, bytearray, memoryview,
# numpy arrays, mmap). Destinations must be writable and C-contiguous.
Buffer = bytes | bytearray | memoryview

FORMAT_VERSION = 1
BLOCK_HEADER_SIZE = 4096
RECORD_HEADER_SIZE = 64
FOOTER_SIZE = 64
PAGE = 4096
MAX_KEY = 4096
MAX_META = 65536
MAX_PAYLOAD = 0xFFFF_FFFF
MAX_NAMESPACE = 255
REC_ALIGNED = 0x0001


class Kind(enum.IntEnum):
    KV = 1
    CHUNK = 2
    TOMBSTONE = 3


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """A decoded, verified record header."""

    kind: int
    flags: int
    key_len: int
    meta_len: int
    payload_off: int
    ns: int
    payload_len: int
    record_len: int
    seq: int
    payload_xxh3: int


@dataclass(frozen=True, slots=True)
class BlockHeader:
    block_id: int
    store_id: int
    created_ns: int
    partition_hash: int
    format_version: int = FORMAT_VERSION
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Footer:
    block_id: int
    data_end: int
    record_count: int
    min_seq: int
    max_seq: int
    format_version: int = FORMAT_VERSION
    flags: int = 0


@dataclass(slots=True)
class AppendRecord:
    """One record to append. `payload_xxh3` may be precomputed (pipelined checksums)."""

    kind: int
    ns: int
    key: bytes
    meta: bytes
    payload: Buffer
    seq: int
    payload_xxh3: int | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an appended record landed."""

    offset: int
    payload_off: int
    record_len: int
    payload_xxh3: int
    flags: int


@dataclass(slots=True)
class ReadRequest:
    """Read `length` payload bytes at file offset `offset` into `dst`, verifying `expect_xxh3`."""

    offset: int
    length: int
    dst: Buffer
    expect_xxh3: int


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    offset: int
    info: RecordInfo
    key: bytes
    meta: bytes
    payload_ok: bool | None  # None when the payload was not verified


class ScanStop(enum.IntEnum):
    END = 0  # reached the end (or a footer)
    MORE = 1  # internal: resumed by the backend itself
    INVALID = 2  # an invalid or torn record at `next_offset`


@dataclass(frozen=True, slots=True)
class ScanResult:
    records: list[ScannedRecord]
    stop: ScanStop
    next_offset: int


def record_layout(start: int, key_len: int, meta_len: int, payload_len: int, flags: int) -> tuple[int, int]:
    """(payload_off, record_len) of a record starting at `start`; the same rule as the C core."""
    align = PAGE if flags & REC_ALIGNED else 8
    head_end = start + RECORD_HEADER_SIZE + key_len + meta_len
    payload_start = -(-head_end // align) * align
    end = -(-(payload_start + payload_len) // align) * align
    return payload_start - start, end - start


def aligned_flags(payload_len: int) -> int:
    return REC_ALIGNED if payload_len >= PAGE else 0
