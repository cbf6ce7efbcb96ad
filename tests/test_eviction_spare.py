"""The room a pass frees beyond its need (blockstore/connector/eviction.py `spare_value`, l2_evict_walk
`_keep_spares`, issue 16): space comes back a whole block at a time, so a pass usually frees more than the stores
need; that room holds records that have been read (most recently read first) rather than staying empty until
the stores fill it, and never a record nothing has read (a one-off or a scan: the store-only stream of
bench/eviction.py's throughput run moves nothing more than before).

- `spare_value`: None for a record never read or read longer ago than RETURN_SPANS spans, else higher the more
  recently it was read;
- a real adapter whose oldest block holds records read once (their read already spent by one keep) holds
  more payload after a pass than the same adapter whose records were never read, frees at least what the
  store needed, stays within capacity_bytes, and the keys it evicted are not found."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from eviction_sizes import BLOCK, CAPACITY, SMALL, SMALL_SIZE, adapter_block_size  # noqa: E402, F401
from test_connector_adapter import Arena, lookup, okey, store  # noqa: E402

from blockstore.connector.eviction import RETURN_SPANS, KeyStat, spare_value  # noqa: E402
from blockstore.connector.l2_adapter import BlockstoreL2Adapter  # noqa: E402
from blockstore.connector.l2_listing import records_held  # noqa: E402


def test_spare_value_ranks_read_records_by_recency_and_never_spares_unread() -> None:
    span = 1000
    assert spare_value(None, 5000, span) is None  # never read: nothing says it comes back
    assert spare_value(KeyStat(reuse=0, last=0), 5000, span) is None
    too_old = KeyStat(reuse=0, last=5000 - RETURN_SPANS * span - 1)
    assert spare_value(too_old, 5000, span) is None
    recent, older = KeyStat(reuse=0, last=4900), KeyStat(reuse=0, last=4000)
    r, o = spare_value(recent, 5000, span), spare_value(older, 5000, span)
    assert r is not None and o is not None and 0 < o < r <= 1


def _fill_then_push(a: BlockstoreL2Adapter, src: Any, read: bool) -> tuple[int, int, list[Any]]:
    """Fill the adapter to capacity, read what it holds (if `read`: each read then spent, as one keep by value
    spends it, so the records are worth no keep of their own), then store one new record so that a pass must
    empty the oldest block. Returns (payload held before the push, after it, the keys first stored)."""
    first = [okey(i) for i in range(CAPACITY // SMALL_SIZE)]
    for s in range(0, len(first), 4):
        store(a, first[s : s + 4], [src] * len(first[s : s + 4]))
        a.wait_for_eviction()
    if read:
        held = [k for k, found in zip(first, lookup(a, first)) if found]
        a.submit_unlock(held)
        with a._state.lock:  # the state one keep by value leaves: read recently, its read spent
            for k in held:
                a._memory.stats.spend(k)
    before = a.get_usage().total_bytes_used
    store(a, [okey(10_000)], [src])  # over capacity: a pass empties the oldest block
    a.wait_for_eviction()
    return before, a.get_usage().total_bytes_used, first


def test_room_a_pass_frees_beyond_its_need_holds_records_that_were_read(
        make: Callable[..., BlockstoreL2Adapter], arena: Arena, tmp_path: Path) -> None:
    src = arena.new(SMALL, fill=3)
    unread = make(capacity_bytes=CAPACITY, path=str(tmp_path / "unread"))
    _b0, held_unread, _ = _fill_then_push(unread, src, read=False)
    assert unread.report_status()["counters"]["kept_by_value"] == 0  # nothing read: nothing moved
    blocks_unread = unread.report_status()["counters"]["blocks_evicted"]
    unread.close()

    a = make(capacity_bytes=CAPACITY)
    _b1, held_read, first = _fill_then_push(a, src, read=True)
    c = a.report_status()["counters"]
    assert c["blocks_evicted"] >= 1 and blocks_unread >= 1  # both emptied the oldest block
    assert c["kept_by_value"] > 0  # read records held the room the pass freed beyond the need
    assert held_read <= CAPACITY and held_unread <= CAPACITY
    # the room the unread adapter's pass left empty (a block's records less the one stored) is held here
    assert held_unread <= CAPACITY - 2 * SMALL_SIZE, held_unread
    assert held_read >= CAPACITY - SMALL_SIZE - a._eviction.lead(), held_read
    # a key is found exactly when the directory holds it (nothing evicted comes back), and the records held add
    # up to the adapter's own count
    found = lookup(a, first)
    a.submit_unlock([k for k, f in zip(first, found) if f])
    held = dict(records_held(a.store))
    assert [k in held for k in first] == found
    assert sum(held.values()) == held_read
    assert not all(found)  # the pass did evict some of the first records
