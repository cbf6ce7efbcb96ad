"""LMCache adapter listing cursor: `connector.l2_keys.decode_cursor`, the page token a client of
`list_l2_keys` hands back (through LMCache's HTTP API, so untrusted).

Input: one control byte, then the rest. Control bit 0: the rest is the cursor's JSON body, wrapped
as the adapter wraps it (tag + urlsafe base64), so the fuzzer reaches the JSON and field checks;
otherwise the rest, decoded as UTF-8 (invalid bytes escaped), is the cursor string itself.

Contract: (None, None) for no cursor, else (namespace str starting with "lmcache:", bytes), or
ValueError naming the malformed cursor; a decoded cursor encodes and decodes back to itself.
"""

from __future__ import annotations

import base64
import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.connector.l2_keys import CURSOR_TAG, NS_PREFIX, decode_cursor, encode_cursor

WRAP = 1


def test_one_input(data: bytes) -> None:
    ctl, body = harness.split_control(data)
    if ctl & WRAP:
        cursor = CURSOR_TAG + base64.urlsafe_b64encode(body).decode()
    else:
        cursor = body.decode("utf-8", "surrogateescape")
    try:
        ns, after = decode_cursor(cursor)
    except ValueError:
        return
    assert isinstance(ns, str) and ns.startswith(NS_PREFIX) and isinstance(after, bytes), (ns, after)
    assert decode_cursor(encode_cursor(ns, after)) == (ns, after)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
