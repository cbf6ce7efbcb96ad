"""Eviction ahead of need (blockstore/connector/l2_capacity.py, `make_room`): once the room left under capacity_bytes
is less than block_size / LEAD_BLOCK, a pass starts on the adapter's eviction thread and the store goes on; a store
waits for a pass only when its payload would not fit. The promise is unchanged: payload within capacity_bytes,
block files within the stated slack, nothing evicted comes back (fsck, a rebuild from the blocks)."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from compaction_helpers import block_file_bytes, rebuild_violations  # noqa: E402
from test_connector_adapter import Arena, lookup, okey, store  # noqa: E402

import blockstore  # noqa: E402
from blockstore.connector.l2_adapter import RECORD_FRAMING, BlockstoreL2Adapter, BlockstoreL2AdapterConfig  # noqa: E402
from blockstore.tools import fsck  # noqa: E402

BLOCK = 65536
SMALL = torch.Size([2, 2, 16, 32])  # float32: 8 KiB
SMALL_SIZE = 8192


def adapter(path: Path, capacity: int) -> BlockstoreL2Adapter:
    return BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict(
        {"path": str(path), "capacity_bytes": capacity, "block_size": BLOCK, "compaction": None}))


def test_stores_with_gaps_between_them_never_wait_for_a_pass(tmp_path: Path, arena: Arena) -> None:
    """A server's stores come with time between them: each pass started ahead ends before the next store, so no
    store that fits in the lead (here capacity / 64: one record) runs a pass itself, and still the payload stays
    within capacity_bytes and passes did evict."""
    capacity = 8 * BLOCK
    a = adapter(tmp_path / "kv", capacity)
    try:
        src = arena.new(SMALL, fill=1)
        for t in range(6 * capacity // SMALL_SIZE):
            store(a, [okey(t)], [src])
            a.wait_for_eviction()  # the gap between two requests
            assert a.get_usage().total_bytes_used <= capacity
        c = a.report_status()["counters"]
        assert c["eviction_passes"] > 0 and c["blocks_evicted"] > 0, {k: v for k, v in c.items() if "evict" in k}
        assert c["eviction_passes_waited"] == 0, c
        assert c["skipped_capacity"] == 0, c  # nothing refused for want of room: the passes kept ahead
    finally:
        a.close()


def store_together(a: BlockstoreL2Adapter, tasks: list[tuple[list[Any], list[Any]]]) -> None:
    """Submit every store task at once (the adapter runs them on its store workers side by side) and wait for all."""
    ids = {a.submit_store_task(keys, objs) for keys, objs in tasks}
    done: dict[int, Any] = {}
    deadline = time.monotonic() + 60
    while not ids <= done.keys():
        assert time.monotonic() < deadline, "store tasks never completed"
        select.select([a.get_store_event_fd()], [], [], 0.05)
        try:
            os.eventfd_read(a.get_store_event_fd())
        except BlockingIOError:
            pass
        done.update(a.pop_completed_store_tasks())
    assert all(done[i].is_successful() for i in ids)


def test_stores_side_by_side_keep_the_promise_with_passes_in_the_background(tmp_path: Path, arena: Arena) -> None:
    """Four store tasks at a time on the adapter's workers, re-reads between them, passes on the eviction thread:
    the payload never exceeds capacity_bytes, the block files stay within the slack, and after close fsck finds
    nothing and a directory rebuilt from the blocks agrees (no evicted key comes back)."""
    capacity = 8 * BLOCK
    path = tmp_path / "kv"
    a = adapter(path, capacity)
    src = arena.new(SMALL, fill=2)
    n = 0
    for _round in range(6 * capacity // SMALL_SIZE // 16):
        tasks = [([okey(n + 4 * w + i) for i in range(4)], [src] * 4) for w in range(4)]
        n += 16
        store_together(a, tasks)
        again = [okey(j) for j in range(max(0, n - 40), n, 3)]
        a.submit_unlock([k for k, f in zip(again, lookup(a, again)) if f])
        assert a.get_usage().total_bytes_used <= capacity
        st = a.store.stats()
        bound = capacity + st.records * RECORD_FRAMING + (st.open_blocks + 1) * BLOCK
        on_disk = block_file_bytes(str(path))
        assert on_disk <= bound, (on_disk, bound)
    c = a.report_status()["counters"]
    a.close()  # waits for a pass under way
    assert c["eviction_passes_waited"] > 0 and c["blocks_evicted"] > 0 and c["kept_by_value"] > 0, {
        k: v for k, v in c.items() if "evict" in k or "kept" in k}
    findings = [f.line() for f in fsck.check(str(path), log=False).findings]
    assert not findings, findings
    with blockstore.open(str(path), create=False) as s:
        assert rebuild_violations(s) == []


def test_close_waits_for_a_pass_under_way(tmp_path: Path, arena: Arena) -> None:
    """close() right after the store that started a pass: the pass finishes (or never starts) before the store
    closes, so nothing fails and the store reopens clean."""
    capacity = 4 * BLOCK
    a = adapter(tmp_path / "kv", capacity)
    src = arena.new(SMALL, fill=3)
    for t in range(0, 2 * capacity // SMALL_SIZE, 4):
        store(a, [okey(t + i) for i in range(4)], [src] * 4)
    a.close()
    assert a.report_status()["error"] == "closed"
    findings = [f.line() for f in fsck.check(str(tmp_path / "kv"), log=False).findings]
    assert not findings, findings


def test_when_more_is_worth_keeping_than_a_pass_may_move_the_least_valuable_go(tmp_path: Path,
                                                                                arena: Arena) -> None:
    """Every record of the oldest blocks was read just now, the even keys three times, the odd ones once: all are
    worth keeping, more than a pass may move (about one block). What goes are odd keys (read once), never an
    even one; before, the pass kept in block order until its budget ran out and dropped the rest, whatever their
    value."""
    capacity = 8 * BLOCK
    a = adapter(tmp_path / "kv", capacity)
    try:
        src = arena.new(SMALL, fill=4)
        n = capacity // SMALL_SIZE - 8  # just under the capacity and its lead: no pass yet
        for i in range(n):
            store(a, [okey(i)], [src])
        assert a.report_status()["counters"]["evicted_for_capacity"] == 0
        for times in range(3):
            keys = [okey(i) for i in range(n) if i % 2 == 0 or times == 0]
            assert lookup(a, keys) == [True] * len(keys)
            a.submit_unlock(keys)
        for j in range(BLOCK // SMALL_SIZE):  # one block of new keys: passes must make room
            store(a, [okey(100_000 + j)], [src])
            a.wait_for_eviction()
        old = [okey(i) for i in range(n)]
        found = lookup(a, old)
        a.submit_unlock([k for k, f in zip(old, found) if f])
        lost = [i for i, f in enumerate(found) if not f]
        c = a.report_status()["counters"]
        assert lost and c["kept_by_value"] > 0, c
        assert all(i % 2 == 1 for i in lost), lost
    finally:
        a.close()
