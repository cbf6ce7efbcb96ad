"""What the L2 adapter holds, read from the directory (the only index: nothing is kept per record): every record
of the lmcache namespaces as (key, payload size) (`records_held`: a restart's counters, tests) and the pages of
`list_l2_keys` (`list_keys`).

A module of its own because both are plain functions of the store, in the order of the listener replay
(namespaces by name, then keys bytewise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from lmcache.v1.distributed.api import KeyEntry, KeyListPage, ObjectKey

from blockstore.connector.l2_keys import (
    decode_cursor,
    decode_object_key,
    encode_cursor,
    lmcache_namespaces,
    namespace_for,
    readable_model,
)
from blockstore.store import Store

_log = logging.getLogger("blockstore.connector")


def records_held(store: Store) -> Iterator[tuple[ObjectKey, int]]:
    """(key, payload size) of every record in the lmcache namespaces, streamed from the directory."""
    foreign = 0
    for ns in lmcache_namespaces(store):
        for kb, loc in store.iter_locations(ns=ns):
            try:
                key = decode_object_key(kb)
            except ValueError:
                foreign += 1
                continue
            if namespace_for(key.model_name, key.cache_salt) != ns:
                foreign += 1
                continue
            yield key, loc.payload_len
    if foreign:
        _log.warning("blockstore L2: %d record(s) in lmcache namespaces are not ObjectKeys; ignored", foreign)


def list_keys(store: Store, model_name: str | None = None, page_size: int = 500,
              cursor: str | None = None) -> KeyListPage:
    """Keys held, in (namespace, key) order; `cursor` is the opaque next_page_token of the previous page."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
    start_ns, after = decode_cursor(cursor)
    want = None if model_name is None else readable_model(model_name)
    entries: list[KeyEntry] = []
    last: tuple[str, bytes] | None = None
    for ns in lmcache_namespaces(store):
        if start_ns is not None and ns < start_ns:
            continue
        if want is not None and ns.split(":", 2)[2] != want:
            continue
        for kb, loc in store.iter_locations(ns=ns, after=after if ns == start_ns else None):
            try:
                key = decode_object_key(kb)
            except ValueError:
                continue
            if model_name is not None and key.model_name != model_name:
                continue
            if len(entries) == page_size:
                assert last is not None
                return KeyListPage(entries=tuple(entries), next_page_token=encode_cursor(*last))
            entries.append(KeyEntry(key=key.to_encoded_object_key(), size_bytes=loc.payload_len))
            last = (ns, kb)
    return KeyListPage(entries=tuple(entries), next_page_token=None)
