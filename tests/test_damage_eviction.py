"""Eviction over a damaged store (Store.evict_blocks, seqfloor.py; review H85).

A sealed block whose footer no longer verifies (a flipped byte, a cut tail) leaves eviction's floor unknown:
every evict_blocks call refuses every block while it stays (safe: nothing is removed that a rebuild could bring
back). Before, that refusal was silent: a cache whose capacity path evicts by blocks (the L2 adapter falls back
to deletes with tombstones) never said why, and no log line named the block or fsck --repair. Eviction of
damaged blocks themselves, or beside a block whose file is gone, keeps what it promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blockstore
from blockstore.tools import cli


def _store(path: Path) -> tuple[dict[bytes, bytes], list[int]]:
    values = {b"k%d" % i: os.urandom(8000) for i in range(40)}
    with blockstore.open(path, block_size=64 << 10) as s:
        for k, v in values.items():
            s.put(k, v)
        return values, [e.block_id for e in s.block_table()]


def test_a_damaged_footer_refuses_eviction_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    values, bids = _store(tmp_path)
    with open(tmp_path / "blocks" / f"{bids[3]:016x}.blk", "r+b") as f:
        f.seek(-20, os.SEEK_END)
        f.write(b"\xff")
    with caplog.at_level("WARNING", logger="blockstore.blocks"), blockstore.open(tmp_path) as s:
        ev = s.evict_blocks([bids[0], bids[1]])
        assert ev.blocks == [] and sorted(ev.refused) == [bids[0], bids[1]]
        assert all(s.get(k) == v for k, v in values.items())
    why = [r.getMessage() for r in caplog.records if f"{bids[3]:016x}" in r.getMessage()]
    assert len(why) == 1 and "fsck --repair" in why[0] and "evict" in why[0], [r.getMessage() for r in caplog.records]
    assert cli.main(["fsck", str(tmp_path), "--repair"]) == 1
    with blockstore.open(tmp_path) as s:
        ev = s.evict_blocks([bids[0], bids[1]])
        assert ev.blocks == [bids[0], bids[1]]
        gone = {s.dir.get_locations([sfx])[0] is None for sfx, _loc in ev.records}
        assert gone == {True} and len(ev.records) == 8
        kept = [k for k in values if s.get(k) is not None]
        assert all(s.get(k) == values[k] for k in kept) and len(kept) == 32
    assert cli.main(["fsck", str(tmp_path)]) == 0


def test_evicting_a_truncated_or_missing_block_removes_its_keys_and_nothing_else(tmp_path: Path) -> None:
    values, bids = _store(tmp_path)
    os.truncate(tmp_path / "blocks" / f"{bids[0]:016x}.blk", 5000)
    os.unlink(tmp_path / "blocks" / f"{bids[1]:016x}.blk")
    with blockstore.open(tmp_path) as s:
        ev = s.evict_blocks([bids[0], bids[1]])
        assert sorted(ev.blocks) == [bids[0], bids[1]] and len(ev.records) == 8
        assert sum(s.get(k) is None for k in values) == 8
        assert all(s.get(k) in (None, v) for k, v in values.items())
    assert sorted(os.listdir(tmp_path / "blocks")) == [f"{b:016x}.blk" for b in bids[2:]]
    assert cli.main(["fsck", str(tmp_path)]) == 0
