"""Compaction's running totals as the directory holds them (`A#counters`, docs/format.md §5.3).

Its own module because it is a format fact: the key, the layout and how an older value reads are written
down once here, for the compactor that keeps the totals and for any tool that reads them back.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from blockstore.keys import TAG_AFFINITY

if TYPE_CHECKING:
    from blockstore.directory import Directory

KEY = TAG_AFFINITY + b"#counters"  # not 8 bytes long: never mistaken for a group key
# gc bytes, relocated bytes, blocks reclaimed, groups relocated, bytes of records read in observed requests
_FMT = struct.Struct("<QQQQQ")
_FMT_V1 = struct.Struct("<QQQQ")  # before read bytes were counted: they start at 0


def encode(gc_bytes: int, relocated_bytes: int, reclaimed: int, groups_moved: int, read_bytes: int) -> bytes:
    return _FMT.pack(gc_bytes, relocated_bytes, reclaimed, groups_moved, read_bytes)


def load(d: Directory) -> tuple[tuple[int, int, int, int, int], bytes | None]:
    """The five totals in `encode`'s order (zeros where there is no value, or one of a length no version
    wrote), and the raw value as held (None when absent), so an unchanged value is not written again."""
    raw = d.get(KEY)
    if raw is not None and len(raw) == _FMT.size:
        gc_bytes, relocated, reclaimed, groups, read = _FMT.unpack(raw)
        return (gc_bytes, relocated, reclaimed, groups, read), raw
    if raw is not None and len(raw) == _FMT_V1.size:
        gc_bytes, relocated, reclaimed, groups = _FMT_V1.unpack(raw)
        return (gc_bytes, relocated, reclaimed, groups, 0), raw
    return (0, 0, 0, 0, 0), raw
