"""fsck --repair of a block holding a key's primary place, the key having a copy elsewhere (docs/copies.md):
the key keeps its copy, promoted to primary, and the repair reports what the check found, nothing more
(review H81)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blockstore
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.tools import fsck
from blockstore.tools.repair import repair

COPIES = b"\0compaction/copies"


@pytest.mark.xfail(strict=True, reason="repair's _drop_place promotes the copy without giving its block the key's "
                   "live_logical_bytes (recovery does: recovery._give_logical); the next round finds and fixes it "
                   "as a block-counts finding of its own making, so the report lists 2 findings where the check "
                   "saw 1. The end state is right. Left by H81 (a per-batch tally of promoted bytes in repair_base)")
def test_repair_of_a_damaged_primary_reports_only_what_the_check_found(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, block_size=1 << 20) as s:
        s.put(b"other", b"o" * 10_000)
        s.put(b"k", b"x" * 10_000)
        sfx = key_suffix(s.namespace_id("default"), SPACE_KV, b"k")  # type: ignore[arg-type]
        value = s.dir.get_locations([sfx])[0]
        assert value is not None
        payload = s.read_locations([value.primary()])[0]
        assert s.place_copies([(sfx, value, payload)], partition=COPIES) == [True]
    with open(os.path.join(tmp_path, "blocks", f"{value.block_id:016x}.blk"), "r+b") as f:
        f.seek(value.payload_offset + 100)
        f.write(b"y")
    checked = fsck.check(tmp_path, log=False)
    assert [f.kind for f in checked.findings] == ["payload"], [f.line() for f in checked.findings]
    result = repair(tmp_path)
    assert [f.line() for f in fsck.check(tmp_path, log=False).findings] == []
    with blockstore.open(tmp_path, read_only=True) as s:
        assert s.get(b"k") == b"x" * 10_000 and s.get(b"other") == b"o" * 10_000
    assert [f.kind for f in result.findings] == ["payload"], [f.line() for f in result.findings]
