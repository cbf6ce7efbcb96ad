"""The spare room's window follows how soon evicted keys come back (blockstore/connector/eviction.py
`ReturnDistances`, l2_capacity `admit`, l2_evict_walk `_plan_block`, issue 16). A record not worth a keep of its
own may hold the room a pass frees beyond its need if it was read recently enough; how recently is learned from the ghost's
returns (keys evicted and stored again): one span plus the median distance, in spans, between an eviction and the
key's return. Where evicted keys come back soon (a sliding working set), a record read two spans ago is not
kept; where they come back late, it is; where none has come back yet, the window is RETURN_SPANS.

- `ReturnDistances.window()`: RETURN_SPANS until MIN_RETURNS returns were seen, then 1 + their median, never
  more than RETURN_SPANS; it remembers at most RETURN_SAMPLES returns;
- `spare_value` takes the window: a record read longer ago than it is no spare;
- a real adapter records a return when a key it evicted is stored again, at the distance it came back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from eviction_sizes import BLOCK, CAPACITY, SMALL, SMALL_SIZE, adapter_block_size  # noqa: E402, F401
from test_connector_adapter import Arena, okey, store  # noqa: E402

from blockstore.connector.eviction import (  # noqa: E402
    MIN_RETURNS,
    RETURN_SAMPLES,
    RETURN_SPANS,
    KeyStat,
    ReturnDistances,
    spare_value,
)
from blockstore.connector.l2_adapter import BlockstoreL2Adapter  # noqa: E402


def test_window_is_return_spans_until_enough_returns_then_one_span_past_their_median() -> None:
    r = ReturnDistances()
    for _ in range(MIN_RETURNS - 1):
        r.add(0.1)
    assert r.window() == RETURN_SPANS  # too few returns to go by
    r.add(0.1)
    assert r.window() == pytest.approx(1.1)
    for _ in range(MIN_RETURNS + 1):
        r.add(1.5)  # the median moves to the later returns
    assert r.window() == pytest.approx(2.5)
    for _ in range(RETURN_SAMPLES):
        r.add(10.0)  # capped: the window never passes RETURN_SPANS (admission by return's horizon)
    assert r.window() == RETURN_SPANS and len(r) == RETURN_SAMPLES  # bounded memory
    for _ in range(RETURN_SAMPLES):
        r.add(-1.0)  # a clock read before the eviction's (spans changed meanwhile) counts as at once
    assert r.window() == 1.0


def test_a_record_read_longer_ago_than_the_window_is_no_spare() -> None:
    span, now = 1000, 10_000
    two_spans_ago = KeyStat(reuse=0, last=now - 2 * span)
    half_span_ago = KeyStat(reuse=0, last=now - span // 2)
    assert spare_value(two_spans_ago, now, span) is not None  # the default window: RETURN_SPANS
    assert spare_value(two_spans_ago, now, span, window=1.2) is None  # keys come back soon or never
    assert spare_value(half_span_ago, now, span, window=1.2) is not None
    assert spare_value(two_spans_ago, now, span, window=2.5) is not None  # keys come back late


def test_a_key_evicted_and_stored_again_is_a_return_at_its_distance(
        make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    src = arena.new(SMALL, fill=3)
    a = make(capacity_bytes=CAPACITY)
    keys = [okey(i) for i in range(3 * CAPACITY // SMALL_SIZE)]  # never read: each goes at its first eviction
    for s in range(0, len(keys), 4):
        store(a, keys[s : s + 4], [src] * 4)
        a.wait_for_eviction()
    assert a.report_status()["counters"]["evicted_for_capacity"] > 0
    assert len(a._memory.returns) == 0  # nothing came back yet
    with a._state.lock:
        clock, span = a._memory.clock, a._memory.span
        evicted_at = a._memory.ghost.pop(keys[0])
        assert evicted_at is not None  # the first key was evicted (and remembered by the ghost)
        a._memory.ghost.add(keys[0], evicted_at)
    store(a, [keys[0]], [src])  # it comes back
    a.wait_for_eviction()
    assert len(a._memory.returns) == 1
    assert a._memory.returns._seen[0] == pytest.approx(min(RETURN_SPANS, (clock - evicted_at) / span))
    store(a, [okey(10**6)], [src])  # a key never evicted is no return
    assert len(a._memory.returns) == 1
