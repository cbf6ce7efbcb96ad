"""How the L2 adapter names what it stores: an LMCache `ObjectKey` as the bytes of a record key
(`encode_object_key` / `decode_object_key`), the store namespace of a (model_name, cache_salt) pair
(`namespace_for`), the record meta naming a memory object's layout (`layout_fingerprint`) and the opaque
page token of `list_l2_keys` (`encode_cursor` / `decode_cursor`).

A module of its own because these are format facts, one owner each (docs/architecture.md): the adapter's
store, lookup, load and delete paths, its listener replay, its eviction walk and the shared-bucket tier
(`remote_tier.py`) all read and write records named this way, and none of them may name one differently.
Nothing here touches a store beyond listing its namespaces.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmcache.v1.distributed.api import ObjectKey

from blockstore.records import MAX_KEY

if TYPE_CHECKING:
    from blockstore import Store

_log = logging.getLogger("blockstore.connector")

KEY_VERSION = 1
NS_PREFIX = "lmcache:"
_U16 = struct.Struct(">H")
_RANK_GROUP = struct.Struct(">qQ")  # kv_rank (signed: ObjectKey does not bound it), object_group_id (>= 0)


def encode_object_key(key: ObjectKey) -> bytes:
    """A stable, reversible byte form of every field of `key` (never Python's `hash`, which is salted
    per process): version 1 | u16 len + model_name (UTF-8) | u16 len + chunk_hash | i64 kv_rank |
    u64 object_group_id | u16 len + cache_salt (UTF-8), integers big-endian. ValueError if a field does
    not fit or the result exceeds the store's key limit."""
    model = key.model_name.encode("utf-8", "surrogatepass")
    chunk = bytes(key.chunk_hash)
    salt = key.cache_salt.encode("utf-8", "surrogatepass")
    for name, part in (("model_name", model), ("chunk_hash", chunk), ("cache_salt", salt)):
        if len(part) > 0xFFFF:
            raise ValueError(f"ObjectKey.{name} of {len(part)} bytes is too long to store")
    try:
        ints = _RANK_GROUP.pack(key.kv_rank, key.object_group_id)
    except struct.error as exc:
        raise ValueError(f"ObjectKey kv_rank/object_group_id out of range: {exc}") from None
    raw = b"".join((bytes((KEY_VERSION,)), _U16.pack(len(model)), model, _U16.pack(len(chunk)), chunk, ints,
                    _U16.pack(len(salt)), salt))
    if len(raw) > MAX_KEY:
        raise ValueError(f"ObjectKey serializes to {len(raw)} bytes, more than the store's {MAX_KEY}-byte key limit")
    return raw


def decode_object_key(raw: bytes) -> ObjectKey:
    """The `ObjectKey` that `encode_object_key` made `raw` from; ValueError if `raw` is not one."""
    try:
        if not raw or raw[0] != KEY_VERSION:
            raise ValueError(f"unknown key version {raw[:1]!r}")
        pos = 1
        parts = []
        for _ in range(2):
            (n,) = _U16.unpack_from(raw, pos)
            parts.append(bytes(raw[pos + 2 : pos + 2 + n]))
            if len(parts[-1]) != n:
                raise ValueError("key ends inside a field")
            pos += 2 + n
        rank, group = _RANK_GROUP.unpack_from(raw, pos)
        pos += _RANK_GROUP.size
        (n,) = _U16.unpack_from(raw, pos)
        salt = bytes(raw[pos + 2 : pos + 2 + n])
        if len(salt) != n or pos + 2 + n != len(raw):
            raise ValueError("key length does not match its fields")
        return ObjectKey(chunk_hash=parts[1], model_name=parts[0].decode("utf-8", "surrogatepass"), kv_rank=rank,
                         object_group_id=group, cache_salt=salt.decode("utf-8", "surrogatepass"))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a serialized ObjectKey: {exc}") from None


_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


def readable_model(model_name: str) -> str:
    return _UNSAFE.sub("_", model_name)[:96] or "_"


@functools.lru_cache(maxsize=4096)
def namespace_for(model_name: str, cache_salt: str) -> str:
    """The store namespace of one (model_name, cache_salt) pair: `lmcache:<hash>:<model>`, where the hash
    (BLAKE2b-80 of both fields, length-prefixed) tells pairs apart and the model part (sanitized, at most
    96 characters) only helps a person reading `blockstore stats`. At most 128 ASCII bytes."""
    h = hashlib.blake2b(digest_size=10)
    for part in (model_name, cache_salt):
        b = part.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return f"{NS_PREFIX}{h.hexdigest()}:{readable_model(model_name)}"


def layout_fingerprint(obj: Any) -> bytes:
    """Record meta naming the layout of a memory object: its byte size, shapes and dtypes (canonical JSON,
    compared byte for byte). LMCache's keys carry no dtype or layout, so this is what keeps a buffer of
    another layout from being filled with bytes that happen to fit."""
    doc: dict[str, Any] = {"v": 1, "size": int(obj.get_size())}
    try:
        shapes, dtypes = obj.get_shapes(), obj.get_dtypes()
    except (AssertionError, AttributeError, NotImplementedError):  # objects without per-group layouts
        try:
            shapes, dtypes = [obj.get_shape()], [obj.get_dtype()]
        except (AssertionError, AttributeError, NotImplementedError):
            shapes = dtypes = None
    if shapes is not None and dtypes is not None:
        doc["shapes"] = [[int(d) for d in s] for s in shapes]
        doc["dtypes"] = [str(d) for d in dtypes]
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _brief(key: object, limit: int = 300) -> str:
    """A key as logs show it: its repr, cut at `limit` characters. A client's model name is any length, and a
    10 KB one put 10 KB into the log per key per task (the key is refused anyway: too long to store)."""
    text = repr(key)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def group_by_namespace(keys: Sequence[ObjectKey]) -> tuple[dict[str, list[tuple[int, bytes]]], list[int]]:
    """Keys by namespace as (index, serialized key); indices of keys that cannot be stored at all."""
    groups: dict[str, list[tuple[int, bytes]]] = {}
    bad: list[int] = []
    for i, k in enumerate(keys):
        try:
            groups.setdefault(namespace_for(k.model_name, k.cache_salt), []).append((i, encode_object_key(k)))
        except (ValueError, AttributeError, TypeError) as exc:
            _log.warning("blockstore L2: key %s cannot be stored: %s", _brief(k), exc)
            bad.append(i)
    return groups, bad


def lmcache_namespaces(store: Store) -> list[str]:
    """The store's lmcache namespaces, sorted by name (the order of listings and of a listener's replay)."""
    return sorted(ns for ns in store.namespaces() if ns.startswith(NS_PREFIX))


CURSOR_TAG = "bs1."


def encode_cursor(ns: str, after: bytes) -> str:
    """The page token of `list_l2_keys` that resumes after key `after` of namespace `ns`."""
    raw = json.dumps([ns, after.hex()], separators=(",", ":")).encode()
    return CURSOR_TAG + base64.urlsafe_b64encode(raw).decode()


def decode_cursor(cursor: str | None) -> tuple[str | None, bytes | None]:
    """(namespace, key) that `encode_cursor` made `cursor` from, (None, None) for no cursor; ValueError if it is
    not one."""
    if cursor is None:
        return None, None
    try:
        if not isinstance(cursor, str) or not cursor.startswith(CURSOR_TAG):
            raise ValueError("wrong tag")
        ns, after = json.loads(base64.urlsafe_b64decode(cursor[len(CURSOR_TAG):].encode()))
        if not isinstance(ns, str) or not ns.startswith(NS_PREFIX) or not isinstance(after, str):
            raise ValueError("wrong fields")
        return ns, bytes.fromhex(after)
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise ValueError(f"malformed list_l2_keys cursor {cursor!r}: {exc}") from None

