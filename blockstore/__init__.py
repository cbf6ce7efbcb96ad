"""blockstore: a log-structured block store for LLM KV-cache and agent-memory records.

    import blockstore
    with blockstore.open("/data/kv", durability="sync") as store:
        store.put(b"key", payload)
        [view] = store.get_many([b"key"])

See README.md for the overview and docs/format.md for the on-disk format.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from blockstore.chunks import Chunk, ChunkWrite
from blockstore.errors import (
    BlockstoreError,
    ChecksumMismatch,
    CorruptionError,
    FormatVersionError,
    InvalidArgument,
    IOErrorBS,
    NoSpace,
    NotFound,
    OutOfMemory,
    ReadOnlyStore,
    RemoteNotConfirmed,
    StoreClosed,
    StoreLocked,
    TruncatedError,
)
from blockstore.manifest import DEFAULT_BLOCK_SIZE
from blockstore.store import Store, StoreStats

# the keyword options of Store, for open()'s check (a misspelt option must not pass silently or as TypeError)
_STORE_OPTIONS = frozenset(inspect.signature(Store).parameters) - {"path"}

__version__ = "0.1.0"


def open(path: str | os.PathLike[str], **kwargs: Any) -> Store:  # noqa: A001 - mirrors builtins.open on purpose
    """Open (by default, create) a store. Keyword arguments are those of `Store`:
    create=True, read_only=False, durability="cache"|"sync"|"remote" (remote: a write returns once its block is sealed and
    confirmed in the object store by an attached blockstore.remote.RemoteTier; docs/remote.md),
    block_size=None (a new store: 64 MiB; an existing one: the size it was created with),
    max_open_blocks=64, idle_seal_seconds=30, read_gap=128 KiB, read_ahead=True,
    on_corrupt="raise"|"miss", backend="native"|"python",
    compaction=None | a policy name ("full", ...) | {"policy": ..., knob: value} (starts the compactor),
    allow_non_empty=False (create a store in a non-empty directory that is not one: refused by default).
    An option `Store` does not take raises InvalidArgument naming it (Python's own TypeError is outside the
    BlockstoreError hierarchy)."""
    unknown = sorted(set(kwargs) - _STORE_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown option(s) {unknown}; known: {sorted(_STORE_OPTIONS)}")
    return Store(path, **kwargs)


__all__ = [
    "DEFAULT_BLOCK_SIZE", "BlockstoreError", "ChecksumMismatch", "Chunk", "ChunkWrite", "CorruptionError",
    "FormatVersionError", "IOErrorBS", "InvalidArgument", "NoSpace", "NotFound", "OutOfMemory",
    "ReadOnlyStore", "RemoteNotConfirmed", "Store", "StoreClosed", "StoreLocked", "StoreStats", "TruncatedError", "open",
]
