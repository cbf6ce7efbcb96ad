"""Review of session 26b (H54): the examiner's open/recovery/reserve changes since 33daad1, read as a storage
engineer would. Each test is a finding: fixed (the test passes) or xfail(strict=True) with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blockstore
from blockstore import blocklife

BLOCK = 64 << 10
VALUE = 5000


def crashed_cache_session(store: Path) -> dict[bytes, bytes]:
    """A cache-mode store whose second session stops without closing (kill -9) after sealing blocks of its
    own; returns what the closed first session acknowledged."""
    acked = {}
    with blockstore.open(store, durability="cache", block_size=BLOCK) as s:
        for i in range(8):
            acked[b"k%03d" % i] = bytes([i]) * VALUE
            s.put(b"k%03d" % i, bytes([i]) * VALUE)
    s = blockstore.open(store, durability="cache", block_size=BLOCK)
    for i in range(8, 24):
        s.put(b"k%03d" % i, bytes([i]) * VALUE)
    s.abandon()
    return acked


def lose_unsynced_pages(store: Path) -> None:
    """A power cut takes the tail of a block the crashed cache session sealed (never synced: allowed)."""
    victim = sorted((store / "blocks").iterdir())[-3]
    os.truncate(victim, victim.stat().st_size // 2)


def test_a_power_cut_cache_session_still_opens_after_a_sync_open_was_killed_in_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache session loses unsynced pages to a power cut; the next open, in sync mode, rewrites the MANIFEST's
    durability to "sync" before its recovery runs, and is killed during that recovery. Every later open then read
    the crashed cache session as a sync one (5e0ad1a: recovery holds a crashed session to the MANIFEST's
    durability) and refused the store (CorruptionError, fsck --repair needed) for damage a cache session is
    allowed to leave. The MANIFEST now says "sync" only once the sync session's recovery is done."""
    store = tmp_path / "s"
    acked = crashed_cache_session(store)
    lose_unsynced_pages(store)

    def killed(*_args: object, **_kw: object) -> None:
        raise KeyboardInterrupt("killed during recovery")
    monkeypatch.setattr(blocklife, "recover", killed)
    with pytest.raises(KeyboardInterrupt):
        blockstore.open(store, durability="sync")
    monkeypatch.undo()
    with blockstore.open(store, durability="cache") as s:  # was: CorruptionError
        report = s.recovery_report
        for key, value in acked.items():  # the closed session's records are intact
            assert bytes(s.get(key) or b"") == value, key
    assert report, "recovery ran"
