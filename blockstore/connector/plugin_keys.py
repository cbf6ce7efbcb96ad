"""How the in-process plugin names LMCache's keys in the store: the record key, the namespace of a key's
(model_name, tags) pair and the segment a per-layer key belongs to.

A module of its own because it is the plugin's key format: the reads, the writes, the presence checks and the
listing all name records through it, and a change here orphans every record already stored.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

from lmcache.utils import CacheEngineKey, LayerCacheEngineKey

from blockstore.records import MAX_KEY

NS_PREFIX = "lmcache-inproc:"

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


@functools.lru_cache(maxsize=4096)
def namespace_for(model_name: str, tags: tuple[tuple[str, str], ...] = ()) -> str:
    """The store namespace of one (model_name, tags) pair: `lmcache-inproc:<hash>:<model>`; the hash
    (BLAKE2b-80 over both, length-prefixed) tells pairs apart, the sanitized model name (at most 96
    characters) only helps a person reading `blockstore stats`."""
    h = hashlib.blake2b(digest_size=10)
    parts = [model_name] + [p for kv in tags for p in kv]
    h.update(len(parts).to_bytes(4, "big"))
    for part in parts:
        b = part.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return f"{NS_PREFIX}{h.hexdigest()}:{_UNSAFE.sub('_', model_name)[:96] or '_'}"


def key_namespace(key: CacheEngineKey) -> str:
    tags = tuple((str(k), str(v)) for k, v in (key.tags or ()))
    return namespace_for(key.model_name, tags)


def encode_key(key: CacheEngineKey) -> bytes:
    """LMCache's own string form of the key (`model@world@worker@hash@dtype[@layer][@tag%value...]`)."""
    raw = key.to_string().encode("utf-8", "surrogatepass")
    if len(raw) > MAX_KEY:
        raise ValueError(f"key {raw[:64]!r}... is {len(raw)} bytes, more than the store's {MAX_KEY}-byte limit")
    return raw


def segment_of(key: CacheEngineKey) -> str | None:
    """For a per-layer key, the identity of its chunk or segment (the key without its layer); else None."""
    if not isinstance(key, LayerCacheEngineKey):
        return None
    # LMCache spells a key's dtype only in its private _dtype_str (what its own to_string() writes)
    return f"seg/{key.world_size}/{key.worker_id}/{key.chunk_hash_hex}/{key._dtype_str}"  # noqa: SLF001


def by_namespace(keys: Sequence[CacheEngineKey]) -> dict[str, list[tuple[int, bytes]]]:
    """namespace -> [(index in `keys`, encoded key)], in batch order: what one store call per namespace takes."""
    groups: dict[str, list[tuple[int, bytes]]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(key_namespace(k), []).append((i, encode_key(k)))
    return groups
