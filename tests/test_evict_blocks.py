"""Eviction of whole blocks without tombstones (`Store.evict_blocks`, engine side
`BlockLifecycle.evict_blocks`: a cache's capacity path).

What must hold: the keys the directory places in the evicted blocks are gone, and nothing else is;
a key overwritten or relocated before the call stays as that write left it (compare-and-swap on the
location); no evicted key can come back, neither through fsck's view nor a directory rebuilt from the
blocks (`rebuild_violations`: the newest record of each key on disk must agree with the directory);
a block that some other block could hold an older version of one of its keys for is refused whole,
and so are blocks with tombstones and open blocks; a kill -9 before or after the synced directory
write leaves either nothing or everything done.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from compaction_helpers import rebuild_violations, value

import blockstore
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.store import Store
from blockstore.tools import fsck

REPO = Path(__file__).resolve().parent.parent
BLOCK = 64 << 10
SIZE = 8000  # four records a block (page-aligned payloads)


def _open(path: Path, durability: str = "cache") -> Store:
    return blockstore.open(path, create=True, block_size=BLOCK, durability=durability)


def _fill(s: Store, prefix: str, n: int, partition: str | None = None) -> list[bytes]:
    keys = [f"{prefix}-{i}".encode() for i in range(n)]
    for k in keys:
        s.put_many([(k, value(k, 1, SIZE))], partition=partition)
    return keys


def _sealed(s: Store) -> list[int]:
    return [e.block_id for e in s.block_table() if e.state == BLOCK_SEALED]


def _keys_in(s: Store, bids: list[int]) -> set[bytes]:
    return {sfx[5:] for bid in bids for _off, sfx in s.dir.block_records(bid)}


def _assert_consistent(s: Store) -> None:
    assert rebuild_violations(s) == []
    names = {e.block_id for e in s.block_table()}
    files = set(s.blocks.list_files())
    assert files == names, f"block files {sorted(files - names)} not named, {sorted(names - files)} missing"


def _fsck_clean(path: Path) -> None:
    rep = fsck.check(path, log=False)
    assert not rep.findings, [str(f) for f in rep.findings]


def test_evicting_the_oldest_blocks_removes_their_keys_and_nothing_else(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with _open(p) as s:
        keys = _fill(s, "k", 60)
        victims = _sealed(s)[:3]
        gone = _keys_in(s, victims)
        assert len(gone) >= 9
        out = s.evict_blocks(victims)
        assert out.blocks == victims and out.refused == []
        assert {sfx[5:] for sfx, _loc in out.records} == gone
        assert all(loc.block_id in victims for _sfx, loc in out.records)
        for k, got in zip(keys, s.get_many(keys)):
            if k in gone:
                assert got is None
            else:
                assert got is not None and bytes(got) == value(k, 1, SIZE)
        assert sum(e.tombstones for e in s.block_table()) == 0, "eviction wrote tombstones"
        assert not set(victims) & set(s.blocks.list_files())
        _assert_consistent(s)
    _fsck_clean(p)
    with _open(p) as s:  # and after a reopen
        assert s.get_many(sorted(gone)) == [None] * len(gone)
        _assert_consistent(s)


def test_a_key_overwritten_before_the_eviction_keeps_its_new_value(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        _fill(s, "k", 40)
        victim = _sealed(s)[0]
        [moved, *_] = sorted(_keys_in(s, [victim]))
        s.put(moved, value(moved, 2, SIZE))  # lands in the open block; the victim keeps a dead copy
        out = s.evict_blocks([victim])
        assert out.blocks == [victim]
        assert moved not in {sfx[5:] for sfx, _loc in out.records}
        got = s.get(moved)
        assert got is not None and bytes(got) == value(moved, 2, SIZE)
        _assert_consistent(s)


def test_overwrites_racing_the_eviction_all_win(tmp_path: Path) -> None:
    """Whichever comes first, a key overwritten while its block is evicted has its new value after."""
    with _open(tmp_path / "s") as s:
        _fill(s, "k", 80)
        victims = _sealed(s)[:4]
        racing = sorted(_keys_in(s, victims))[::2]

        def overwrite() -> None:
            for k in racing:
                s.put(k, value(k, 2, SIZE))

        t = threading.Thread(target=overwrite)
        t.start()
        out = s.evict_blocks(victims)
        t.join()
        assert out.blocks == victims
        for k, got in zip(racing, s.get_many(racing)):
            assert got is not None and bytes(got) == value(k, 2, SIZE), k
        _assert_consistent(s)


def test_a_block_whose_key_has_an_older_version_elsewhere_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with _open(p) as s:
        s.put_many([(b"k", value(b"k", 1, SIZE))], partition="first")
        [old] = s.locate_many([b"k"])
        _fill(s, "a", 6, partition="first")  # seals the block holding k's first version
        s.put_many([(b"k", value(b"k", 2, SIZE))], partition="second")
        [new] = s.locate_many([b"k"])
        _fill(s, "b", 6, partition="second")
        assert old is not None and new is not None
        first, second = old.block_id, new.block_id
        assert {first, second} <= set(_sealed(s))
        before = {e.block_id for e in s.block_table()}
        # the first block stays and holds an older k: evicting k without a tombstone would bring it back
        out = s.evict_blocks([second])
        assert out.blocks == [] and out.refused == [second]
        assert {e.block_id for e in s.block_table()} == before
        got = s.get(b"k")
        assert got is not None and bytes(got) == value(b"k", 2, SIZE)
        # the first block goes (its records are older than everything that stays; its k was dead anyway)
        out = s.evict_blocks([first])
        assert out.blocks == [first] and b"k" not in {sfx[5:] for sfx, _l in out.records}
        got = s.get(b"k")
        assert got is not None and bytes(got) == value(b"k", 2, SIZE)
        _assert_consistent(s)
    with _open(p) as s:  # every block sealed at close: all of them together leave nothing behind
        everything = _sealed(s)
        out = s.evict_blocks(everything)
        assert sorted(out.blocks) == sorted(everything) and out.refused == []
        assert s.get(b"k") is None and s.get(b"a-5") is None
        _assert_consistent(s)
    _fsck_clean(p)


def test_a_block_of_relocated_copies_is_refused_while_their_sources_remain(tmp_path: Path) -> None:
    """A relocated copy keeps its record's sequence number, and its source block keeps the old copy until
    it is deleted: evicting the copies alone would leave those old copies as the keys' newest records."""
    with _open(tmp_path / "s") as s:
        keys = _fill(s, "k", 40)
        nid = s.namespace_id("default")
        assert nid is not None
        for k in keys[:20]:  # more than a block of copies: the first copies block is sealed
            [loc] = s.locate_many([k])
            assert loc is not None
            [payload] = s.read_locations([loc])
            assert s.relocate_many([(key_suffix(nid, SPACE_KV, k), loc, payload)], partition=b"copies") == [True]
        copies = [e.block_id for e in s.block_table() if e.partition == b"copies" and e.state == BLOCK_SEALED]
        assert copies
        out = s.evict_blocks(copies)
        assert out.blocks == [] and out.refused == copies
        assert all(g is not None for g in s.get_many(keys))
        _assert_consistent(s)


def test_open_and_unknown_blocks_are_refused(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        _fill(s, "k", 10)
        opened = [e.block_id for e in s.block_table() if e.state == BLOCK_OPEN]
        assert opened
        out = s.evict_blocks([*opened, 999_999])
        assert out.blocks == [] and sorted(out.refused) == sorted([*opened, 999_999])
        _assert_consistent(s)


def test_a_tombstone_goes_with_its_block_only_with_the_records_it_covers(tmp_path: Path) -> None:
    with _open(tmp_path / "s") as s:
        keys = _fill(s, "k", 10)
        [old] = s.locate_many([keys[0]])
        assert old is not None
        s.delete(keys[0])  # the tombstone lands in the open block ...
        _fill(s, "m", 30)  # ... which is sealed by now
        [stones] = [e.block_id for e in s.block_table() if e.tombstones and e.state == BLOCK_SEALED]
        # alone, the tombstone's block would take the only thing that keeps k-0's older record dead
        out = s.evict_blocks([stones])
        assert out.refused == [stones]
        older = sorted(b for b in _sealed(s) if b <= stones)
        assert old.block_id in older
        out = s.evict_blocks(older)
        assert sorted(out.blocks) == older and out.refused == []
        assert sum(e.tombstones for e in s.block_table()) == 0
        assert s.get(keys[0]) is None
        _assert_consistent(s)


def test_chunk_records_go_with_their_session_entries(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with _open(p) as s:
        for i in range(30):
            s.put_chunk("alice", "s1", f"c{i}", "t" * 6000, meta={"turn": i})
        victim = _sealed(s)[0]
        gone = {sfx for _off, sfx in s.dir.block_records(victim)}
        out = s.evict_blocks([victim])
        assert out.blocks == [victim] and len(out.records) == len(gone) > 0
        listed = s.list_chunks("alice", "s1")
        assert len(listed) == 30 - len(gone)
        _assert_consistent(s)
    _fsck_clean(p)


def test_a_random_history_never_resurrects_an_evicted_key(tmp_path: Path) -> None:
    """Puts, overwrites, deletes, relocations, reopens (every block sealed) and evictions of the oldest
    sealed blocks at random; after each eviction the store agrees with a model and with a directory
    rebuilt from its blocks."""
    rng = random.Random(16)
    model: dict[bytes, bytes] = {}
    evicted = refused = 0
    p = tmp_path / "s"
    s = _open(p)
    try:
        for step in range(500):
            r = rng.random()
            k = b"k%d" % rng.randrange(150)
            if step % 100 == 99:
                s.close()
                s = _open(p)
            elif r < 0.6:
                v = value(k, step, rng.choice((3000, SIZE)))
                s.put_many([(k, v)], partition=rng.choice((None, None, None, "p1")))
                model[k] = v
            elif r < 0.65:
                s.delete(k)
                model.pop(k, None)
            elif r < 0.7 and k in model:
                nid = s.namespace_id("default")
                assert nid is not None
                [loc] = s.locate_many([k])
                assert loc is not None
                [payload] = s.read_locations([loc])
                s.relocate_many([(key_suffix(nid, SPACE_KV, k), loc, payload)], partition=b"moves")
            elif r < 0.85:
                sealed = sorted(_sealed(s))
                out = s.evict_blocks(sealed[: rng.randint(1, max(1, len(sealed)))])
                evicted += len(out.blocks)
                refused += len(out.refused)
                for sfx, _loc in out.records:
                    model.pop(sfx[5:])
                _assert_consistent(s)
            keys = sorted(model)
            for kk, got in zip(keys, s.get_many(keys)):
                assert got is not None and bytes(got) == model[kk], (step, kk)
    finally:
        s.close()
    assert evicted >= 5 and refused >= 5, (evicted, refused)
    _fsck_clean(p)


# ------------------------------------------------------------------------------------- kill -9

_VICTIM = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import blockstore
    from blockstore import hooks
    from blockstore.directory import BLOCK_SEALED
    from compaction_helpers import value
    s = blockstore.open({path!r}, create=True, block_size={block}, durability={durability!r})
    for i in range(60):
        k = b"k-%d" % i
        s.put_many([(k, value(k, 1, {size}))])
    victims = [e.block_id for e in s.block_table() if e.state == BLOCK_SEALED][:3]
    gone = sorted(sfx[5:] for b in victims for _o, sfx in s.dir.block_records(b))
    with open({path!r} + ".plan", "w") as f:
        f.write(" ".join(str(b) for b in victims) + "\\n" + " ".join(k.decode() for k in gone))
    hooks.register({hook!r}, lambda *a: os.kill(os.getpid(), signal.SIGKILL))
    s.evict_blocks(victims)
    print("not killed")
""")


@pytest.mark.parametrize("durability", ["cache", "sync"])
@pytest.mark.parametrize("hook", ["evict.begin", "evict.written"])
def test_kill9_during_an_eviction_leaves_none_or_all_of_it(tmp_path: Path, hook: str, durability: str) -> None:
    p = tmp_path / "s"
    code = _VICTIM.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(p), block=BLOCK,
                          durability=durability, size=SIZE, hook=hook)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    plan_ids, plan_keys = (tmp_path / "s.plan").read_text().split("\n")
    victims = [int(b) for b in plan_ids.split()]
    gone = [k.encode() for k in plan_keys.split()]
    kept = [b"k-%d" % i for i in range(60) if b"k-%d" % i not in set(gone)]
    with _open(p, durability) as s:
        got_gone = s.get_many(gone)
        if hook == "evict.begin":
            assert all(g is not None for g in got_gone), "keys went before the eviction's directory write"
        else:
            assert got_gone == [None] * len(gone), "evicted keys came back after a kill -9"
            assert not set(victims) & set(s.blocks.list_files()), "an evicted block's file survived the reopen"
        for k, got in zip(kept, s.get_many(kept)):
            assert got is not None and bytes(got) == value(k, 1, SIZE), k
        _assert_consistent(s)
    _fsck_clean(p)
    assert os.path.exists(p / "MANIFEST.json")
