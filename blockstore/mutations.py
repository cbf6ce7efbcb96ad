"""What a write asks of the group-commit leader (blockstore/writer.py): one `Mutation` per record.

Built by the Store's put/delete/relocate calls and by the chunk-record helper (chunks.py); the leader
fills in `result` (a delete: whether the key existed; a move: whether its compare-and-swap won).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blockstore.directory import Location
from blockstore.records import Buffer


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
