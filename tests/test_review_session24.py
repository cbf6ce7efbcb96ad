"""Review of session 24's changes (eviction's spare room, blend on the GPU, placement choice, relocation by a
shadow): each test is a bug found in review. A test whose fix belongs to an engineer still at work is marked
xfail(strict=True) until the fix is in, so it fails the suite the moment the fix lands without the mark going.

Eviction: a pass decides (`_plan_block`) and later claims what it trims (`_keep_within`, `_keep_spares`); keys it
trims are not claimed while it decides, so a store may replace one in between. The race is placed exactly in that
window by wrapping `_keep_within` (tests/test_review_session23.py's way)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from test_connector_adapter import Arena, load, lookup, okey, same, store  # noqa: E402
from test_review_session23 import (  # noqa: E402
    CAPACITY,
    OTHER,
    SMALL,
    SMALL_SIZE,
    fill_with_records_worth_keeping,
    race_between_decision_and_writes,
    store_new_block_of_keys,
)

import blockstore  # noqa: E402
from blockstore.blend import LlamaConfig, LlamaWeights, graphs  # noqa: E402
from blockstore.compaction import attach  # noqa: E402
from blockstore.connector.l2_adapter import BlockstoreL2Adapter  # noqa: E402


def assert_replaced_key_survives(a: BlockstoreL2Adapter, arena: Any, victim: list[Any], newer: Any) -> None:
    """The key a store replaced during the pass is still found, and holds the store's new bytes."""
    out = arena.new(OTHER)
    assert lookup(a, victim) == [True], "the acknowledged store was deleted by a decision about its old record"
    assert load(a, victim, [out]) == [True]
    a.submit_unlock(victim)
    assert same(out, newer)


def trimmed(wanted: list[Any], budget: int) -> list[Any]:
    """The records `_keep_within` will not keep: beyond the budget, most valuable kept first."""
    moved, out = 0, []
    for w in sorted(wanted, key=lambda w: -w.value):
        if moved + w.loc.record_len <= budget:
            moved += w.loc.record_len
        else:
            out.append(w)
    return out


def test_a_store_that_replaces_a_trimmed_key_of_a_held_block_is_not_deleted(capped_adapter: BlockstoreL2Adapter,
                                                                           arena: Arena) -> None:
    """Between a pass's decision and its trim, a store replaces a key the trim will evict (acknowledged: a new
    record in a new block), and a lookup locks another trimmed key of the same block, so that block stays and
    its trimmed keys get tombstones. Before: the tombstone deleted the key wherever it was, i.e. the new record
    of the acknowledged store, for a decision taken about its old record; a whole-block eviction leaves it."""
    a = capped_adapter
    src = arena.new(SMALL, fill=3)
    fill_with_records_worth_keeping(a, src)
    newer = arena.new(OTHER, fill=4)
    victim: list[Any] = []
    locked: list[Any] = []

    def replace_one_and_lock_another(wanted: list[Any], budget: int) -> None:
        by_block: dict[int, list[Any]] = {}
        for w in trimmed(wanted, budget):
            by_block.setdefault(w.block, []).append(w)
        pair = next((ws for ws in by_block.values() if len(ws) >= 2), None)
        assert pair is not None, "no block with two trimmed records"
        assert lookup(a, [pair[0].key]) == [True]  # held by a lookup: its block stays
        locked.append(pair[0].key)
        # this store of no new bytes does not wait for the pass under way
        a._eviction._disk_checked_at = a._memory.clock
        assert a._run_store([pair[1].key], [newer]).is_successful()
        victim.append(pair[1].key)

    acted = race_between_decision_and_writes(a, replace_one_and_lock_another)
    store_new_block_of_keys(a, src)
    assert acted, "no pass had more worth keeping than it may move"
    a.submit_unlock(locked)
    assert_replaced_key_survives(a, arena, victim, newer)


# ---- blend on the GPU (graphs.py): run on a CPU with graphs.usable forced on, each layer called eagerly


def test_two_blends_needing_the_same_new_bucket_capture_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads blend at once and both need a bucket not captured yet. Before: both built it, i.e. on a GPU
    two CUDA graph captures ran at once in two threads; in torch's default ("global") capture mode each forbids
    the other thread's unsafe calls, so a capture fails, and one failure turns graphs off for the process
    (graphs._state["failed"]). Here the build is slowed so that the two calls overlap deterministically."""
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    w = LlamaWeights.random(cfg, seed=1, std=0.2)
    monkeypatch.setattr(graphs, "usable", lambda device: True)
    built: list[int] = []
    original = graphs.LayerGraphs.__init__

    def slow_build(self: Any, *args: Any, **kw: Any) -> None:
        built.append(1)
        time.sleep(0.3)  # a capture takes ~seconds on a GPU
        original(self, *args, **kw)

    monkeypatch.setattr(graphs.LayerGraphs, "__init__", slow_build)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(graphs.layer_graphs(w, 100, 10, 1))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] is not None
    assert len(built) == 1, "the same bucket was captured twice at once"
    assert got[0] is got[1]


# ---- relocation judged by a shadow (compactor.py, shadow.py)

KB = 1000


def test_stragglers_joining_their_open_block_place_no_copy_where_the_record_is(tmp_path: Path) -> None:
    """Copies on (max_copies=1). Cluster B = {b1, b2} sits mostly in an open block that also holds s; s belongs
    to cluster A (read more often with a1, a2) and B borrows it (a copy rides with B's rewrite). B's straggler b2
    joins that open block. Before c305860, relocate(stragglers_only=True) dropped borrowed records that already
    have a place in the main block; the shadow's subset move dropped that filter: s got a copy in its own block
    (space and a copy of max_copies spent for no read saved)."""
    with blockstore.open(tmp_path, block_size=1 << 20) as s:
        s.put_many([(b"b1", b"1" * 300 * KB), (b"s", b"s" * 200 * KB)], partition="home")
        s.put_many([(b"b2", b"2" * 200 * KB)], partition="x")
        s.put_many([(b"a1", b"a" * 300 * KB)], partition="y")
        s.put_many([(b"a2", b"A" * 300 * KB)], partition="z")
        comp = attach(s, {"policy": "full", "max_copies": 1, "min_hits": 1, "relocation_slack": 0,
                          "relocation_budget": 1e9, "gc": False}, background=False)
        for _ in range(3):
            s.get_many([b"a1", b"a2", b"s"])
        for _ in range(2):
            s.get_many([b"b1", b"b2", b"s"])
        home = s.locate_many([b"b1"])[0].block_id  # type: ignore[union-attr]
        rep = comp.run_pass()
        comp.stop()
        assert rep.relocated_groups >= 1
        b2, shared = s.locate_many([b"b2", b"s"])
        assert b2 is not None and b2.block_id == home  # the straggler joined its open main block
        assert shared is not None
        places = [p.block_id for p in shared.places()]
        assert len(places) == len(set(places)), f"s has two places in one block: {places}"
        assert s.get(b"s") == b"s" * 200 * KB


def test_a_store_that_replaces_a_spare_key_of_a_held_block_is_not_deleted(capped_adapter: BlockstoreL2Adapter,
                                                                         arena: Arena) -> None:
    """The same race through the spare room (`_keep_spares`, new this session): spares (records read, not worth
    a keep of their own) are not claimed while the pass decides. A store replaces one the pass then leaves out,
    and a lookup locks another of the same block, so the block stays and its spares get tombstones. Before: the
    tombstone deleted the acknowledged new record. (The wrapper gives the spares no room: a pass whose need
    takes all that it frees.)"""
    a = capped_adapter
    src = arena.new(SMALL, fill=5)
    n = CAPACITY // SMALL_SIZE - 8
    keys = [okey(i) for i in range(n)]
    for k in keys:
        store(a, [k], [src])
    assert lookup(a, keys) == [True] * n
    a.submit_unlock(keys)
    with a._state.lock:  # read, the read spent (as one keep by value leaves it): worth no keep of its own, a spare
        for k in keys:
            a._memory.stats.spend(k)
    newer = arena.new(OTHER, fill=6)
    victim: list[Any] = []
    locked: list[Any] = []
    original = a._eviction._walk._keep_spares

    def wrapped(spares: list[Any], room: int, keep: Any, drop: Any, held: Any) -> None:
        by_block: dict[int, list[Any]] = {}
        for w in spares:
            by_block.setdefault(w.block, []).append(w)
        pair = next((ws for ws in by_block.values() if len(ws) >= 2), None)
        if not victim and pair is not None and threading.current_thread().name.startswith("blockstore-l2-evict"):
            assert lookup(a, [pair[0].key]) == [True]  # held by a lookup: its block stays
            locked.append(pair[0].key)
            # this store of no new bytes does not wait for the pass under way
            a._eviction._disk_checked_at = a._memory.clock
            assert a._run_store([pair[1].key], [newer]).is_successful()
            victim.append(pair[1].key)
            room = 0
        original(spares, room, keep, drop, held)

    a._eviction._walk._keep_spares = wrapped  # type: ignore[method-assign]
    store_new_block_of_keys(a, src)
    assert victim, "no pass had two spares in one block"
    a.submit_unlock(locked)
    assert_replaced_key_survives(a, arena, victim, newer)
