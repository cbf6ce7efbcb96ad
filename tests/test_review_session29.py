"""Outside examination of session 29 (H64): maintenance cut short part-way (fsck --repair, compaction),
concurrency and configuration that earlier reviews did not try. Each test is a finding that failed on the
HEAD it was found on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from blockstore.tools import cli
from blockstore.tools.repair import repair

sys.path.insert(0, str(Path(__file__).parent))
from test_review_session26 import assert_all_read, make_store  # noqa: E402  (a closed sync store of sealed blocks)


class Cut(Exception):
    """Stands for a crash (kill -9) at the point where it is raised: every step before it was synced."""


def cut_at(monkeypatch: pytest.MonkeyPatch, name: str, n: int) -> None:
    """Make the nth call of os.<name> raise Cut instead of doing anything."""
    orig = getattr(os, name)
    calls = [0]

    def cutting(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == n:
            raise Cut(f"os.{name} #{n}")
        return orig(*args, **kwargs)

    monkeypatch.setattr(os, name, cutting)


# ------------------------------------------------------------------ repair cut short


def test_a_repair_cut_in_the_middle_of_a_swap_loses_no_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two block files with swapped names: repair moves each to ID.blk.fsck-renaming, then to its name. Cut
    after the first move, the next repair found the name still taken by the other (misnamed) file and put
    the moved file in lost+found as a duplicate: block 1's 8 keys read as misses (missing-block)."""
    store = tmp_path / "s"
    acked = make_store(store)
    one, two = store / "blocks" / f"{1:016x}.blk", store / "blocks" / f"{2:016x}.blk"
    os.rename(one, tmp_path / "t")
    os.rename(two, one)
    os.rename(tmp_path / "t", two)
    cut_at(monkeypatch, "rename", 2)
    with pytest.raises(Cut):
        repair(store)
    monkeypatch.undo()
    assert (store / "blocks" / f"{1:016x}.blk.fsck-renaming").exists()
    assert cli.main(["fsck", "--repair", str(store)]) == 1
    assert cli.main(["fsck", str(store)]) == 0
    assert_all_read(store, acked)
    assert not (store / "lost+found").exists()
