"""The directory listings of `Store` (a base class of it): a namespace's KV keys and their locations, in key
byte order, as iterators the caller may pause."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from blockstore.directory import Directory, Location
from blockstore.errors import InvalidArgument
from blockstore.keys import SPACE_KV, keys_prefix
from blockstore.store_records import DEFAULT_NAMESPACE


class Listings:
    """`iter_keys` and `iter_locations`: one directory scan each, read in batches (Directory.scan_prefix), so a
    paused listing holds no RocksDB iterator: it neither keeps the directory open after close (its next
    `next()` raises StoreClosed) nor delays close. Not a point-in-time view: a key written or deleted ahead
    of the listing's position while it is paused may be seen or not; every key present throughout is seen
    once, in order."""

    dir: Directory
    _check_open: Callable[..., None]
    namespace_id: Callable[[str], int | None]

    def iter_keys(self, *, ns: str = DEFAULT_NAMESPACE, prefix: bytes = b"") -> Iterator[bytes]:
        """KV keys of one namespace, in byte order (chunk records are listed by `list_chunks`)."""
        self._check_open()
        if not isinstance(prefix, (bytes, bytearray)):
            raise InvalidArgument(f"prefix must be bytes, not {type(prefix).__name__}")
        nid = self.namespace_id(ns)
        if nid is None:
            return
        cut = len(keys_prefix(nid, SPACE_KV))
        for k, _v in self.dir.scan_prefix(keys_prefix(nid, SPACE_KV, bytes(prefix))):
            yield k[cut:]

    def iter_locations(self, *, ns: str = DEFAULT_NAMESPACE, after: bytes | None = None) -> Iterator[tuple[bytes, Location]]:
        """(key, location) of one namespace's KV records in key byte order, starting just after the key
        `after` (None: from the first). One directory scan; a cursor for listings and tools."""
        self._check_open()
        if after is not None and not isinstance(after, (bytes, bytearray)):
            raise InvalidArgument(f"after must be bytes or None, not {type(after).__name__}")
        nid = self.namespace_id(ns)
        if nid is None:
            return
        prefix = keys_prefix(nid, SPACE_KV)
        start = None if after is None else prefix + bytes(after) + b"\x00"
        for k, v in self.dir.scan_prefix(prefix, start):
            yield k[len(prefix):], Location.decode(v)
