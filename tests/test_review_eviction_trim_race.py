"""Review H86 of de94e42 (`EvictionWalk._trim`): a record stored after a pass listed the oldest block, and before
the pass claimed its keys, is not deleted on the strength of the old record's listing. `_trim` lists the block,
then claims the records never read under the lock and deletes them, with no look at where the directory places
them now; the block-emptying path checks exactly that (`_still_in`: "a store replaced them after the pass planned
and before it claimed them ... its decision was about the old record, not the acknowledged new one"). Now _trim
asks too."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from eviction_sizes import CAPACITY, SMALL, SMALL_SIZE, adapter_block_size  # noqa: E402, F401
from test_connector_adapter import Arena, lookup, okey, store  # noqa: E402

from blockstore.connector.l2_adapter import BlockstoreL2Adapter  # noqa: E402


def test_a_record_stored_again_after_the_listing_is_not_trimmed(make: Callable[..., BlockstoreL2Adapter],
                                                                 arena: Arena) -> None:
    a = make(capacity_bytes=CAPACITY)
    src, fresh = arena.new(SMALL, fill=2), arena.new(SMALL, fill=3)
    first = [okey(i) for i in range(CAPACITY // SMALL_SIZE)]
    for s in range(0, len(first), 4):
        store(a, first[s : s + 4], [src] * len(first[s : s + 4]))
        a.wait_for_eviction()
    assert lookup(a, first[:1]) == [True]  # the oldest block: one record read, the others never (as test_eviction_trim)
    a.submit_unlock(first[:1])
    walk = a._eviction._walk
    listing = walk._block_records
    replaced: list[int] = []

    def list_then_replace(block_id: int):  # type: ignore[no-untyped-def]
        out = listing(block_id)
        if not replaced:  # the oldest record never read is deleted and stored again (acknowledged) meanwhile
            replaced.append(block_id)
            a.delete(first[1:2])
            # room of its own (payload and block files): the store must not wait for the pass it runs inside
            a._state.capacity += 2 * SMALL_SIZE
            disk = a._eviction._disk_excess
            a._eviction._disk_excess = lambda *_args: -(1 << 40)  # type: ignore[method-assign]
            try:
                a._run_store(first[1:2], [fresh])  # in this thread: a store task could queue behind this pass
            finally:
                a._state.capacity -= 2 * SMALL_SIZE
                a._eviction._disk_excess = disk  # type: ignore[method-assign]
        return out

    walk._block_records = list_then_replace
    store(a, [okey(10_000)], [src])  # over capacity: a pass trims the oldest block
    a.wait_for_eviction()
    assert replaced and a.report_status()["counters"]["blocks_evicted"] == 0  # the trim ran, the block stayed
    found = lookup(a, first[1:2])
    a.submit_unlock([k for k, f in zip(first[1:2], found) if f])
    assert found == [True]  # the record stored after the listing stays: the pass decided about the old one
