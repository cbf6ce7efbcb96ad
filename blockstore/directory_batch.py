"""The changes of one atomic directory write (`Directory.write`): a location with the reverse entries of every
place it names, block-table entries and counters, so a location and the block-table counters it affects never
disagree (docs/format.md §5)."""

from __future__ import annotations

import struct

from rocksdict import WriteBatch

from blockstore.directory_values import BlockEntry, Location
from blockstore.keys import block_key, location_key, meta_key, reverse_key

_U64 = struct.Struct("<Q")


class DirectoryBatch:
    """Changes to be written atomically. Collects puts/deletes; `Directory.write` applies them."""

    def __init__(self) -> None:
        self._wb = WriteBatch(raw_mode=True)
        self.empty = True

    def put(self, key: bytes, value: bytes) -> None:
        self._wb.put(key, value)
        self.empty = False

    def delete(self, key: bytes) -> None:
        self._wb.delete(key)
        self.empty = False

    def put_meta(self, name: str, value: int) -> None:
        self.put(meta_key(name), _U64.pack(value))

    def put_location(self, suffix: bytes, loc: Location) -> None:
        """The value and a reverse entry for each place it names (the primary and every copy)."""
        self.put(location_key(suffix), loc.encode())
        self.put(reverse_key(loc.block_id, loc.offset), suffix)
        for c in loc.copies:
            self.put(reverse_key(c.block_id, c.offset), suffix)

    def delete_location(self, suffix: bytes, old: Location | None) -> None:
        self.delete(location_key(suffix))
        if old is not None:
            self.forget_reverse(old)

    def forget_reverse(self, loc: Location) -> None:
        """The reverse entries of every place `loc` names (its copies retire with it)."""
        self.delete(reverse_key(loc.block_id, loc.offset))
        for c in loc.copies:
            self.delete(reverse_key(c.block_id, c.offset))

    def forget_place(self, place: Location) -> None:
        """The reverse entry of one place only (a copy dropped or moved, the value kept)."""
        self.delete(reverse_key(place.block_id, place.offset))

    def put_block(self, entry: BlockEntry) -> None:
        self.put(block_key(entry.block_id), entry.encode())

    def delete_block(self, block_id: int) -> None:
        self.delete(block_key(block_id))
