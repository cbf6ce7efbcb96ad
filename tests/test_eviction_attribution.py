"""bench/eviction.py's miss attribution (issue 16, the rows where the adapter is below LRU): LRU replayed beside the
adapter, and every key LRU hits and the adapter misses counted by what the adapter knew when it dropped it. The
bookkeeping is checked on hand-made events, then once against a real adapter: lost - won must equal LRU's hits
less the adapter's."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("lmcache")
pytest.importorskip("torch")

from bench.eviction import RECORD, Driver, MissAttribution, adapter_hit_rate, sim_lru, trace_sliding  # noqa: E402


def test_misses_lru_would_hit_are_counted_by_what_the_adapter_knew() -> None:
    m = MissAttribution(cap=3)
    key = Driver.key
    m.request([1, 2], [False, False])
    m.on_l2_keys_stored([key(1), key(2)], [RECORD, RECORD])
    m.request([7], [False])
    m.request([2], [True])  # 2 read
    m.on_l2_keys_deleted([key(1), key(2)])  # 1 unread, 2 read; LRU holds both
    m.request([1, 2, 3], [False, False, False])
    assert m.lost == {"evicted_unread": 1, "evicted_read": 1, "not_stored": 0}
    assert m.lost_lru_held == 2
    assert m.ages == [2, 1]  # 1 stored after request 0, 2 read by request 2; both dropped after request 2
    m.request([3], [False])  # LRU holds 3, the adapter never stored it (admission, capacity)
    assert m.lost["not_stored"] == 1
    m.request([9], [True])  # the adapter holds what LRU does not
    assert m.won == 1
    assert m.summary()["lost_total"] == 3


def test_what_each_holds_at_a_lookup() -> None:
    m = MissAttribution(cap=2)
    key = Driver.key
    m.request([1, 2], [False, False])  # LRU was not full before this lookup: nothing sampled
    m.on_l2_keys_stored([key(1), key(2)], [RECORD, RECORD])
    m.request([1], [True])  # both hold {1, 2}
    m.on_l2_keys_deleted([key(2)])  # the adapter drops 2 (LRU holds it), stores 5 (LRU never saw it)
    m.on_l2_keys_stored([key(5)], [RECORD])
    m.request([3], [False])  # adapter {1, 5}, LRU {1, 2}
    m.request([4], [False])  # adapter {1, 5}, LRU {1, 3}: 3 went in, 2 (least recently used) out
    assert m.held_not_lru == [0, 1, 1]
    assert m.lru_not_held == [0, 1, 1]
    s = m.summary()
    assert s["held_not_lru_mean"] == s["lru_not_held_mean"] == 2 / 3


def test_lost_less_won_is_lru_hits_less_the_adapters(tmp_path) -> None:
    trace = trace_sliding(random.Random(3), 150)
    distinct = len({k for r in trace for k in r})
    cap = max(16, distinct // 10)
    got = adapter_hit_rate(str(tmp_path), trace, cap, "always", attribute=True)
    total = sum(len(r) for r in trace)
    vs = got["against_lru"]
    assert vs["lost_total"] > 0
    assert vs["lost_total"] - vs["won"] == round(sim_lru(trace, cap) * total) - round(got["hit_rate"] * total)
