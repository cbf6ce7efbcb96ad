"""Chunk record metadata and keys (docs/format.md §2.2, §5): what the engine parses out of a chunk
record's meta JSON and its user key, wherever it does so -- `chunks._decode` (get_chunk),
`keys.chunk_session_key_strict` (overwrite/delete of a chunk), `keys.chunk_session_key` (recovery
dropping a torn chunk record, fsck) -- and `keys.decode_chunk_key`. The meta read is the copy in the directory's
location value, which no checksum covers.

Input: one control byte, then the meta (control bit 0 clear) or a chunk user key (bit 0 set).

Contract: `_decode` returns a Chunk with an integer ts_ns or raises CorruptionError;
`chunk_session_key_strict` returns the session key or raises CorruptionError; `chunk_session_key` never
raises (None: an unreadable meta only leaves a stale session entry); `decode_chunk_key` returns (user, session, chunk
id) that re-encode to the key, or raises CorruptionError.
"""

from __future__ import annotations

import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.chunks import _decode
    from blockstore.directory import Location
    from blockstore.errors import CorruptionError
    from blockstore.keys import (
        SPACE_CHUNK,
        chunk_session_key,
        chunk_session_key_strict,
        decode_chunk_key,
        encode_chunk_key,
        key_suffix,
    )
    from blockstore.records import Kind

KEY = encode_chunk_key(b"alice", b"s1", b"c7")
SUFFIX = key_suffix(1, SPACE_CHUNK, KEY)


def test_one_input(data: bytes) -> None:
    ctl, body = harness.split_control(data)
    if ctl & 1:
        try:
            parts = decode_chunk_key(body)
        except CorruptionError:
            return
        assert encode_chunk_key(*parts) == body and parts[2], parts
        return
    try:
        chunk = _decode(body, b"chunk text")
        assert isinstance(chunk.ts_ns, int)
    except CorruptionError:
        pass
    loc = Location(Kind.CHUNK, 0, 128, 1, 4096, 256, 10, 1, 0, body)
    try:
        chunk_session_key_strict(SUFFIX, loc)
    except CorruptionError:
        pass
    assert chunk_session_key(SUFFIX, loc) is None or isinstance(chunk_session_key(SUFFIX, loc), bytes)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
