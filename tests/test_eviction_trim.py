"""Records never read leave the oldest block one by one (blockstore/connector/l2_evict_walk.py `_trim`, issue 16):
a pass whose need the oldest block's records never read cover deletes just enough of them, oldest first, each with
a tombstone, and leaves the block and the rest of its records where they are. Emptying the block whole deleted
all of them and left the room beyond the need empty until the stores filled it (the adapter held 0.97-0.99 of its
capacity where LRU holds all of it).

- a full adapter whose oldest block holds one record read and the rest never read, one more stored: no block is
  emptied and nothing moved, the payload held stays within a record and the lead of capacity_bytes, the keys
  that went are the oldest of those never read, the record read stays, and exactly the keys the directory holds
  are found;
- a block of records never read is still emptied whole (the store-only stream);
- ten times the capacity, one record of each task read: payload within capacity_bytes and within a task and the
  lead of it, block files within their bound after every task (the trimmed block's dead bytes are the one block
  eviction is emptying), blocks still emptied whole, and fsck finds nothing unreferenced.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from compaction_helpers import block_file_bytes  # noqa: E402
from eviction_sizes import BLOCK, CAPACITY, SMALL, SMALL_SIZE, adapter_block_size  # noqa: E402, F401
from test_connector_adapter import Arena, lookup, okey, store  # noqa: E402

from blockstore.connector.l2_adapter import BlockstoreL2Adapter  # noqa: E402
from blockstore.connector.l2_config import RECORD_FRAMING  # noqa: E402
from blockstore.connector.l2_listing import records_held  # noqa: E402
from blockstore.tools import fsck  # noqa: E402


def test_a_pass_deletes_only_the_records_never_read_it_needs(make: Callable[..., BlockstoreL2Adapter],
                                                            arena: Arena) -> None:
    a = make(capacity_bytes=CAPACITY)
    src = arena.new(SMALL, fill=2)
    first = [okey(i) for i in range(CAPACITY // SMALL_SIZE)]
    for s in range(0, len(first), 4):
        store(a, first[s : s + 4], [src] * len(first[s : s + 4]))
        a.wait_for_eviction()
    assert a.get_usage().total_bytes_used == CAPACITY  # full, nothing evicted yet
    assert lookup(a, first[:1]) == [True]  # the oldest block: one record read, the others never
    a.submit_unlock(first[:1])
    store(a, [okey(10_000)], [src])  # over capacity: a pass must make room
    a.wait_for_eviction()
    c = a.report_status()["counters"]
    held = a.get_usage().total_bytes_used
    assert c["evicted_for_capacity"] >= 1
    assert c["blocks_evicted"] == 0 and c["kept_by_value"] == 0, c  # the oldest block stays, nothing is moved
    assert CAPACITY - SMALL_SIZE - a._eviction.lead() <= held <= CAPACITY, held
    found = lookup(a, first)
    a.submit_unlock([k for k, f in zip(first, found) if f])
    gone = [i for i, f in enumerate(found) if not f]
    assert found[0]  # the record read stays
    assert gone == list(range(1, len(gone) + 1)), gone  # the oldest of those never read went first
    assert len(gone) == c["evicted_for_capacity"]
    on_disk = dict(records_held(a.store))
    assert [k in on_disk for k in first] == found  # a key is found exactly when the directory holds it
    assert sum(on_disk.values()) == held


def test_a_block_of_records_never_read_is_emptied_whole(make: Callable[..., BlockstoreL2Adapter],
                                                       arena: Arena) -> None:
    """Nothing read: a tombstone per record would cost a store-only stream most of its throughput, and keeping
    some of them longer gains nothing that the ones written after them would not."""
    a = make(capacity_bytes=CAPACITY)
    src = arena.new(SMALL, fill=3)
    for s in range(0, CAPACITY // SMALL_SIZE + 1, 4):
        store(a, [okey(s + i) for i in range(4)], [src] * 4)
        a.wait_for_eviction()
    assert a.report_status()["counters"]["blocks_evicted"] >= 1


def test_trimming_keeps_the_capacity_promise(make: Callable[..., BlockstoreL2Adapter], arena: Arena) -> None:
    """Ten times the capacity stored in tasks of 4, one record of each task read after it: after every task the
    payload is within capacity_bytes and no further below it than a task and the lead (the room a pass frees
    beyond its need is not left empty), and the block files within their bound (a trimmed block's dead bytes
    are the one block eviction is emptying); blocks are still emptied whole, and fsck finds nothing."""
    a = make(capacity_bytes=CAPACITY)
    src = arena.new(SMALL, fill=4)
    n_keys = 10 * CAPACITY // SMALL_SIZE
    for t in range(0, n_keys, 4):
        keys = [okey(t + i) for i in range(4)]
        store(a, keys, [src] * 4)
        assert lookup(a, keys[:1]) == [True]
        a.submit_unlock(keys[:1])
        a.wait_for_eviction()
        used = a.get_usage().total_bytes_used
        assert used <= CAPACITY
        if t >= 2 * CAPACITY // SMALL_SIZE:
            assert used >= CAPACITY - 4 * SMALL_SIZE - a._eviction.lead(), (t, used)
        st = a.store.stats()
        bound = CAPACITY + st.records * RECORD_FRAMING + (st.open_blocks + 1) * BLOCK
        assert block_file_bytes(a.config.path) <= bound, (t, st.as_dict(), a.report_status()["counters"])
    c = a.report_status()["counters"]
    assert c["evicted_for_capacity"] >= n_keys // 2
    assert c["blocks_evicted"] > 0, c  # blocks whose records all went (or moved) are still removed whole
    recent = [okey(i) for i in range(n_keys - 8, n_keys)]
    assert all(lookup(a, recent))  # the newest stay
    a.submit_unlock(recent)
    a.close()
    findings = [f.line() for f in fsck.check(a.config.path, log=False).findings]
    assert not findings, findings
