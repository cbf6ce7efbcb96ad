"""The directory's values (docs/format.md §5.1, §5.2): a key's location (with the places of its copies)
and a block-table entry, each with its encoding. Kept apart from directory.py, which holds the RocksDB
instance and the write batch: recovery, fsck and repair decode these without opening a store.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass, fields, replace

from blockstore.errors import CorruptionError, FormatVersionError

BLOCK_OPEN = 1
BLOCK_SEALED = 2
BLOCK_RECLAIMING = 3

_LOC = struct.Struct("<BBHIQQQQQQ")  # 56 bytes, then meta (version 1) or the copy list and meta (version 2)
_COPY = struct.Struct("<QQQIH")  # a placed copy: block_id, offset, record_len, payload_off, flags (30 bytes)
_BLOCK = struct.Struct("<BBHIQQQQQQQQQQ")  # 88 bytes, then partition, then remote name (its length in the H)
VALUE_VERSION = 1  # block entries, and locations without copies (what every older build reads)
LOCATION_VERSION = 2  # the newest location value: version 2 adds the placed copies (docs/format.md §5.1)
MAX_COPIES = 7  # the most copies one location value can list (a policy bound is far lower: copies.md)


def _check_value(raw: bytes, size: int, what: str, newest: int = VALUE_VERSION) -> None:
    """A value shorter than its fixed part, or of version 0, is corrupt; a newer version is not guessed
    at (docs/format.md §7). Found by fuzz/targets/directory_values.py: these raised struct.error."""
    if len(raw) < size:
        raise CorruptionError(f"{what} value of {len(raw)} bytes is shorter than {size}")
    if raw[0] == 0:
        raise CorruptionError(f"{what} value has version 0")
    if raw[0] > newest:
        raise FormatVersionError(f"{what} value version {raw[0]} is newer than this build ({newest})")


@dataclass(frozen=True, slots=True)
class CopyPlace:
    """Where one extra placed copy of a record is: the same record (key, meta, payload, sequence number)
    appended to another block, so a request that reads that block anyway finds it there (docs/copies.md).
    Offsets, lengths and flags are its own: page alignment can pad it differently from the primary."""

    block_id: int
    offset: int
    record_len: int
    payload_off: int
    flags: int


@dataclass(frozen=True, slots=True)
class Location:
    """Where a live record is, plus what a read needs without touching the header. `copies`: the places
    of its extra copies (same record, other blocks); a value names every copy, so whatever replaces the
    value (a put, a delete) retires them all in the same write, and a compare-and-swap on the whole
    value sees a copy placed or dropped meanwhile."""

    kind: int
    flags: int
    payload_off: int
    block_id: int
    offset: int
    record_len: int
    payload_len: int
    seq: int
    payload_xxh3: int
    meta: bytes
    copies: tuple[CopyPlace, ...] = ()

    def encode(self) -> bytes:
        if not self.copies:  # version 1: what a store without copies always wrote, and older builds read
            return _LOC.pack(1, self.kind, self.flags, self.payload_off, self.block_id, self.offset,
                             self.record_len, self.payload_len, self.seq, self.payload_xxh3) + self.meta
        head = _LOC.pack(2, self.kind, self.flags, self.payload_off, self.block_id, self.offset,
                         self.record_len, self.payload_len, self.seq, self.payload_xxh3)
        listed = b"".join(_COPY.pack(c.block_id, c.offset, c.record_len, c.payload_off, c.flags)
                          for c in self.copies)
        return head + bytes((len(self.copies),)) + listed + self.meta

    @classmethod
    def decode(cls, raw: bytes) -> Location:
        """CorruptionError (FormatVersionError for a newer value_version) if `raw` is not a location."""
        _check_value(raw, _LOC.size, "location", LOCATION_VERSION)
        (v, kind, flags, poff, bid, off, rlen, plen, seq, cks) = _LOC.unpack_from(raw)
        if v == 1:
            return cls(kind, flags, poff, bid, off, rlen, plen, seq, cks, bytes(raw[_LOC.size :]))
        if len(raw) < _LOC.size + 1:
            raise CorruptionError("location value of version 2 ends before its copy count")
        n = raw[_LOC.size]
        start = _LOC.size + 1
        end = start + n * _COPY.size
        if n == 0 or n > MAX_COPIES:
            raise CorruptionError(f"location value lists {n} copies (1 to {MAX_COPIES} allowed)")
        if len(raw) < end:
            raise CorruptionError(f"location value of {len(raw)} bytes ends inside its {n} copies")
        copies = tuple(CopyPlace(*_COPY.unpack_from(raw, start + i * _COPY.size)) for i in range(n))
        return cls(kind, flags, poff, bid, off, rlen, plen, seq, cks, bytes(raw[end:]), copies)

    @property
    def payload_offset(self) -> int:
        return self.offset + self.payload_off

    def same_place(self, other: Location) -> bool:
        return (self.block_id, self.offset, self.seq) == (other.block_id, other.offset, other.seq)

    # ---- copies ----
    def at(self, place: CopyPlace) -> Location:
        """This record as found at one of its copies (a Location without copies)."""
        return Location(self.kind, place.flags, place.payload_off, place.block_id, place.offset,
                        place.record_len, self.payload_len, self.seq, self.payload_xxh3, self.meta)

    def primary(self) -> Location:
        """The primary place alone (no copies)."""
        return self if not self.copies else replace(self, copies=())

    def places(self) -> list[Location]:
        """Every place the record is at, the primary first, each as a Location without copies."""
        return [self.primary(), *(self.at(c) for c in self.copies)]

    def holds(self, block_id: int, offset: int) -> bool:
        """Whether the primary or a copy is the record at (block_id, offset)."""
        return (self.block_id, self.offset) == (block_id, offset) or \
            any((c.block_id, c.offset) == (block_id, offset) for c in self.copies)

    def with_copy(self, where: Location) -> Location:
        """This value with one more copy, at `where` (a place of the same record)."""
        place = CopyPlace(where.block_id, where.offset, where.record_len, where.payload_off, where.flags)
        return replace(self, copies=(*self.copies, place))

    def without(self, block_id: int, offset: int) -> Location:
        """This value less the place (block_id, offset): a copy leaves the list; the primary is replaced
        by the first copy. The caller checked `holds`, and that a copy is left when it drops the primary."""
        if (self.block_id, self.offset) != (block_id, offset):
            return replace(self, copies=tuple(c for c in self.copies if (c.block_id, c.offset) != (block_id, offset)))
        first, rest = self.copies[0], self.copies[1:]
        return replace(self.at(first), copies=rest)


@dataclass(slots=True)
class BlockEntry:
    """One row of the block table. Mutated only on copies that are then written in a batch."""

    block_id: int
    state: int
    partition: bytes
    written_bytes: int = 0
    live_bytes: int = 0
    live_records: int = 0
    total_records: int = 0
    tombstones: int = 0
    data_end: int = 4096
    created_ns: int = 0
    last_append_ns: int = 0
    sealed_ns: int = 0
    live_logical_bytes: int = 0
    # the object the remote tier confirmed holds this block's file (empty: local only). Only a block with
    # one may lose its local file (Store.drop_local_copy); reads then fetch from the object. Stored after
    # the partition, its length in the formerly reserved 16-bit field, so older readers ignore it.
    remote_name: bytes = b""

    def encode(self) -> bytes:
        return _BLOCK.pack(
            1, self.state, len(self.remote_name), len(self.partition), self.written_bytes, self.live_bytes,
            self.live_records, self.total_records, self.tombstones, self.data_end, self.created_ns,
            self.last_append_ns, self.sealed_ns, self.live_logical_bytes,
        ) + self.partition + self.remote_name

    @classmethod
    def decode(cls, block_id: int, raw: bytes) -> BlockEntry:
        """CorruptionError (FormatVersionError for a newer value_version) if `raw` is not a block entry."""
        _check_value(raw, _BLOCK.size, "block entry")
        f = _BLOCK.unpack_from(raw)
        rlen, plen = f[2], f[3]
        if len(raw) < _BLOCK.size + plen:
            raise CorruptionError(f"block entry value of {len(raw)} bytes ends inside its {plen}-byte partition")
        if len(raw) < _BLOCK.size + plen + rlen:
            raise CorruptionError(f"block entry value of {len(raw)} bytes ends inside its {rlen}-byte remote name")
        end = _BLOCK.size + plen
        e = cls(block_id, f[1], bytes(raw[_BLOCK.size : end]), *f[4:])
        e.remote_name = bytes(raw[end : end + rlen])
        return e

    def copy(self) -> BlockEntry:
        # positional, by one attrgetter: 3.3x faster than a dict of the fields as keywords (0.47 vs 1.54 µs);
        # Store.block_table copies every entry each compaction pass, Python the GIL is held for
        return BlockEntry(*_entry_fields(self))

    @property
    def dead_bytes(self) -> int:
        return self.written_bytes - self.live_bytes

    @property
    def invalid_ratio(self) -> float:
        return self.dead_bytes / self.written_bytes if self.written_bytes else 0.0


_entry_fields = operator.attrgetter(*(f.name for f in fields(BlockEntry)))  # in the constructor's order
