"""Clusters (issue 16): the tracker's groups merged into disjoint sets that fit one block, so requests
that share records are co-located together instead of fighting over the shared ones; and a cluster
that gained a record since its last rewrite costs that record, not the whole cluster again."""

from __future__ import annotations

from pathlib import Path

from compaction_helpers import AGGRESSIVE, MIB, value

import blockstore
from blockstore.compaction import attach
from blockstore.compaction.affinity import Group
from blockstore.compaction.clusters import build

RELOCATE_ONLY = {**AGGRESSIVE, "gc": False}


def _g(gid: int, *keys: bytes) -> Group:
    return Group(gid, tuple(sorted(keys)), 1.0, 0)


def test_overlapping_groups_merge_into_one_cluster_within_capacity() -> None:
    sizes = {k: 10 for k in (b"a", b"b", b"c", b"d", b"e", b"x", b"y")}
    out = build([(_g(1, b"a", b"b", b"c"), True), (_g(2, b"c", b"d", b"e"), False), (_g(3, b"x", b"y"), False)],
                sizes, capacity=100)
    assert sorted(sorted(c.keys) for c in out) == [[b"a", b"b", b"c", b"d", b"e"], [b"x", b"y"]]
    merged = next(c for c in out if b"a" in c.keys)
    assert merged.nbytes == 50 and sorted(merged.gids) == [1, 2] and merged.due
    assert not next(c for c in out if b"x" in c.keys).due


def test_clusters_are_disjoint_and_never_exceed_capacity() -> None:
    sizes = {bytes([i]): 30 for i in range(20)}
    groups = [(_g(i, bytes([i]), bytes([i + 1]), bytes([(i * 7) % 20])), True) for i in range(19)]
    out = build(groups, sizes, capacity=100)
    seen: list[bytes] = [k for c in out for k in c.keys]
    assert len(seen) == len(set(seen)), "a record in two clusters"
    assert all(c.nbytes == sum(sizes[k] for k in c.keys) <= 100 for c in out)
    assert all(len(c.keys) >= 2 for c in out)


def test_shared_records_are_placed_with_each_other_before_private_ones() -> None:
    # three requests share the documents d1, d2; each has two private records. The shared pair forms
    # one cluster first, so no request's private records capture it
    sizes = {k: 10 for k in (b"d1", b"d2", b"p1", b"q1", b"p2", b"q2", b"p3", b"q3")}
    groups = [(_g(i, b"d1", b"d2", b"p%d" % i, b"q%d" % i), True) for i in (1, 2, 3)]
    out = build(groups, sizes, capacity=40)
    home = next(c for c in out if b"d1" in c.keys)
    assert b"d2" in home.keys
    assert all((b"p%d" % i in c.keys) == (b"q%d" % i in c.keys) for c in out for i in (1, 2, 3))


def test_gone_records_are_left_out() -> None:
    out = build([(_g(1, b"a", b"b", b"c"), True)], {b"a": 5, b"b": 5}, capacity=100)
    assert [sorted(c.keys) for c in out] == [[b"a", b"b"]]
    assert build([(_g(1, b"a", b"b"), True)], {b"a": 5}, capacity=100) == []


def _spread(s: blockstore.Store, keys: list[bytes], size: int = 60_000) -> None:
    """Each key in a partition of its own (a block of its own), interleaved with filler."""
    for i, k in enumerate(keys):
        s.put(k, value(k, 0, size), partition=f"part-{i}")
        s.put(b"filler-%d" % i, b"f" * 10_000, partition=f"part-{i}")


def test_two_requests_sharing_records_both_end_in_one_block(tmp_path: Path) -> None:
    # with one copy per record, first-claim-wins left the second request in two blocks (the claimant's
    # and its own); as one cluster both read one block
    keys = [b"k%d" % i for i in range(5)]
    first, second = keys[:3], keys[2:]
    with blockstore.open(tmp_path, block_size=MIB) as s:
        _spread(s, keys)
        c = attach(s, RELOCATE_ONLY, background=False)
        for _ in range(2):
            s.get_many(first)
            s.get_many(second)
        c.run_until_idle()
        blocks = {loc.block_id for loc in s.locate_many(keys) if loc is not None}
        assert len(blocks) == 1
        for k in keys:
            assert s.get(k) == value(k, 0, 60_000)


def test_a_cluster_that_gained_a_record_moves_only_that_record(tmp_path: Path) -> None:
    keys = [b"k%d" % i for i in range(4)]
    with blockstore.open(tmp_path, block_size=MIB) as s:
        _spread(s, keys)
        c = attach(s, RELOCATE_ONLY, background=False)
        s.get_many(keys)
        assert c.run_pass().relocated_records == 4
        home = {loc.block_id for loc in s.locate_many(keys) if loc is not None}
        assert len(home) == 1
        s.put(b"late", value(b"late", 0, 50_000), partition="elsewhere")
        s.get_many([*keys, b"late"])
        rep = c.run_pass()
        assert (rep.relocated_groups, rep.relocated_records) == (1, 1)
        late = s.locate_many([b"late"])[0]
        assert late is not None and rep.relocated_bytes == late.record_len
        assert {loc.block_id for loc in s.locate_many([*keys, b"late"]) if loc is not None} == home
        assert s.get(b"late") == value(b"late", 0, 50_000)


def test_last_passes_clusters_keep_their_make_up_when_the_groups_order_changes() -> None:
    sizes = {k: 10 for k in (b"a", b"b", b"c", b"x", b"y", b"old")}
    groups = [(_g(1, b"a", b"x", b"y"), True), (_g(2, b"a", b"b", b"c"), True)]
    fresh = build(groups, sizes, capacity=30)
    assert sorted(sorted(c.keys) for c in fresh) == [[b"a", b"x", b"y"], [b"b", b"c"]]
    # the same groups, with {a, b, c} clustered by the last pass: it stays whole (and keeps its id);
    # a record no group reads any more leaves it
    kept = build(groups, sizes, capacity=30, previous=[(7, (b"a", b"b", b"old", b"c"))])
    assert [(c.gid, sorted(c.keys)) for c in kept if b"b" in c.keys] == [(7, [b"a", b"b", b"c"])]
    assert all(b"old" not in c.keys for c in kept)
    assert sorted(sorted(c.keys) for c in kept) == [[b"a", b"b", b"c"], [b"x", b"y"]]


def test_a_group_bigger_than_a_block_is_clustered_in_block_sized_runs() -> None:
    keys = [b"k%d" % i for i in range(7)]
    out = build([(_g(1, *keys), True)], {k: 30 for k in keys}, capacity=100)
    assert [c.keys for c in out] == [keys[:3], keys[3:6]]  # the last run of one record is left out
    assert all(c.nbytes == 90 and c.gids == [1] and c.due for c in out)


def test_only_the_cluster_that_holds_a_group_apart_is_rewritten(tmp_path: Path) -> None:
    # a request of 1.5 MB in 1 MiB blocks: two clusters, (a, b, c) and (d, e). a, b, c already share a
    # block: rewriting their cluster would buy the request nothing; d and e sit in two blocks, and e joins
    # d's block (still open, with room: one record moves)
    size = 300_000
    with blockstore.open(tmp_path, block_size=MIB) as s:
        s.put_many([(k, value(k, 0, size)) for k in (b"a", b"b", b"c")], partition="home")
        s.put(b"d", value(b"d", 0, size), partition="p-d")
        s.put(b"e", value(b"e", 0, size), partition="p-e")
        keys = [b"a", b"b", b"c", b"d", b"e"]
        home = {loc.block_id for loc in s.locate_many(keys[:3]) if loc is not None}
        assert len(home) == 1
        c = attach(s, RELOCATE_ONLY, background=False)
        s.get_many(keys)
        rep = c.run_pass()
        assert (rep.relocated_groups, rep.relocated_records) == (1, 1)
        assert {loc.block_id for loc in s.locate_many(keys[:3]) if loc is not None} == home
        assert len({loc.block_id for loc in s.locate_many(keys) if loc is not None}) == 2
        for k in keys:
            assert s.get(k) == value(k, 0, size)
