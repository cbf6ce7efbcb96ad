"""Chunk records: a piece of an agent's memory (text + metadata), keyed by (user, session, chunk id).

Stored as records of kind `chunk` in their own key space of the namespace (so they never collide
with KV keys), placed in the (namespace, user, session) partition so one session's chunks share
blocks, and indexed by (user, session, timestamp, chunk id) for listing in temporal order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockstore.directory import Directory, Location
from blockstore.errors import CorruptionError, InvalidArgument
from blockstore.keys import SPACE_CHUNK, TOMBSTONE_META, encode_chunk_key, key_suffix, session_prefix
from blockstore.mutations import Mutation
from blockstore.records import MAX_PAYLOAD, Kind
from blockstore.validate import check_int, check_keys, check_meta, check_ns, check_seq

MAX_ID = 1024


@dataclass(frozen=True, slots=True)
class Chunk:
    user_id: str
    session_id: str
    chunk_id: str
    text: str
    ts_ns: int
    meta: dict[str, Any] = field(default_factory=dict)
    kv_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class ChunkWrite:
    """One chunk record to write with `put_chunks` (ts_ns None: now)."""

    user_id: str
    session_id: str
    chunk_id: str
    text: str
    meta: Mapping[str, Any] | None = None
    kv_keys: tuple[bytes, ...] = ()
    ts_ns: int | None = None


def _id(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, not {type(value).__name__}")
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} must be valid UTF-8 (it holds a lone surrogate)") from None
    if not 1 <= len(raw) <= MAX_ID:
        raise InvalidArgument(f"{name} must be 1..{MAX_ID} UTF-8 bytes, got {len(raw)}")
    return raw


def _decode(meta: bytes, text: bytes) -> Chunk:
    try:
        m = json.loads(meta)
        return Chunk(m["user"], m["session"], m["chunk"], bytes(text).decode(), int(m["ts_ns"]),
                     m.get("meta") or {}, tuple(bytes.fromhex(k) for k in m.get("kv_keys", ())))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:  # OverflowError: ts_ns Infinity
        raise CorruptionError(f"chunk record metadata unreadable: {exc}") from exc


def _chunk_mutation(ns: str, c: ChunkWrite) -> Mutation:
    u, s, cid = _id("user_id", c.user_id), _id("session_id", c.session_id), _id("chunk_id", c.chunk_id)
    if not isinstance(c.text, str):
        raise InvalidArgument(f"text must be a str, not {type(c.text).__name__}")
    try:
        encoded_text = c.text.encode()
    except UnicodeEncodeError:
        raise InvalidArgument("text must be valid UTF-8 (it holds a lone surrogate)") from None
    if len(encoded_text) > MAX_PAYLOAD:  # else the C core refused the whole group commit: other writers' records too
        raise InvalidArgument(f"text of {len(encoded_text)} UTF-8 bytes exceeds the {MAX_PAYLOAD}-byte limit of a record")
    ts = time.time_ns() if c.ts_ns is None else check_int("ts_ns", c.ts_ns)
    if not 0 <= ts < 1 << 64:
        raise InvalidArgument("ts_ns must fit in an unsigned 64-bit integer")
    if c.meta is not None and not isinstance(c.meta, Mapping):
        raise InvalidArgument(f"meta must be a mapping (a dict) or None, not {type(c.meta).__name__}")
    kv_keys = check_keys(c.kv_keys, "kv_keys")
    try:
        body = json.dumps({"user": c.user_id, "session": c.session_id, "chunk": c.chunk_id, "ts_ns": ts,
                           "meta": dict(c.meta or {}), "kv_keys": [k.hex() for k in kv_keys]},
                          separators=(",", ":"), allow_nan=False).encode()  # NaN/Infinity are not JSON
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: meta nested too deep
        raise InvalidArgument(f"chunk meta must be JSON-serializable: {exc}") from exc
    partition = ns.encode() + b"\0u" + encode_chunk_key(u, s, b"")
    return Mutation(ns, SPACE_CHUNK, encode_chunk_key(u, s, cid), Kind.CHUNK, partition,
                    check_meta(body), encoded_text, chunk_index=(u, s, ts, cid))


def session_partition(user_id: str, session_id: str) -> bytes:
    """A chunk session's partition as `put_many(partition=...)` spells it: KV records put with it share
    the session's block stream (partition_of prefixes the namespace, as the chunk records' is)."""
    return b"u" + encode_chunk_key(_id("user_id", user_id), _id("session_id", session_id), b"")


def _chunk_ids(ids: Any) -> list[tuple[str, str, str]]:
    """get_chunks' `ids`: a sequence of (user_id, session_id, chunk_id) triples."""
    out = check_seq("ids", ids, "(user_id, session_id, chunk_id) triples")
    for i, t in enumerate(out):
        if not isinstance(t, (tuple, list)) or len(t) != 3:
            raise InvalidArgument(f"ids[{i}] must be a (user_id, session_id, chunk_id) triple, not {type(t).__name__}")
    return [(u, s, c) for u, s, c in out]


class ChunkRecords:
    """The chunk-record API of a Store (Store.put_chunk and the rest delegate here). It is given the
    engine's parts it uses, so it needs no import of the store."""

    def __init__(self, *, check_open: Callable[..., None], namespace_id: Callable[[str], int | None],
                 submit: Callable[[list[Mutation]], None], read: Callable[..., list[Any]],
                 directory: Directory) -> None:
        self._check_open = check_open
        self._namespace_id = namespace_id
        self._submit = submit
        self._read = read
        self._dir = directory

    def put_chunks(self, chunks: Sequence[ChunkWrite], *, ns: str = "default") -> None:
        self._check_open(write=True)
        check_ns(ns)
        writes = check_seq("chunks", chunks, "ChunkWrite")
        for i, c in enumerate(writes):
            if not isinstance(c, ChunkWrite):
                raise InvalidArgument(f"chunks[{i}] must be a ChunkWrite, not {type(c).__name__}")
        self._submit([_chunk_mutation(ns, c) for c in writes])  # all checked before any is queued

    def get_chunks(self, ids: Sequence[tuple[str, str, str]], *, ns: str = "default") -> list[Chunk | None]:
        self._check_open()
        nid = self._namespace_id(ns)
        triples = _chunk_ids(ids)
        keys = [encode_chunk_key(_id("user_id", u), _id("session_id", s), _id("chunk_id", c)) for u, s, c in triples]
        if nid is None:
            return [None] * len(keys)
        locs = self._dir.get_locations([key_suffix(nid, SPACE_CHUNK, k) for k in keys])
        read_from: list[Location | None] = []  # each text's own meta: a text re-read after a race may be newer
        texts = self._read(nid, SPACE_CHUNK, keys, None, located=locs, read_from=read_from)
        return [None if t is None or loc is None else _decode(loc.meta, t) for t, loc in zip(texts, read_from)]

    def list_chunks(self, user_id: str, session_id: str, *, ns: str = "default") -> list[Chunk]:
        self._check_open()
        nid = self._namespace_id(ns)
        u, s = _id("user_id", user_id), _id("session_id", session_id)
        if nid is None:
            return []
        prefix = session_prefix(nid, u, s)
        ids = [(user_id, session_id, k[len(prefix) + 8 :].decode()) for k, _ in self._dir.scan_prefix(prefix)]
        return [c for c in self.get_chunks(ids, ns=ns) if c is not None]

    def delete_chunk(self, user_id: str, session_id: str, chunk_id: str, *, ns: str = "default") -> bool:
        self._check_open(write=True)
        check_ns(ns)
        u, s, c = _id("user_id", user_id), _id("session_id", session_id), _id("chunk_id", chunk_id)
        partition = ns.encode() + b"\0u" + encode_chunk_key(u, s, b"")
        m = Mutation(ns, SPACE_CHUNK, encode_chunk_key(u, s, c), Kind.TOMBSTONE, partition, TOMBSTONE_META[SPACE_CHUNK])
        self._submit([m])
        return bool(m.result)
