"""Directory value decoding (docs/format.md §5.1, §5.2): `Location.decode` and `BlockEntry.decode`,
the values RocksDB hands back for `K` (location) and `B` (block entry) keys.

Input: one control byte, then the value. Control bit 0: 0 = a location, 1 = a block entry.

Contract: a Location / BlockEntry, or CorruptionError (FormatVersionError for a value_version newer
than 1 -- 2 for a location, which lists copies from version 2 on, docs/copies.md -- docs/format.md §7)
-- never struct.error or another class. A decoded value survives encode + decode unchanged; a
location re-encodes to exactly its bytes (version 1 without copies, 2 with); a block entry's
partition is exactly `partition_len` bytes (a value too short to hold it is corrupt, not a shorter
partition).
"""

from __future__ import annotations

import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.directory import BlockEntry, Location
    from blockstore.errors import CorruptionError

BLOCK_ID = 0x0123456789ABCDEF


def test_one_input(data: bytes) -> None:
    ctl, raw = harness.split_control(data)
    if ctl & 1:
        try:
            e = BlockEntry.decode(BLOCK_ID, raw)
        except CorruptionError:
            return
        assert raw[0] == 1, f"value_version {raw[0]} accepted"
        assert len(e.partition) == int.from_bytes(raw[4:8], "little"), "partition shorter than partition_len"
        assert BlockEntry.decode(BLOCK_ID, e.encode()) == e
        return
    try:
        loc = Location.decode(raw)
    except CorruptionError:
        return
    assert raw[0] == (2 if loc.copies else 1), f"value_version {raw[0]} accepted"
    assert loc.encode() == raw, "re-encoded location differs"
    assert Location.decode(loc.encode()) == loc


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
