"""What a write asks of the group-commit leader (blockstore/writer.py): one `Mutation` per record.

Built by the Store's put/delete/relocate calls and by the chunk-record helper (chunks.py); the leader
fills in `result` (a delete: whether the key existed; a move: whether its compare-and-swap won).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    result: Any = None


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
