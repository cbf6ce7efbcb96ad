"""What a write asks of the group-commit leader (blockstore/writer.py): one `Mutation` per record.

Built by the Store's put/delete/relocate calls and by the chunk-record helper (chunks.py); the leader
fills in `result` (a delete: whether the key existed; a move: whether its compare-and-swap won).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from blockstore.directory import Location
from blockstore.errors import InvalidArgument
from blockstore.keys import SPACE_KV
from blockstore.records import PAGE, REC_ALIGNED, Buffer, Kind
from blockstore.validate import check_key, check_meta, check_pairs, check_seq, payload_view


@dataclass(slots=True)
class Mutation:
    """One record to write (a put, a delete's tombstone, or a relocation's copy), queued for a group commit."""

    ns: str
    space: int
    key: bytes
    kind: int  # Kind.KV / Kind.CHUNK for puts, Kind.TOMBSTONE for deletes
    partition: bytes
    meta: bytes = b""
    payload: Buffer = b""
    payload_xxh3: int | None = None
    chunk_index: tuple[bytes, bytes, int, bytes] | None = None  # user, session, ts_ns, chunk id
    # a move (relocation): the directory suffix and the place it must still name (compare-and-swap)
    suffix: bytes | None = None
    expected: Location | None = None
    # a relocation set's first move: bytes the whole set needs, so it starts a fresh block rather than
    # straddling two when the open one is too short (one request's records stay in one block)
    group_need: int = 0
    # a tombstone move that only retires the tombstone from its old block (compaction decided no older
    # record of the key is left anywhere, so nothing needs it)
    drop: bool = False
    # copies (docs/copies.md): COPY_ADD writes the record `expected` names once more and adds the new
    # place to the value; COPY_DROP writes nothing and takes `place` out of it. Both compare the whole
    # value with `expected` (its copies included), so a put, a delete or another copy change meanwhile
    # makes them write nothing.
    copy_op: int = 0
    place: Location | None = None
    result: Any = None


COPY_ADD = 1
COPY_DROP = 2


def retired_places(m: Mutation, old: Location | None) -> list[Location]:
    """The places of the key's old value that mutation `m` retires (each one's bytes turn dead in its
    block and its reverse entry goes): all of them for a put or delete (invariant 8: no copy outlives
    its key's value), the primary only for a move (the copies stay where they are), none for a copy
    added, the dropped place for a copy dropped."""
    if old is None or m.copy_op == COPY_ADD:
        return []
    if m.copy_op == COPY_DROP:
        return [] if m.place is None else [m.place]
    if m.expected is not None:
        return [old.primary()]
    return old.places()


def value_after(m: Mutation, old: Location | None, placed: Location) -> Location:
    """The value a placed record of `m` leaves: its place; for a move, its place and the copies the old
    value had; for a copy added, the old value with one more copy."""
    if old is None:
        return placed
    if m.copy_op == COPY_ADD:
        return old.with_copy(placed)
    if m.expected is not None and old.copies:
        return replace(placed, copies=old.copies)
    return placed


def partition_of(ns: str, partition: bytes | str | None) -> bytes:
    """The partition (block stream) of a write: the namespace, or the namespace and a caller's partition."""
    base = ns.encode()
    if partition is None:
        return base
    if isinstance(partition, str):
        try:
            p = partition.encode()
        except UnicodeEncodeError:
            raise InvalidArgument("partition must be valid UTF-8 (it holds a lone surrogate)") from None
    elif isinstance(partition, (bytes, bytearray, memoryview)):
        p = bytes(partition)
    else:
        raise InvalidArgument(f"partition must be bytes, a str or None, not {type(partition).__name__}")
    if len(p) > 4096:
        raise InvalidArgument("partition must be at most 4096 bytes")
    return base + b"\0" + p


def relocation_mutations(moves: Sequence[tuple[bytes, Location, Buffer]], partition: bytes, together: bool,
                         drop_tombstones: Sequence[tuple[bytes, Location]]) -> list[Mutation]:
    """The mutations of `Store.relocate_many`: a compare-and-swap move per record (the moves first, in
    order), then a retirement per dropped tombstone."""
    muts = []
    for suffix, loc, payload in moves:
        if len(suffix) < 6:
            raise InvalidArgument("relocate_many: malformed key suffix")
        xxh = None if loc.kind == Kind.TOMBSTONE else loc.payload_xxh3
        muts.append(Mutation("", suffix[4], suffix[5:], loc.kind, partition, loc.meta,
                              payload_view(payload), xxh, suffix=suffix, expected=loc))
    if together and muts:
        # a page-aligned record may need up to a page more where it lands than where it was
        muts[0].group_need = sum(loc.record_len + (PAGE if loc.flags & REC_ALIGNED else 0) for _s, loc, _p in moves)
    for suffix, loc in drop_tombstones:
        if len(suffix) < 6 or loc.kind != Kind.TOMBSTONE:
            raise InvalidArgument("relocate_many: drop_tombstones takes tombstone locations")
        muts.append(Mutation("", suffix[4], suffix[5:], loc.kind, partition, loc.meta, b"",
                              suffix=suffix, expected=loc, drop=True))
    return muts


def copy_mutations(adds: Sequence[tuple[bytes, Location, Buffer]], drops: Sequence[tuple[bytes, Location, Location]],
                   partition: bytes) -> list[Mutation]:
    """The mutations of `Store.place_copies`: a copy added per (suffix, value, payload) of `adds`, then a
    copy dropped per (suffix, value, place) of `drops`. A key appears once in all: two changes of one
    value in one call would compare with the same old value."""
    muts = []
    seen: set[bytes] = set()
    for suffix, value, payload in adds:
        _check_copy_key(suffix, value, seen)
        muts.append(Mutation("", suffix[4], suffix[5:], value.kind, partition, value.meta, payload_view(payload),
                             value.payload_xxh3, suffix=suffix, expected=value, copy_op=COPY_ADD))
    if muts:  # the copies go to one block (a fresh one if the open block cannot take them all)
        muts[0].group_need = sum(v.record_len + (PAGE if v.flags & REC_ALIGNED else 0) for _s, v, _p in adds)
    for suffix, value, place in drops:
        _check_copy_key(suffix, value, seen)
        if not value.copies or not value.holds(place.block_id, place.offset):
            raise InvalidArgument("place_copies: a dropped place must be one of a value's places, and the value "
                                  "must keep one")
        muts.append(Mutation("", suffix[4], suffix[5:], value.kind, partition, value.meta, b"",
                             suffix=suffix, expected=value, copy_op=COPY_DROP, place=place))
    return muts


def _check_copy_key(suffix: bytes, value: Location, seen: set[bytes]) -> None:
    if len(suffix) < 6:
        raise InvalidArgument("place_copies: malformed key suffix")
    if value.kind == Kind.TOMBSTONE:
        raise InvalidArgument("place_copies: a tombstone has no copies")
    if suffix in seen:
        raise InvalidArgument("place_copies: one change per key in a call")
    seen.add(suffix)


def kv_mutations(ns: str, partition: bytes, items: Sequence[tuple[bytes, Buffer]],
                 metas: Sequence[bytes] | None) -> list[Mutation]:
    """The mutations of `Store.put_many`; every item is checked before any is queued: a bad one writes
    nothing of the call."""
    pairs = check_pairs("items", items, "(key, value)")
    if metas is not None:
        metas = check_seq("metas", metas, "bytes (one per item)")
        if len(metas) != len(pairs):
            raise InvalidArgument(f"metas has {len(metas)} entries for {len(pairs)} items: give one per item")
    muts = []
    for i, (key, value) in enumerate(pairs):
        meta = check_meta(metas[i], f"metas[{i}]") if metas else b""
        muts.append(Mutation(ns, SPACE_KV, check_key(key, f"items[{i}] key"), Kind.KV, partition, meta,
                             payload_view(value)))
    return muts
