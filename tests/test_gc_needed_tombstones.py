"""GC leaves a block whose only dead records are tombstones still needed (review H81).

Collecting it copies its live records and carries every tombstone into a new block of the same partition:
the copy is as dead as the block it replaces, so it is a victim again, pass after pass. Seen on a store of
three tenants: every `blockstore compact --policy aggressive` collected the same two blocks again (4
records, 2,720 bytes, 10 tombstones), and a background compactor on an idle store rewrote them every pass
(bytes appended growing with no write). A block of tombstones alone was already left (`only_needed_tombstones`);
live records beside them change nothing: GC frees no byte there until a tombstone can go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import blockstore
from blockstore.tools.cli import EXIT_OK, main


def _compact(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, object]:
    capsys.readouterr()
    assert main(["compact", str(path), "--policy", "aggressive", "--json", "--quiet"]) == EXIT_OK
    rep: dict[str, object] = json.loads(capsys.readouterr().out)
    return rep


def test_a_block_of_live_records_and_needed_tombstones_is_not_collected_again_and_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, block_size=256 << 10) as s:
        # the old records the tombstones cover, in a block that stays mostly live (never a victim)
        s.put_many([(b"x%d" % i, b"o" * 100) for i in range(8)] + [(b"big%d" % i, b"b" * 50_000) for i in range(4)],
                   partition="old")
        s.put_many([(b"keep%d" % i, b"k" * 300) for i in range(2)])  # where the deletes write: the namespace's stream
        s.delete_many([b"x%d" % i for i in range(8)])
    before = {e.block_id: e for e in blockstore.open(path, read_only=True).block_table()}
    stones = [e for e in before.values() if e.tombstones]
    assert stones and all(e.total_records == e.live_records + e.tombstones for e in stones)
    for _ in range(3):
        rep = _compact(capsys, path)
        assert rep["gc_blocks"] == 0 and rep["tombstones_carried"] == 0, rep
    with blockstore.open(path, read_only=True) as s:
        assert {e.block_id for e in s.block_table()} == set(before)
        assert s.get_many([b"x0", b"keep0", b"big0"]) == [None, b"k" * 300, b"b" * 50_000]


def test_a_live_record_older_than_every_other_block_does_not_make_its_tombstones_collectable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The block's lowest sequence number is its live record's (the store's oldest, as a record GC copied
    into the namespace's stream keeps its own): the floor test on the block as a whole cannot tell that
    every tombstone is needed, so the tombstones themselves are looked at."""
    path = tmp_path / "s"
    with blockstore.open(path, block_size=256 << 10) as s:
        s.put(b"oldest", b"k" * 300)  # sequence number 1, in the namespace's stream
        s.put_many([(b"x%d" % i, b"o" * 100) for i in range(8)] + [(b"big%d" % i, b"b" * 50_000) for i in range(4)],
                   partition="old")
        s.delete_many([b"x%d" % i for i in range(8)])
    for _ in range(3):
        rep = _compact(capsys, path)
        assert rep["gc_blocks"] == 0 and rep["tombstones_carried"] == 0, rep
    with blockstore.open(path, read_only=True) as s:
        assert s.get_many([b"x0", b"oldest", b"big0"]) == [None, b"k" * 300, b"b" * 50_000]
