"""The room a pass leaves ahead of the stores follows what they ask for while passes run (blockstore/connector/
eviction.py `PassLead`, l2_capacity `make_room`, `_evict_ahead`, `lead`; issue 16). A fixed lead of a quarter
block (at most capacity / 64) kept that room empty on average, and bench/eviction.py's adapter held 0.96-0.98 of
its capacity where stores come one request at a time; the lead is now LEAD_FACTOR x the most the stores asked for
while one of the last LEAD_PASSES background passes ran, plus a record, never above the fixed one.

- `PassLead`: the fixed lead until LEAD_MIN_PASSES passes were seen; then 2 x the peak + a record, capped; a burst
  during a pass raises it at once, and it comes down once the burst leaves the last LEAD_PASSES;
- a real adapter fed one store at a time (each settled before the next) ends up keeping less room free than the
  fixed lead (fails before: the room left after every pass was above it), and never exceeds its capacity."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from eviction_sizes import BLOCK, SMALL, SMALL_SIZE, adapter_block_size  # noqa: E402, F401
from test_connector_adapter import Arena, okey, store  # noqa: E402

from blockstore.connector.eviction import LEAD_FACTOR, LEAD_MIN_PASSES, LEAD_PASSES, PassLead  # noqa: E402
from blockstore.connector.l2_adapter import EVICT_AHEAD, LEAD_BLOCK, BlockstoreL2Adapter  # noqa: E402


def test_lead_is_the_fixed_one_until_passes_were_seen_then_follows_their_peak() -> None:
    lead = PassLead(limit=100_000)
    record = 8_000
    for _ in range(LEAD_MIN_PASSES - 1):
        lead.passed(0)
        assert lead.lead(record) == 100_000  # too few passes to go by
    lead.passed(0)
    assert lead.lead(record) == record  # nothing asked during a pass: one record's room
    lead.passed(20_000)  # a store arrived while a pass ran
    assert lead.lead(record) == LEAD_FACTOR * 20_000 + record
    lead.passed(10**9)  # a burst: never above the fixed lead
    assert lead.lead(record) == 100_000
    for _ in range(LEAD_PASSES):
        lead.passed(-5)  # (a negative count is no request)
    assert lead.lead(record) == record  # the burst left the window
    assert len(lead) == LEAD_PASSES  # bounded memory


def test_an_adapter_fed_one_store_at_a_time_keeps_less_room_free_than_the_fixed_lead(
        make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    capacity = 32 * BLOCK
    fixed = min(BLOCK // LEAD_BLOCK, capacity // EVICT_AHEAD)
    assert fixed > SMALL_SIZE  # room for the lead to come down
    src = arena.new(SMALL, fill=5)
    a = make(capacity_bytes=capacity)
    rooms = []
    for i in range(3 * capacity // SMALL_SIZE):
        store(a, [okey(i)], [src])
        a.wait_for_eviction()
        used = a.get_usage().total_bytes_used
        assert used <= capacity  # the capacity promise
        rooms.append(capacity - used)
    assert a.report_status()["counters"]["eviction_passes"] >= LEAD_MIN_PASSES
    settled = rooms[len(rooms) // 2 :]  # once the lead follows the passes
    # a room within the lead starts a pass, so with the fixed lead every settled room was above it
    assert min(settled) <= fixed
    assert a._eviction.lead() < fixed
