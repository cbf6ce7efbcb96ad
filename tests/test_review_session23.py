"""Review of session 23's changes (eviction ahead of need, placement choice, compaction pacing): each test is
a bug found in review, failing before its fix.

Eviction: a pass decides first (`_plan_block`, `_keep_within`) and writes later (`_rewrite_at_head`,
`Store.evict_blocks`); on the eviction thread other tasks run in between. The tests put one such task exactly
in that window (a wrapper around `_keep_within`, the step between deciding and writing), so the interleaving
is deterministic, not a timing accident."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from compaction_helpers import rebuild_violations  # noqa: E402
from test_connector_adapter import Arena, load, lookup, okey, same, store  # noqa: E402

import blockstore  # noqa: E402
from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig  # noqa: E402
from blockstore.connector.l2_keys import lmcache_namespaces  # noqa: E402
from blockstore.connector.l2_listing import records_held  # noqa: E402
from blockstore.directory import BLOCK_SEALED  # noqa: E402
from blockstore.errors import BlockstoreError  # noqa: E402
from blockstore.placement_choice import PlacementChoice  # noqa: E402
from blockstore.tools import fsck  # noqa: E402

BLOCK = 65536
CAPACITY = 8 * BLOCK
SMALL = torch.Size([2, 2, 16, 32])  # float32: 8 KiB
OTHER = torch.Size([4, 1, 16, 32])  # the same 8 KiB in another layout
SMALL_SIZE = 8192


def fill_with_records_worth_keeping(a: BlockstoreL2Adapter, src: Any) -> int:
    """Just under capacity (no pass yet) of records all read since, even keys three times, odd ones once: every
    record of the oldest blocks is worth keeping, more than one pass may move. Returns how many."""
    n = CAPACITY // SMALL_SIZE - 8
    for i in range(n):
        store(a, [okey(i)], [src])
    assert a.report_status()["counters"]["evicted_for_capacity"] == 0
    for times in range(3):
        keys = [okey(i) for i in range(n) if i % 2 == 0 or times == 0]
        assert lookup(a, keys) == [True] * len(keys)
        a.submit_unlock(keys)
    return n


def race_between_decision_and_writes(a: BlockstoreL2Adapter, act: Callable[[list[Any], int], None]) -> list[int]:
    """Run `act(wanted, budget)` once, in the first background pass whose records worth keeping exceed its move budget,
    after the pass decided which blocks to empty and before it keeps or evicts anything. Returns [calls]."""
    original = a._eviction._walk._keep_within
    acted: list[int] = []

    def wrapped(wanted: list[Any], budget: int, drop: dict[int, Any]) -> Any:
        # on the eviction thread: a pass a store runs itself holds a store worker that `act` may need
        on_evict_thread = threading.current_thread().name.startswith("blockstore-l2-evict")
        if not acted and on_evict_thread and sum(w.loc.record_len for w in wanted) > budget:
            act(wanted, budget)
            acted.append(1)
        return original(wanted, budget, drop)

    a._eviction._walk._keep_within = wrapped  # type: ignore[method-assign]
    return acted


def store_new_block_of_keys(a: BlockstoreL2Adapter, src: Any) -> None:
    for j in range(BLOCK // SMALL_SIZE):  # passes must make room
        store(a, [okey(100_000 + j)], [src])
        a.wait_for_eviction()


def test_a_key_deleted_while_a_pass_decides_to_keep_it_stays_deleted(capped_adapter: BlockstoreL2Adapter,
                                                                       arena: Arena) -> None:
    """LMCache deletes a key that the pass running meanwhile chose to keep (write again at the head). Before:
    the pass wrote the old bytes again after the delete: the deleted key came back, and the adapter's byte count
    (the delete subtracted it) no longer covered what it held, so capacity_bytes was no longer a bound."""
    a = capped_adapter
    src = arena.new(SMALL, fill=5)
    fill_with_records_worth_keeping(a, src)
    victim: list[Any] = []

    def delete_the_most_valuable(wanted: list[Any], _budget: int) -> None:
        w = max(wanted, key=lambda w: w.value)  # within the budget: the pass keeps it
        a.delete([w.key])
        victim.append(w.key)

    acted = race_between_decision_and_writes(a, delete_the_most_valuable)
    store_new_block_of_keys(a, src)
    assert acted, "no pass had more worth keeping than it may move"
    assert lookup(a, victim) == [False], "a deleted key came back"
    held = sum(loc.payload_len for ns in lmcache_namespaces(a.store) for _kb, loc in a.store.iter_locations(ns=ns))
    assert a.get_usage().total_bytes_used == held  # the capacity bound counts what is held


def test_a_store_of_another_layout_while_a_pass_decides_to_keep_the_old_one_is_not_undone(
        capped_adapter: BlockstoreL2Adapter, arena: Arena) -> None:
    """A store replaces a key with another layout (acknowledged) while the pass chose to keep the key's old
    record. Before: the pass wrote the old record again over the new one: the acknowledged store was lost and a
    load of the new layout missed."""
    a = capped_adapter
    src = arena.new(SMALL, fill=6)
    fill_with_records_worth_keeping(a, src)
    newer = arena.new(OTHER, fill=7)
    victim: list[Any] = []

    def replace_the_most_valuable(wanted: list[Any], _budget: int) -> None:
        w = max(wanted, key=lambda w: w.value)
        # a store task's work, run here (the test's own store() would race the main thread's for the task results);
        # the block files' check is not due, so this store (of no new bytes) never waits for the pass under way
        a._eviction._disk_checked_at = a._memory.clock
        assert a._run_store([w.key], [newer]).is_successful()
        victim.append(w.key)

    acted = race_between_decision_and_writes(a, replace_the_most_valuable)
    store_new_block_of_keys(a, src)
    assert acted, "no pass had more worth keeping than it may move"
    out = arena.new(OTHER)
    assert lookup(a, victim) == [True]
    assert load(a, victim, [out]) == [True], "the acknowledged store of the other layout was undone"
    a.submit_unlock(victim)
    assert same(out, newer)


def test_a_key_locked_while_a_pass_trims_what_it_keeps_is_not_evicted(capped_adapter: BlockstoreL2Adapter,
                                                                       arena: Arena) -> None:
    """A lookup locks a key (a promise to the load that follows) after the pass chose to keep it but before the
    pass trims what it keeps to its budget, least valuable first. Before: the trim left the locked key to 'its
    block's eviction', which removed the block with the key in it: the locked key's load missed."""
    a = capped_adapter
    src = arena.new(SMALL, fill=8)
    fill_with_records_worth_keeping(a, src)
    victim: list[Any] = []

    def lock_the_least_valuable(wanted: list[Any], _budget: int) -> None:
        w = min(wanted, key=lambda w: w.value)  # beyond the budget: trimmed
        assert lookup(a, [w.key]) == [True]
        victim.append(w.key)

    acted = race_between_decision_and_writes(a, lock_the_least_valuable)
    store_new_block_of_keys(a, src)
    assert acted, "no pass had more worth keeping than it may move"
    out = arena.new(SMALL)
    assert load(a, victim, [out]) == [True], "a locked key was evicted"
    assert same(out, src)
    a.submit_unlock(victim)


def test_a_pass_that_fails_before_it_writes_leaves_no_key_claimed(capped_adapter: BlockstoreL2Adapter,
                                                                   arena: Arena) -> None:
    """A pass fails after it planned (a directory read error, here injected into the step after planning): it
    deleted nothing, so every key is still held and usable. Before: the keys it had claimed for deletion stayed
    claimed for ever: a lookup missed them (on their way out), a delete or store skipped them, and every later
    pass left their blocks alone, so the block files outgrew their bound."""
    a = capped_adapter
    src = arena.new(SMALL, fill=9)
    n = CAPACITY // SMALL_SIZE - 8  # just under the capacity and its lead; never read: not worth keeping
    for i in range(n):
        store(a, [okey(i)], [src])
    original = a._eviction._walk._keep_within
    failed: list[int] = []

    def fail_once(*args: Any) -> Any:
        if not failed:
            failed.append(1)
            raise OSError("injected: directory read failed")
        return original(*args)

    a._eviction._walk._keep_within = fail_once  # type: ignore[method-assign]
    for j in range(BLOCK // SMALL_SIZE * 2):  # the first pass fails; stores go on
        store(a, [okey(100_000 + j)], [src])
        a.wait_for_eviction()
        if failed:
            break
    assert failed, "no pass ran"
    a._eviction._walk._keep_within = original  # type: ignore[method-assign]
    keys = [okey(i) for i in range(n)]
    held = [kb is not None for kb in a.store.locate_many([a._hub._pos(k)[1] for k in keys], ns=a._hub._pos(keys[0])[0])]
    found = lookup(a, keys)
    a.submit_unlock([k for k, f in zip(keys, found) if f])
    assert found == held, "keys held in the store are missed: still claimed by the failed pass"


def test_a_pass_for_the_block_files_bound_evicts_about_what_it_must_free(capped_adapter: BlockstoreL2Adapter,
                                                                        arena: Arena) -> None:
    """A pass run because the block files are over their bound (`disk_excess`, here one block) while every
    record is worth keeping: what the pass cannot move within its budget goes with its block, and that frees the
    files too. Before (since the keep was trimmed after the walk, 3334e44), the walk counted only dead bytes as
    freed, so it went on over every sealed block and then evicted all but the budget's worth: most of the cache
    for one block of files."""
    a = capped_adapter
    src = arena.new(SMALL, fill=10)
    fill_with_records_worth_keeping(a, src)
    before = a.get_usage().total_bytes_used
    sealed = [e for e in a.store.block_table() if e.state == BLOCK_SEALED]
    with a._eviction._evict_lock:
        a._eviction._walk.evict(-CAPACITY, BLOCK, a.store.block_table())
    evicted = before - a.get_usage().total_bytes_used
    assert len(sealed) >= 6
    assert 0 < evicted <= 2 * BLOCK, (evicted, "payload bytes evicted to free one block of files")


_STORING_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_connector_adapter import Arena, lookup, okey, store
from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig
import torch
a = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict(
    {{"path": {path!r}, "capacity_bytes": {capacity}, "block_size": {block}, "compaction": None}}))
src = Arena().new(torch.Size([2, 2, 16, 32]), fill=11)
i = {start}
print("ready", flush=True)
while True:  # stores side by side with the passes they start on the eviction thread, re-reads between them
    store(a, [okey(i + j) for j in range(4)], [src] * 4)
    again = [okey(j) for j in range(max(0, i - 40), i, 5)]
    a.submit_unlock([k for k, f in zip(again, lookup(a, again)) if f])
    i += 4
"""


@pytest.mark.slow
def test_kill9_while_passes_run_ahead_leaves_a_store_that_checks_clean(tmp_path: Path, arena: Arena) -> None:
    """kill -9 at random moments of a process storing through the adapter while its eviction thread runs passes
    (rewrites at the head, block evictions, tombstones): after each, fsck finds nothing, a directory rebuilt from
    the blocks agrees with the real one (no evicted or deleted key comes back), the reopened adapter holds at
    most capacity_bytes, and every record it holds loads bit-exact."""
    path = tmp_path / "kv"
    rng = random.Random(23)
    src = arena.new(SMALL, fill=11)
    tests = str(Path(__file__).resolve().parent)
    for round_ in range(3):
        code = _STORING_CHILD.format(tests=tests, path=str(path), capacity=CAPACITY, block=BLOCK,
                                     start=round_ * 1_000_000)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
            time.sleep(rng.uniform(0.5, 2.0))
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        with blockstore.open(str(path), create=False) as s:  # recovery: the writer was killed
            assert rebuild_violations(s) == [], round_
            assert min(e.block_id for e in s.block_table()) > 0, "no pass evicted a block before the kill"
        findings = [f.line() for f in fsck.check(str(path), log=False).findings]
        assert not findings, (round_, findings)
        a = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict(
            {"path": str(path), "capacity_bytes": CAPACITY, "block_size": BLOCK, "compaction": None}))
        try:
            assert 0 < a.get_usage().total_bytes_used <= CAPACITY, round_
            held = [k for k, _size in records_held(a.store)]
            outs = [arena.new(SMALL) for _ in held]
            assert load(a, held, outs) == [True] * len(held), round_
            assert all(same(o, src) for o in outs), round_
        finally:
            a.close()


# ---------------------------------------------------------------------------------------------- pacing

_PROBE = """
import os, threading
from blockstore.compaction.pacing import ThreadPriority
stop = threading.Event()
out = []
def body():
    p = ThreadPriority(stop)
    p.idle()
    p.normal()
    out.append(os.sched_getscheduler(p.tid))
t = threading.Thread(target=body); t.start(); t.join(); stop.set()
print(out[0] == os.SCHED_OTHER)
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or shutil.which("setpriv") is None
                    or shutil.which("prlimit") is None, reason="Linux, setpriv, prlimit")
def test_a_thread_is_put_under_sched_idle_only_if_it_can_come_back() -> None:
    """Leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE that allows nice 0 (sched(7)); a server run by an
    ordinary user has neither (RLIMIT_NICE is 0 by default). Before: the compactor thread went under SCHED_IDLE
    anyway and could never leave it: the watchdog's normal() and 'normal priority on an oversubscribed machine'
    failed silently, so a starved pass stayed starved (holding the GIL a reader waits for). Run here without
    CAP_SYS_NICE and with RLIMIT_NICE 0, as such a server runs."""
    cmd = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "prlimit", "--nice=0",
           sys.executable, "-c", _PROBE]
    if os.geteuid() != 0:
        cmd = cmd[3:]  # an ordinary user has no CAP_SYS_NICE to drop
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True", "the thread is stuck under SCHED_IDLE"


def test_a_paced_pass_that_fails_gives_the_switch_interval_back(tmp_path: Path) -> None:
    """The interpreter's switch interval is process-wide: a paced pass sets it to FAST_SWITCH_S and pass_done puts
    it back. Before: a pass that raised (a full disk during GC: the background loop logs BlockstoreError and goes
    on) skipped pass_done, so every thread of the process (a whole vLLM server) kept switching 40x as often, for
    good if the store then closed."""
    before = sys.getswitchinterval()
    with blockstore.open(str(tmp_path / "s"), block_size=1 << 20,
                         compaction={"policy": "full", "interval_s": 3600}) as s:
        s.put_many([(b"k%03d" % i, os.urandom(4096)) for i in range(16)])
        c = s.compactor
        assert c is not None

        def disk_full(*_args: Any) -> None:
            assert sys.getswitchinterval() < before  # the pass is paced
            raise BlockstoreError("injected: no space left on device")

        c._collect = disk_full  # type: ignore[method-assign]
        with pytest.raises(BlockstoreError):
            c.run_pass(pace=True)
        after = sys.getswitchinterval()
        if c.pacing._fast_switch:  # (before the fix) give it back here, so that later tests run as usual
            c.pacing.pass_done(None)
    assert after == before


# --------------------------------------------------------------------------------------- placement choice

class _Place:
    """What a read observer looks at in a Location: its block and offset."""

    __slots__ = ("block_id", "offset")

    def __init__(self, block_id: int, offset: int) -> None:
        self.block_id, self.offset = block_id, offset


def test_one_write_group_scores_a_bounded_number_of_reads() -> None:
    """resolve() runs on the group-commit leader's path (every writer of the store waits for it) and scored every
    read queued since the last write: 1,024 requests of 256 labelled records (LMCache: a 64k-token prompt in
    256-token chunks) took 85 ms on this VM in one write group. The reads are a sample (the queue drops the
    oldest), so one write scores a bounded share and leaves the rest to the next."""
    c = PlacementChoice(block_size=1 << 20, max_names=64)
    for i in range(4096):
        c.note_append(i // 16, (i % 16) * 65536, b"ns%d\0p%d" % (i % 5, i % 50), 65536)
    per_request = 256
    for r in range(1024):
        c.observe([], [_Place((r + j) // 16 % 256, (r + j) % 16 * 65536) for j in range(per_request)])
    queued = len(c._pending)
    c.resolve(b"ns1\0p1")
    scored = (queued - len(c._pending)) * per_request
    assert 0 < scored <= 16384, scored
