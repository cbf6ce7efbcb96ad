"""Eviction by value's span and its admission by return (blockstore/connector/eviction.py, issue 16):

- `ClockHistory` turns a block's creation time into the eviction clock then, within a bounded number of
  samples, however long the store runs;
- a key eviction deleted that is stored again soon starts with a read of credit; one that comes back only
  after RETURN_SPANS spans is not stored that time, and is stored the next time it is offered;
- `HashMarks` is bounded and tells a mark of 0 from an absent key."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from test_connector_adapter import Arena, lookup, okey, store  # noqa: E402

from blockstore.connector.eviction import RETURN_SPANS, ClockHistory, HashMarks  # noqa: E402
from blockstore.connector.l2_adapter import BlockstoreL2Adapter  # noqa: E402

BLOCK = 65536
SMALL = torch.Size([2, 2, 16, 32])  # float32: 8 KiB, ~7 records per 64 KiB block
SMALL_SIZE = 8192


@pytest.fixture
def adapter_block_size() -> int:
    """`make` (conftest.py) gives this module's adapters 64 KiB blocks."""
    return BLOCK


def test_clock_history_maps_times_to_clocks_within_its_bound() -> None:
    h = ClockHistory(step=10, limit=16)
    assert h.clock_at(5) is None  # older than every sample: unknown
    for t in range(1000):
        h.record(1000 + t, t * 7)
    assert len(h) <= 16 + 1
    # a lower bound of the clock at that time, never above it, and never before the first sample
    for t in (1000, 1001, 1500, 1999):
        got = h.clock_at(t)
        assert got is not None and got <= (t - 1000) * 7
    assert h.clock_at(999) is None
    assert h.clock_at(5000) == h.clock_at(1999)  # later than every sample: the newest
    # samples closer than `step` in clock are not taken
    g = ClockHistory(step=100)
    for c in range(0, 1000, 10):
        g.record(c, c)
    assert len(g) == 10


def test_hash_marks_is_bounded_and_tells_zero_from_absent() -> None:
    m = HashMarks(limit=3)
    m.add("a", 0)
    assert "a" in m and m.pop("a") == 0 and m.pop("a") is None
    for i, k in enumerate("bcde"):
        m.add(k, i)
    assert len(m) == 3 and "b" not in m and m.pop("e") == 3


def test_a_key_back_soon_is_stored_one_back_late_waits_for_its_next_offer(
        make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    capacity = 4 * BLOCK
    a = make(capacity_bytes=capacity)
    src = arena.new(SMALL, fill=5)
    early, late = okey(1_000_000), okey(2_000_000)
    store(a, [early, late], [src] * 2)
    n = 0

    def fill(records: int) -> None:
        nonlocal n
        for _ in range(0, records, 4):
            store(a, [okey(n + i) for i in range(4)], [src] * 4)
            n += 4

    fill(2 * capacity // SMALL_SIZE)  # both evicted unread
    assert lookup(a, [early, late]) == [False, False]
    base = a.report_status()["counters"]["skipped_admission"]
    store(a, [early], [src])  # back within a span or two of its eviction: stored
    assert lookup(a, [early]) == [True]
    a.submit_unlock([early])
    fill((RETURN_SPANS + 3) * capacity // SMALL_SIZE)  # ~the span is the capacity here: well past the limit
    res = store(a, [late], [src])
    assert res.is_successful() and res.bytes_transferred() == 0  # back too late: not stored this time
    assert lookup(a, [late]) == [False]
    assert a.report_status()["counters"]["skipped_admission"] == base + 1
    assert store(a, [late], [src]).bytes_transferred() == SMALL_SIZE  # offered again soon after: stored
    assert lookup(a, [late]) == [True]
    a.submit_unlock([late])
