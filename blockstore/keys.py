"""The directory's key layout (docs/format.md §5): every tag, key space and key codec.

One owner for these facts: the store, recovery, compaction, fsck and repair all build and parse
directory keys with the functions here (a second copy drifts: the chunk session-index key was once
built three ways, one raising, one swallowing, one returning None).

    K <ns_id u32 BE> <space u8> <key>              a live record's location (value: Location)
    R <block_id u64 BE> <offset u64 BE>            reverse map: which key suffix a record holds
    B <block_id u64 BE>                            the block table (value: BlockEntry)
    S <ns_id> <len u16><user> <len u16><session> <ts_ns u64 BE> <chunk id>   chunk session index
    N <name> / I <ns_id u32 BE>                    namespace name -> id, id -> name
    M <name>                                       counters (u64 LE)
    A ...                                          compaction's co-access statistics (§5.3)

A "key suffix" is <ns_id><space><key>: what follows the K tag, and what an R value holds.
"""

from __future__ import annotations

import json
from typing import Protocol

from blockstore.errors import CorruptionError

TAG_META = b"M"
TAG_NS = b"N"
TAG_NS_ID = b"I"
TAG_KEY = b"K"
TAG_BLOCK = b"B"
TAG_REVERSE = b"R"
TAG_SESSION = b"S"
TAG_AFFINITY = b"A"  # compaction's co-access statistics (docs/format.md §5.3)

SPACE_KV = 1
SPACE_CHUNK = 2
# a tombstone's meta names the key space of the record it deletes (so a rebuild can tell them apart)
TOMBSTONE_META = {SPACE_KV: b"\x01", SPACE_CHUNK: b"\x02"}

SUFFIX_HEAD = 5  # a key suffix's <ns_id u32><space u8> before the key itself


class HasMeta(Protocol):
    """A directory Location, as far as the session index needs one (keys.py sits below directory.py)."""

    @property
    def meta(self) -> bytes: ...


# ---- key suffixes and the keys built on them ----

def key_suffix(ns_id: int, space: int, key: bytes) -> bytes:
    return ns_id.to_bytes(4, "big") + bytes((space,)) + key


def suffix_ns_id(suffix: bytes) -> int:
    """The namespace id a key suffix starts with."""
    return int.from_bytes(suffix[:4], "big")


def location_key(suffix: bytes) -> bytes:
    return TAG_KEY + suffix


def keys_prefix(ns_id: int, space: int, key_prefix: bytes = b"") -> bytes:
    """The directory prefix of every location key of one key space of a namespace whose key starts
    with `key_prefix` (a scan of it lists those keys; strip `len(keys_prefix(ns_id, space))`)."""
    return TAG_KEY + key_suffix(ns_id, space, key_prefix)


def reverse_key(block_id: int, offset: int) -> bytes:
    return TAG_REVERSE + block_id.to_bytes(8, "big") + offset.to_bytes(8, "big")


def reverse_prefix(block_id: int) -> bytes:
    return TAG_REVERSE + block_id.to_bytes(8, "big")


def block_key(block_id: int) -> bytes:
    return TAG_BLOCK + block_id.to_bytes(8, "big")


def namespace_key(name: str) -> bytes:
    return TAG_NS + name.encode()


def namespace_id_key(ns_id: int) -> bytes:
    return TAG_NS_ID + ns_id.to_bytes(4, "big")


def meta_key(name: str) -> bytes:
    return TAG_META + name.encode()


# ---- chunk record keys (the key of a record in SPACE_CHUNK) ----

def encode_chunk_key(user: bytes, session: bytes, chunk_id: bytes) -> bytes:
    return len(user).to_bytes(2, "big") + user + len(session).to_bytes(2, "big") + session + chunk_id


def decode_chunk_key(key: bytes) -> tuple[bytes, bytes, bytes]:
    """(user, session, chunk id) of a chunk key; CorruptionError if it is not one."""
    try:
        ul = int.from_bytes(key[0:2], "big")
        user = key[2 : 2 + ul]
        sl = int.from_bytes(key[2 + ul : 4 + ul], "big")
        session = key[4 + ul : 4 + ul + sl]
        cid = key[4 + ul + sl :]
    except IndexError as exc:
        raise CorruptionError(f"malformed chunk key {key!r}") from exc
    if len(user) != ul or len(session) != sl or not cid:
        raise CorruptionError(f"malformed chunk key {key!r}")
    return user, session, cid


# ---- the chunk session index ----

def session_prefix(ns_id: int, user: bytes, session: bytes) -> bytes:
    return (TAG_SESSION + ns_id.to_bytes(4, "big") + len(user).to_bytes(2, "big") + user
            + len(session).to_bytes(2, "big") + session)


def session_key(ns_id: int, user: bytes, session: bytes, ts_ns: int, chunk_id: bytes) -> bytes:
    return session_prefix(ns_id, user, session) + ts_ns.to_bytes(8, "big") + chunk_id


def chunk_session_key_strict(suffix: bytes, loc: HasMeta) -> bytes:
    """The S key listing the chunk record whose key suffix is `suffix` and whose location is `loc`
    (the record meta's `ts_ns` orders the listing). CorruptionError if the key or the meta cannot say."""
    user, session, cid = decode_chunk_key(suffix[SUFFIX_HEAD:])
    try:
        ts = int(json.loads(loc.meta)["ts_ns"])
        return session_key(suffix_ns_id(suffix), user, session, ts, cid)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:  # ts_ns Infinity or not a u64
        raise CorruptionError(f"chunk record meta unreadable: {exc}") from exc


def chunk_session_key(suffix: bytes, loc: HasMeta) -> bytes | None:
    """`chunk_session_key_strict`, tolerant: None where the key or the meta cannot say (recovery and
    fsck, which must go on past a damaged record)."""
    try:
        return chunk_session_key_strict(suffix, loc)
    except CorruptionError:
        return None


def parse_session_key(k: bytes) -> tuple[bytes, int] | None:
    """(chunk key suffix, ts_ns) of an S key, or None when it does not parse."""
    try:
        nid = int.from_bytes(k[1:5], "big")
        pos = 5
        ul = int.from_bytes(k[pos : pos + 2], "big")
        user = k[pos + 2 : pos + 2 + ul]
        pos += 2 + ul
        sl = int.from_bytes(k[pos : pos + 2], "big")
        session = k[pos + 2 : pos + 2 + sl]
        pos += 2 + sl
        ts = int.from_bytes(k[pos : pos + 8], "big")
        cid = k[pos + 8 :]
    except IndexError:
        return None
    if len(k) < 5 or len(user) != ul or len(session) != sl or len(k) < pos + 8 or not cid:
        return None
    return key_suffix(nid, SPACE_CHUNK, encode_chunk_key(user, session, cid)), ts
