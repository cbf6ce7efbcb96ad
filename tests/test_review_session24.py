"""Review of session 24's changes (eviction's spare room, blend on the GPU, placement choice, relocation by a
shadow): each test is a bug found in review. A test whose fix belongs to an engineer still at work is marked
xfail(strict=True) until the fix is in, so it fails the suite the moment the fix lands without the mark going.

Eviction: a pass decides (`_plan_block`) and later claims what it trims (`_keep_within`, `_keep_spares`); keys it
trims are not claimed while it decides, so a store may replace one in between. The race is placed exactly in that
window by wrapping `_keep_within` (tests/test_review_session23.py's way)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from test_connector_adapter import Arena, load, lookup, same  # noqa: E402
from test_review_session23 import (  # noqa: E402
    BLOCK,
    CAPACITY,
    OTHER,
    SMALL,
    fill_with_records_worth_keeping,
    race_between_decision_and_writes,
    store_new_block_of_keys,
)

from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig  # noqa: E402


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[BlockstoreL2Adapter]:
    a = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict(
        {"path": str(tmp_path / "kv"), "capacity_bytes": CAPACITY, "block_size": BLOCK, "compaction": None}))
    yield a
    a.close()


def trimmed(wanted: list[Any], budget: int) -> list[Any]:
    """The records `_keep_within` will not keep: beyond the budget, most valuable kept first."""
    moved, out = 0, []
    for w in sorted(wanted, key=lambda w: -w.value):
        if moved + w.loc.record_len <= budget:
            moved += w.loc.record_len
        else:
            out.append(w)
    return out


@pytest.mark.xfail(strict=True, reason="H34: a held block's trimmed keys are deleted wherever they are now")
def test_a_store_that_replaces_a_trimmed_key_of_a_held_block_is_not_deleted(adapter: BlockstoreL2Adapter,
                                                                           arena: Arena) -> None:
    """Between a pass's decision and its trim, a store replaces a key the trim will evict (acknowledged: a new
    record in a new block), and a lookup locks another trimmed key of the same block, so that block stays and
    its trimmed keys get tombstones. Before: the tombstone deleted the key wherever it was, i.e. the new record
    of the acknowledged store, for a decision taken about its old record; a whole-block eviction leaves it."""
    a = adapter
    src = arena.new(SMALL, fill=3)
    fill_with_records_worth_keeping(a, src)
    newer = arena.new(OTHER, fill=4)
    victim: list[Any] = []
    locked: list[Any] = []

    def replace_one_and_lock_another(wanted: list[Any], budget: int) -> None:
        by_block: dict[int, list[Any]] = {}
        for w in trimmed(wanted, budget):
            by_block.setdefault(w.block, []).append(w)
        pair = next((ws for ws in by_block.values() if len(ws) >= 2), None)
        assert pair is not None, "no block with two trimmed records"
        assert lookup(a, [pair[0].key]) == [True]  # held by a lookup: its block stays
        locked.append(pair[0].key)
        a._disk_checked_at = a._clock  # this store of no new bytes does not wait for the pass under way
        assert a._run_store([pair[1].key], [newer]).is_successful()
        victim.append(pair[1].key)

    acted = race_between_decision_and_writes(a, replace_one_and_lock_another)
    store_new_block_of_keys(a, src)
    assert acted, "no pass had more worth keeping than it may move"
    a.submit_unlock(locked)
    out = arena.new(OTHER)
    assert lookup(a, victim) == [True], "the acknowledged store was deleted by a decision about its old record"
    assert load(a, victim, [out]) == [True]
    a.submit_unlock(victim)
    assert same(out, newer)
