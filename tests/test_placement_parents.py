"""Placement by a partition's parent (blockstore/placement_choice.py, issue 16, H75): a caller whose
partitions are named as paths ("tenant/session", "repo/task") and whose requests read what several
partitions under one parent wrote has its records placed by the parent; partitions read on their own
keep their lineages; a store of one namespace still never becomes one stream."""

from __future__ import annotations

import random
from pathlib import Path

from test_placement_choice import BLOCK, Replay

import blockstore
from blockstore.placement_choice import PlacementChoice, parent_of


def test_parent_of_a_partition() -> None:
    assert parent_of(b"ns\0t03/s0012") == b"ns\0t03"
    assert parent_of(b"ns\0a/b/c") == b"ns\0a/b"  # one level up
    assert parent_of(b"ns\0t03") is None
    assert parent_of(b"ns\0/s1") is None  # an empty parent is none
    assert parent_of(b"ns") is None and parent_of(b"n/s") is None  # a namespace alone has no partition
    # a chunk session's partition (chunk records, Store.session_partition): its user
    session = blockstore.Store.session_partition("alice/x", "s/1")
    assert parent_of(b"ns\0" + session) == b"ns\0" + session[: 3 + len(b"alice/x")]
    assert parent_of(b"ns\0user7/s1") == b"ns\0user7"  # a "u" that does not spell a chunk session: a path


def tenants_reading_across_sessions(choice: PlacementChoice, tenants: int = 12, steps: int = 3000) -> Replay:
    """One namespace; sessions "t/s" of tenants drawn at random, each step reads two of its session's
    latest records and two of its tenant's earlier sessions' records, then writes one."""
    rng = random.Random(7)
    r = Replay(choice)
    own: dict[bytes, list[bytes]] = {}
    pool: dict[int, list[bytes]] = {t: [] for t in range(tenants)}
    for i in range(steps):
        t = rng.randrange(tenants)
        part = b"ns\0t%02d/s%d" % (t, i // 40)
        mine = own.setdefault(part, [])
        others = [k for k in pool[t] if k not in mine]
        if len(mine) >= 2 and len(others) >= 2:
            r.read(mine[-2:] + rng.sample(others, 2))
        key = b"k%d" % i
        r.put(key, part, 30_000)
        mine.append(key)
        pool[t].append(key)
    return r


def test_sessions_read_across_their_tenant_are_placed_by_the_tenant() -> None:
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    tenants_reading_across_sessions(choice)
    assert choice.by_parent == {b"ns"} and not choice.by_namespace
    assert choice.resolve(b"ns\0t03/s77") == b"ns\0t03"
    assert choice.resolve(b"ns\0plain") == b"ns\0plain"  # a partition without a parent keeps its own
    assert len(choice._by_parent.state) <= 1024


def test_sessions_read_on_their_own_keep_their_partitions() -> None:
    """Each request reads its own session's last records: the parent's lineage interleaves the sessions
    of a tenant, so it does not pay, and the partitions stay."""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    rng = random.Random(8)
    r = Replay(choice)
    own: dict[bytes, list[bytes]] = {}
    for i in range(3000):
        part = b"ns\0t%d/s%d" % (rng.randrange(3), rng.randrange(8))
        mine = own.setdefault(part, [])
        if len(mine) >= 8:
            r.read(mine[-8:])
        key = b"k%d" % i
        r.put(key, part, 100_000)
        mine.append(key)
    assert not choice.by_parent and not choice.by_namespace
    assert choice.resolve(b"ns\0t1/s3") == b"ns\0t1/s3"


def test_a_store_of_one_namespace_with_parents_is_never_one_stream() -> None:
    """Requests reading at random across every tenant's sessions favour one lineage over both the
    sessions and the tenants; in a store of one namespace that would be a plain log, so it is never
    chosen (the parents may be)."""
    choice = PlacementChoice(block_size=BLOCK, max_names=1024)
    rng = random.Random(9)
    r = Replay(choice)
    keys: list[bytes] = []
    for i in range(3000):
        if len(keys) >= 120:
            r.read(rng.sample(keys[-30:], 4))
        keys.append(b"k%d" % i)
        r.put(keys[-1], b"ns\0t%d/s%d" % (rng.randrange(10), rng.randrange(30)), 8_000)
    assert not choice.by_namespace and not choice.default_by_namespace
    assert choice.resolve(b"ns\0t1/s1") in (b"ns\0t1/s1", b"ns\0t1")


def test_a_store_places_a_tenant_read_across_sessions_as_one(tmp_path: Path) -> None:
    """Through the public API, one namespace: once requests have read each tenant's sessions together,
    two new sessions of one tenant write into one block (their tenant's), and every record reads back."""
    rng = random.Random(12)
    written: dict[bytes, bytes] = {}
    with blockstore.open(tmp_path, block_size=4 << 20, max_open_blocks=64, idle_seal_seconds=0) as s:
        pool: dict[int, list[bytes]] = {}
        for i in range(800):
            t = rng.randrange(6)
            mine = pool.setdefault(t, [])
            if len(mine) >= 4:
                want = mine[-2:] + rng.sample(mine[:-2], 2)
                assert [bytes(g) for g in s.get_many(want) if g is not None] == [written[k] for k in want]
            key, value = b"r%d" % i, rng.randbytes(rng.randint(1000, 8000))
            s.put_many([(key, value)], partition=f"t{t}/s{i // 25}")
            written[key] = value
            mine.append(key)
        s.put_many([(b"new-a", b"a" * 3000)], partition="t0/fresh-a")
        s.put_many([(b"new-b", b"b" * 3000)], partition="t0/fresh-b")
        a, b = s.locate_many([b"new-a", b"new-b"])
        assert a is not None and b is not None and a.block_id == b.block_id
        for key, value in written.items():
            assert s.get(key) == value


def test_partitions_that_are_each_their_parents_only_child_label_nothing() -> None:
    """The LMCache plugin's per-layer partitions ("seg/<world>/<worker>/<chunk hash>/<dtype>", one namespace)
    each have a parent no other partition shares: there is nothing to choose, and nothing is kept per
    record until two partitions of one parent are written."""
    choice = PlacementChoice(block_size=BLOCK, max_names=64)
    for i in range(2000):
        choice.note_append(i // 100, 4096 + (i % 100) * 8192, b"lmcache\0seg/1/0/%032x/half" % i, 8000)
    assert not choice._labels and not choice._by_parent.state and len(choice._child) <= 64
    choice.note_append(99, 4096, b"lmcache\0t1/s1", 8000)
    choice.note_append(99, 12288, b"lmcache\0t1/s2", 8000)  # siblings: from now on records are labelled
    assert choice.siblings and len(choice._labels) == 1


def test_a_namespace_of_one_parent_does_not_hide_another_of_several() -> None:
    """`many_parents` (the store's tie rule) says some namespace's partitions have several parents: a record of a
    namespace with one parent, written after, set it back to False."""
    choice = PlacementChoice(block_size=BLOCK, max_names=64)
    choice.note_append(1, 4096, b"a\0t1/s1", 8000)
    choice.note_append(1, 12288, b"a\0t2/s1", 8000)
    assert choice.many_parents
    choice.note_append(2, 4096, b"b\0t9/s1", 8000)
    choice.note_append(2, 12288, b"b\0t9/s2", 8000)
    assert choice.many_parents
