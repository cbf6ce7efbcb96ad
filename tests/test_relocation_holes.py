"""Relocation that pays for its holes (issue 16, H71): `relocation_hole_cost` charges each byte a move takes
out of a block that stays with the copy GC will make to reclaim it (relocation.hole_cost), in the move's
value and against the relocation budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from compaction_helpers import AGGRESSIVE

import blockstore
from blockstore.compaction import attach
from blockstore.compaction.policy import resolve
from blockstore.compaction.relocation import hole_cost, layout
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, BlockEntry, Location

KIB = 1024


def _loc(block_id: int, offset: int, size: int) -> Location:
    return Location(kind=1, flags=0, payload_off=0, block_id=block_id, offset=offset, record_len=size,
                    payload_len=size, seq=offset, payload_xxh3=0, meta=b"")


def _entry(block_id: int, written: int, live: int, state: int = BLOCK_SEALED) -> BlockEntry:
    return BlockEntry(block_id, state, b"p", written_bytes=written, live_bytes=live)


@pytest.mark.parametrize(("knobs", "cost"), [
    # 10 of a block's 90 live bytes (100 written) leave it at u' 0.8; GC at 0.5 collects it at u 0.5: 1 + 1
    ({"relocation_hole_cost": 1.0, "gc_invalid_ratio": 0.5}, 10 * 2.0),
    # at 0.2 GC waits for u 0.8: each hole byte costs 4 copied
    ({"relocation_hole_cost": 1.0, "gc_invalid_ratio": 0.2}, 10 * 5.0),
    ({"relocation_hole_cost": 2.0, "gc_invalid_ratio": 0.2}, 10 * 9.0),
    ({"relocation_hole_cost": 0.0, "gc_invalid_ratio": 0.2}, 10.0),  # off: the bytes alone
    ({"relocation_hole_cost": 1.0, "gc": False}, 10.0),  # no GC: nothing will copy the hole's neighbours
])
def test_a_hole_costs_the_copy_gc_will_make_to_reclaim_it(knobs: dict[str, object], cost: float) -> None:
    where = layout([(b"k", _loc(7, 4096, 10))], 1 << 20)
    assert hole_cost(where, {7: _entry(7, 100, 90)}, resolve({"policy": "full", **knobs})) == pytest.approx(cost)


def test_a_block_gc_collects_anyway_costs_nothing_and_one_left_nearly_dead_little() -> None:
    pol = resolve({"policy": "full", "relocation_hole_cost": 1.0, "gc_invalid_ratio": 0.5})
    table = {1: _entry(1, 100, 40), 2: _entry(2, 100, 60), 3: _entry(3, 100, 40, BLOCK_OPEN)}
    # block 1 is past the threshold (sealed, dead 0.6): GC copies the record anyway, the move replaces that copy
    assert hole_cost(layout([(b"a", _loc(1, 4096, 20))], 1 << 20), table, pol) == 0.0
    # block 2 left at u' 0.4 (< 1 - 0.5): collected then, each dead byte costs 0.4 / 0.6 copied
    assert hole_cost(layout([(b"b", _loc(2, 4096, 20))], 1 << 20), table, pol) == pytest.approx(20 * (1 + 0.4 / 0.6))
    # an open block is not a victim whatever its dead share: its hole is charged
    assert hole_cost(layout([(b"c", _loc(3, 4096, 20))], 1 << 20), table, pol) == pytest.approx(20 * (1 + 0.2 / 0.8))
    # a block the table does not know (gone meanwhile): the bytes alone
    assert hole_cost(layout([(b"d", _loc(9, 4096, 20))], 1 << 20), table, pol) == 20.0


@pytest.mark.parametrize(("weight", "budget", "moved"), [(0.0, 30, True), (1.0, 30, False), (1.0, 50, True)])
def test_the_budget_pays_for_the_holes(tmp_path: Path, weight: float, budget: int, moved: bool) -> None:
    """A 20 KiB record behind 200 KiB that stay: the move writes 20 KiB, and GC at 0.5 will copy as much
    again to reclaim its hole. A budget of 30 KiB covers the bytes, not the holes; 50 KiB covers both."""
    keys = [b"g0", b"g1"]
    with blockstore.open(tmp_path, block_size=1 << 20) as s:
        for i, k in enumerate(keys):
            s.put(b"filler-%d" % i, b"f" * (200 * KIB), partition=f"part-{i}")
            s.put(k, bytes([i]) * (20 * KIB), partition=f"part-{i}")
        put = s.io_counters()[0]
        size = s.locate_many(keys)[0].record_len  # type: ignore[union-attr]  # 20 KiB and its layout
        knobs = {**AGGRESSIVE, "gc_invalid_ratio": 0.5, "relocation_read_budget": 0.0,
                 "relocation_budget": budget * KIB / put, "relocation_hole_cost": weight}
        c = attach(s, knobs, background=False)
        s.get_many(keys)
        rep = c.run_pass()
        assert (rep.relocated_groups, rep.skipped_budget) == ((1, 0) if moved else (0, 1))
        assert len({loc.block_id for loc in s.locate_many(keys) if loc}) == (1 if moved else 2)
        # the holes' share stays charged to the budget: one record's hole at u 0.5 costs its size again
        assert c.hole_debt == pytest.approx(size if weight and moved else 0.0)
        c.stop()
