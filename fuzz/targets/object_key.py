"""LMCache adapter key decoding: `connector.l2_keys.decode_object_key`, which turns the user keys of
the store's lmcache namespaces back into LMCache `ObjectKey`s (listing, restart replay, eviction).

Input: the raw key bytes.

Contract: an ObjectKey or ValueError (the documented class: "ValueError if raw is not one"); a decoded
key serializes back to exactly `raw` (encode_object_key is its inverse), so a key read from the
directory is never mistaken for another.
"""

from __future__ import annotations

import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.connector.l2_keys import decode_object_key, encode_object_key


def test_one_input(data: bytes) -> None:
    try:
        key = decode_object_key(data)
    except ValueError:
        return
    assert encode_object_key(key) == data, f"{key} re-encodes differently"


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
