"""A session's chunk records and KV records can share blocks (Store.session_partition), and one request
that reads both kinds is one affinity request (Store.request) (issue 16)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

import blockstore
from blockstore.directory import Location
from blockstore.errors import InvalidArgument


def test_kv_records_put_with_a_session_partition_share_its_blocks(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, max_open_blocks=4) as s:
        part = blockstore.Store.session_partition("alice", "s1")
        assert s.session_partition("alice", "s1") == part
        s.put_chunk("alice", "s1", "c0", "what alice said")
        s.put_many([(b"other%d" % i, b"o" * 100) for i in range(3)], partition="someone-else")
        s.put_many([(b"kv0", b"k" * 5000), (b"kv1", b"k" * 5000)], partition=part)
        chunk_block = {e.block_id for e in s.block_table() if e.partition.endswith(part)}
        kv_blocks = {loc.block_id for loc in s.locate_many([b"kv0", b"kv1"]) if loc is not None}
        assert len(chunk_block) == 1 and kv_blocks == chunk_block
        assert s.locate_many([b"other0"])[0].block_id not in chunk_block  # type: ignore[union-attr]
        with pytest.raises(InvalidArgument):
            s.session_partition("alice", "")


def test_reads_inside_request_are_one_observation(tmp_path: Path) -> None:
    seen: list[tuple[list[bytes], list[Location | None]]] = []

    def observe(suffixes: Sequence[bytes], locs: Sequence[Location | None]) -> None:
        seen.append((list(suffixes), list(locs)))

    with blockstore.open(tmp_path) as s:
        s.put_chunks([blockstore.ChunkWrite("u", "s", f"c{i}", f"text {i}") for i in range(3)])
        s.put_many([(b"kv%d" % i, b"v" * 100) for i in range(3)], partition=s.session_partition("u", "s"))
        s.add_read_observer(observe)
        s.get_chunks([("u", "s", "c0"), ("u", "s", "c1")])
        s.get_many([b"kv0", b"kv1"])
        assert [len(sfx) for sfx, _ in seen] == [2, 2]  # without a request: two unrelated reads
        seen.clear()
        with s.request():
            s.get_chunks([("u", "s", "c0"), ("u", "s", "c1")])
            with s.request():  # nested: joins the outer request
                s.get_many([b"kv0", b"kv1", b"missing"])
            assert seen == []  # delivered when the request ends
        assert len(seen) == 1
        suffixes, locs = seen[0]
        assert len(suffixes) == 5 and sum(loc is not None for loc in locs) == 4
        with pytest.raises(RuntimeError), s.request():
            s.get_many([b"kv2", b"kv0"])
            raise RuntimeError("the caller's request failed part-way")
        assert len(seen) == 2 and len(seen[1][0]) == 2  # what it read is still observed


def test_a_mixed_request_is_one_affinity_group(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, compaction={"policy": "full", "background": False}) as s:
        s.put_chunks([blockstore.ChunkWrite("u", "s", f"c{i}", f"text {i}") for i in range(2)])
        s.put_many([(b"kv%d" % i, b"v" * 100) for i in range(2)])
        tracker = s.compactor.tracker
        with s.request():
            s.get_chunks([("u", "s", "c0"), ("u", "s", "c1")])
            s.get_many([b"kv0", b"kv1"])
        assert tracker.requests == 1
        assert len(tracker) == 1 and max(len(g.keys) for g in tracker.due(1)) == 4
