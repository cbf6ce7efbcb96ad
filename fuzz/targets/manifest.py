"""Store manifest loading (docs/format.md §1): `manifest.load_manifest`, which parses STORE/MANIFEST.json
when a store is opened (a file on disk: corrupt, truncated, or written by another version).

Input: the file's bytes (written to a file on tmpfs, read by the real code path).

Contract: the manifest dict or CorruptionError (FormatVersionError for a newer format_version), never
another class; an accepted manifest has magic "blockstore", an integer format_version in 1..1 and a
store_id the store can use: it is written into every block header as a u64 and compared with them in
recovery, so it must fit in 0..2**64-1 (encoding a block header with it must work).
"""

from __future__ import annotations

import os
import sys
import tempfile

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.errors import CorruptionError
    from blockstore.manifest import load_manifest
    from blockstore.native import NativeBackend
    from blockstore.records import FORMAT_VERSION, BlockHeader

NATIVE = NativeBackend()
_DIR = tempfile.mkdtemp(prefix="blockstore-fuzz-manifest-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
PATH = os.path.join(_DIR, "MANIFEST.json")


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        m = load_manifest(_DIR)
    except CorruptionError:
        return
    assert isinstance(m, dict) and m["magic"] == "blockstore"
    v = m["format_version"]
    assert isinstance(v, int) and 1 <= v <= FORMAT_VERSION, v
    store_id = int(m["store_id"])  # what Store._open_files does with it
    assert 0 <= store_id < 1 << 64, f"store_id {store_id} does not fit the block header's u64"
    NATIVE.encode_block_header(BlockHeader(1, store_id, 0, 0))


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
