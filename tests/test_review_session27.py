"""Session 27's review: configuration surfaces fed wrong types and out-of-range values, the CLI under
misuse, and close racing background work. Each test failed on the code before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import blockstore


@pytest.mark.parametrize("value", [float("inf"), 10**400])
def test_open_refuses_an_unbounded_idle_seal_seconds(tmp_path: Path, value: float) -> None:
    # Before: open accepted inf, and then every put raised OverflowError (outside BlockstoreError) from the
    # placement's idle cutoff: a store that could not take a single write.
    with pytest.raises(blockstore.InvalidArgument, match="idle_seal_seconds"):
        blockstore.open(tmp_path / "s", idle_seal_seconds=value)
    assert not (tmp_path / "s").exists()


def test_a_large_finite_idle_seal_seconds_still_writes(tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s", idle_seal_seconds=1e9) as s:
        s.put(b"k", b"v")
        assert s.get(b"k") == b"v"
