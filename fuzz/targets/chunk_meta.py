"""Chunk record metadata and keys (docs/format.md §2.2, §5): what the engine parses out of a chunk
record's meta JSON and its user key, wherever it does so -- `chunks._decode` (get_chunk),
`Store._unindex_chunk` (overwrite/delete of a chunk), `recovery._drop_location` (recovery dropping a
torn chunk record) -- and `chunks.decode_chunk_key`. The meta read is the copy in the directory's
location value, which no checksum covers.

Input: one control byte, then the meta (control bit 0 clear) or a chunk user key (bit 0 set).

Contract: `_decode` returns a Chunk with an integer ts_ns or raises CorruptionError;
`_unindex_chunk` stages its delete or raises CorruptionError; `_drop_location` never raises (an
unreadable meta only leaves a stale session entry); `decode_chunk_key` returns (user, session, chunk
id) that re-encode to the key, or raises CorruptionError.
"""

from __future__ import annotations

import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.chunks import _decode, decode_chunk_key, encode_chunk_key
    from blockstore.directory import SPACE_CHUNK, DirectoryBatch, Location, key_suffix
    from blockstore.errors import CorruptionError
    from blockstore.records import Kind
    from blockstore.recovery import _drop_location
    from blockstore.store import Store

KEY = encode_chunk_key(b"alice", b"s1", b"c7")
SUFFIX = key_suffix(1, SPACE_CHUNK, KEY)
_STORE = object.__new__(Store)  # _unindex_chunk uses only its arguments


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
        _STORE._unindex_chunk(DirectoryBatch(), 1, KEY, loc)
    except CorruptionError:
        pass
    _drop_location(DirectoryBatch(), _STORE, SUFFIX, loc)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
