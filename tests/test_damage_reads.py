"""What a read of a damaged record tells its caller (review H85): the error names the block and what to do, as
a read whose block file is missing already did ("run `blockstore fsck PATH` (--repair drops the records it
held)")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blockstore
from blockstore.errors import CorruptionError


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_record_read_says_what_to_do(tmp_path: Path, backend: str, damage: str) -> None:
    # A read of a record whose payload does not verify, or whose block was cut short, raised "read of key b'a0' in
    # block 0000000000000001: TruncatedError" (or "...: payload does not match its checksum; not returned") and no
    # word of fsck, where a missing block file's read names it.
    with blockstore.open(tmp_path, block_size=64 << 10, backend=backend) as s:
        s.put_many([(b"a%d" % i, os.urandom(3000)) for i in range(4)], partition="p")
        loc = s.locate_many([b"a0"])[0]
    assert loc is not None
    path = tmp_path / "blocks" / f"{loc.block_id:016x}.blk"
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(loc.payload_offset + 10)
            f.write(b"\xee\xee")
    else:
        os.truncate(path, loc.payload_offset + 100)
    with blockstore.open(tmp_path, read_only=True, backend=backend) as s:
        with pytest.raises(CorruptionError, match=f"block {loc.block_id:016x}.*run `blockstore fsck {tmp_path}`"):
            s.get(b"a0")
