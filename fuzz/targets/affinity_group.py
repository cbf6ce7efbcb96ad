"""Affinity group decoding (docs/format.md §5.3): `compaction.affinity.Group.decode`, the `A` values
compaction reloads from the directory at start (AffinityTracker.load skips what does not decode).

Input: the raw value.

Contract: a Group, or ValueError / struct.error (the two classes AffinityTracker.load catches: an
unreadable group is a lost hint, never a failed open). A decoded group re-encodes to exactly the
value it came from, and every key is a whole key suffix (>= 6 bytes: ns id, space, key).
"""

from __future__ import annotations

import struct
import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.compaction.affinity import Group

GID = 0x5EED


def test_one_input(data: bytes) -> None:
    try:
        g = Group.decode(GID, data)
    except (ValueError, struct.error):
        return
    assert all(len(k) >= 6 for k in g.keys)
    assert g.encode() == data, "re-encoded group differs"
    assert g.keyset == frozenset(g.keys)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
