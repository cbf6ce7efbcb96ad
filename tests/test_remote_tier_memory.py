"""RemoteTier's local-capacity policy with an in-memory object store (a unit-test aid; the same tier on a
real SeaweedFS cluster: tests/test_remote_tier.py): confirmed blocks read least recently are dropped first,
and a hot dropped block comes back only while there is room for it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import blockstore
from blockstore.errors import IOErrorBS
from blockstore.remote.objects import S3Settings
from blockstore.remote.tier import RemoteTier

BLOCK = 64 << 10


class MemoryObjects:
    """The ObjectStore interface over a dict."""

    def __init__(self) -> None:
        self.settings = S3Settings("memory://", "b", "", "")
        self.objects: dict[str, bytes] = {}
        self.whole_gets = 0

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def size(self, key: str) -> int | None:
        got = self.objects.get(key)
        return None if got is None else len(got)

    def get(self, key: str) -> bytes:
        self.whole_gets += 1
        return self.objects[key]

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        return [memoryview(self.objects[key][a:b]) for a, b in ranges]

    def list_after(self, prefix: str, after: str | None) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix) and (after is None or k > after))

    def list_children(self, prefix: str) -> list[str]:
        return sorted({k[len(prefix):].split("/", 1)[0] + "/" for k in self.objects if k.startswith(prefix)})

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def wait_until(what: str, ok: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_capacity_drops_the_least_recently_read_and_restores_a_hot_block_only_with_room(tmp_path: Path) -> None:
    objects = MemoryObjects()
    vals = {f"k{i:03d}".encode(): bytes([i]) * 20_000 for i in range(12)}  # 3 records a 64 KiB block
    with blockstore.open(tmp_path / "s", block_size=BLOCK) as s:
        s.put_many(list(vals.items()))
        s.seal_open_blocks()
        table = s.block_table()
        assert len(table) >= 4
        sizes = {e.block_id: e.data_end for e in table}
        hot = table[0].block_id  # the oldest block: dropped first by age alone
        hot_key = next(k for k, loc in zip(vals, s.locate_many(list(vals))) if loc and loc.block_id == hot)
        room = sum(sizes.values()) - sizes[hot] - 1  # not all fit: something must go, not the hot block
        tier = RemoteTier(s, objects, "node-m", poll_s=0.05, restore_after_reads=2)
        try:
            assert s.get(hot_key) == vals[hot_key]  # read: now the most recently read block
            tier.local_capacity_bytes = room
            wait_until("uploads and drops", lambda: not tier.status().pending_blocks and tier.status().local_bytes <= room)
            assert s.has_local_copy(hot), "the block read last was dropped before colder ones"
            st = tier.status()
            assert st.local_bytes <= room and st.over_capacity_bytes == 0, st
            cold = next(e.block_id for e in s.block_table() if not s.has_local_copy(e.block_id))
            cold_key = next(k for k, loc in zip(vals, s.locate_many(list(vals))) if loc and loc.block_id == cold)
            for _ in range(3):  # hot now, but bringing it back would need another drop: it stays remote
                assert s.get(cold_key) == vals[cold_key]
            time.sleep(0.3)
            assert not s.has_local_copy(cold) and objects.whole_gets == 0
            tier.local_capacity_bytes = None  # room again: the hot dropped block comes back
            assert s.get(cold_key) == vals[cold_key]
            wait_until("restore", lambda: s.has_local_copy(cold))
            assert objects.whole_gets == 1
            assert [s.get(k) for k in vals] == list(vals.values())
        finally:
            tier.close()
        # the capacity may have dropped only `cold`, which is back now: drop a confirmed block by hand
        gone = next(e.block_id for e in s.block_table() if e.remote_name)
        if s.has_local_copy(gone):
            s.drop_local_copy(gone)
        with pytest.raises(IOErrorBS, match="no remote tier"):
            s.get_many(list(vals))  # the tier detached: a dropped block says so, it is not damage
