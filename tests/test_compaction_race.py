"""Deterministic compaction races (the Badger 2310 shape, docs/format.md §5.2).

A GC pass or a relocation pass runs on its own thread and is paused at a named hook: `compact.scan`
(live records listed, nothing read yet) or `compact.copy` (payloads read, not yet re-pointed). While it
is paused the main thread deletes one key being copied and overwrites another. When the pass resumes
its compare-and-swap must fail for both: the deleted key stays deleted, the overwrite wins, before and
after a reopen, and the pass reports both as lost races.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from compaction_helpers import AGGRESSIVE, MIB, rebuild_violations, value

import blockstore
from blockstore import hooks
from blockstore.compaction import Compactor, PassReport, attach

GC_ONLY = {**AGGRESSIVE, "relocation": False}
RELOCATE_ONLY = {**AGGRESSIVE, "gc": False}
SIZE = 100_000


class Pause:
    """A hook callback that parks the first call of one phase until `resume` is set."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.args: tuple[Any, ...] | None = None

    def __call__(self, phase: str, ident: int, count: int = 0) -> None:
        if phase != self.phase or self.args is not None:
            return
        self.args = (phase, ident, count)
        self.paused.set()
        assert self.resume.wait(20), "test never resumed the pass"


@contextmanager
def paused_pass(c: Compactor, hook: str, phase: str) -> Iterator[tuple[Pause, dict[str, Any]]]:
    """Run one pass of `c` on a thread, parked at `hook`; the body runs while it is parked; on exit the
    pass is resumed and joined. `out["report"]` (or `out["error"]`) holds what the pass returned."""
    pause = Pause(phase)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["report"] = c.run_pass()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    with hooks.installed(hook, pause):
        t = threading.Thread(target=run, name="compaction-pass")
        t.start()
        try:
            assert pause.paused.wait(20), f"the pass never reached {hook} ({out})"
            yield pause, out
        finally:
            pause.resume.set()
            t.join(20)
            assert not t.is_alive()


def _gc_victim(path: Path, backend: str) -> tuple[blockstore.Store, dict[bytes, bytes | None]]:
    """A store whose one sealed block holds k0..k7, half of them overwritten since (invalid ratio ~0.5)."""
    items = [(b"k%d" % i, value(b"k%d" % i, 0, SIZE)) for i in range(8)]
    model: dict[bytes, bytes | None] = dict(items)
    with blockstore.open(path, block_size=MIB, backend=backend) as s:
        s.put_many(items, partition="victim")
    s = blockstore.open(path, block_size=MIB, backend=backend)  # the victim block is sealed now
    for i in range(4):
        k = b"k%d" % i
        model[k] = v = value(k, 1, SIZE)
        s.put(k, v)
    return s, model


def _check(s: blockstore.Store, model: dict[bytes, bytes | None]) -> None:
    got = [None if v is None else bytes(v) for v in s.get_many(list(model))]
    assert got == list(model.values())
    assert sorted(s.iter_keys()) == sorted(k for k, v in model.items() if v is not None)
    assert s.stats().records == sum(v is not None for v in model.values())


def _check_reopened(path: Path, backend: str, model: dict[bytes, bytes | None]) -> None:
    with blockstore.open(path, block_size=MIB, backend=backend) as s:
        assert s.recovery_report is None
        _check(s, model)
        assert rebuild_violations(s) == []


@pytest.mark.parametrize("hook", ["compact.scan", "compact.copy"])
def test_gc_paused_mid_copy_loses_the_race_to_a_delete_and_an_overwrite(tmp_path: Path, backend: str,
                                                                       hook: str) -> None:
    s, model = _gc_victim(tmp_path, backend)
    try:
        victim = next(e for e in s.block_table() if e.partition.endswith(b"victim"))
        c = attach(s, GC_ONLY, background=False)
        with paused_pass(c, hook, "gc") as (pause, out):
            assert pause.args == ("gc", victim.block_id, 4)  # k4..k7 are what is left to copy
            assert s.delete(b"k4")  # deleted while GC holds (or is about to read) its bytes
            model[b"k4"] = None
            model[b"k5"] = v = value(b"k5", 2, SIZE)  # overwritten likewise
            s.put(b"k5", v)
        assert "error" not in out, out
        rep: PassReport = out["report"]
        assert rep.gc_blocks == 1
        assert rep.lost_races == 2
        assert rep.gc_records == 2  # k6 and k7 moved
        assert rep.reclaimed_blocks == 1
        assert c.totals.lost_races == 2
        assert victim.block_id not in {e.block_id for e in s.block_table()}
        _check(s, model)
        assert rebuild_violations(s) == []
        c.stop()
    finally:
        s.close()
    _check_reopened(tmp_path, backend, model)


def test_the_store_s_own_background_compactor_loses_the_race_too(tmp_path: Path) -> None:
    """The same race, with the thread `blockstore.open(..., compaction=...)` starts paused at the hook."""
    s, model = _gc_victim(tmp_path, "native")
    s.close()
    pause = Pause("gc")
    with hooks.installed("compact.copy", pause):
        s = blockstore.open(tmp_path, block_size=MIB, compaction={**GC_ONLY, "interval_s": 0.005})
        try:
            assert pause.paused.wait(20)
            c = s.compactor
            assert s.delete(b"k4")
            model[b"k4"] = None
            model[b"k5"] = v = value(b"k5", 2, SIZE)
            s.put(b"k5", v)
            pause.resume.set()
            deadline = time.monotonic() + 20
            while c.totals.lost_races < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert c.totals.lost_races == 2 and c.totals.gc_records == 2
            assert c.last_error is None
            _check(s, model)
        finally:
            pause.resume.set()
            s.close()
    _check_reopened(tmp_path, "native", model)


def _scattered_group(path: Path, backend: str, keys: list[bytes], *, seal: bool = False
                     ) -> tuple[blockstore.Store, dict[bytes, bytes | None]]:
    """Each key of the group in a block of its own (its own partition)."""
    model: dict[bytes, bytes | None] = {}
    s = blockstore.open(path, block_size=MIB, backend=backend)
    for i, k in enumerate(keys):
        model[k] = v = value(k, 0, SIZE)
        s.put(k, v, partition=f"p{i}")
    if seal:
        s.close()
        s = blockstore.open(path, block_size=MIB, backend=backend)
    return s, model


@pytest.mark.parametrize("hook", ["compact.scan", "compact.copy"])
def test_relocation_paused_mid_copy_loses_the_race_to_a_delete_and_an_overwrite(tmp_path: Path, backend: str,
                                                                               hook: str) -> None:
    keys = [b"g0", b"g1", b"g2", b"g3"]
    s, model = _scattered_group(tmp_path, backend, keys)
    try:
        c = attach(s, RELOCATE_ONLY, background=False)
        s.get_many(keys)  # one request: the group is learned, and due (min_hits=1)
        [group] = c.tracker.due(1)
        with paused_pass(c, hook, "relocate") as (pause, out):
            assert pause.args == ("relocate", group.gid, 4)
            assert s.delete(b"g1")
            model[b"g1"] = None
            model[b"g2"] = v = value(b"g2", 1, SIZE)
            s.put(b"g2", v)
        assert "error" not in out, out
        rep: PassReport = out["report"]
        assert rep.relocated_groups == 1
        assert rep.lost_races == 2
        assert rep.relocated_records == 2
        locs = s.locate_many([b"g0", b"g3"])
        assert locs[0] is not None and locs[1] is not None
        assert locs[0].block_id == locs[1].block_id  # what did move, moved together
        _check(s, model)
        assert rebuild_violations(s) == []
    finally:
        s.close()
    _check_reopened(tmp_path, backend, model)


def test_a_race_lost_by_every_record_of_a_victim(tmp_path: Path) -> None:
    """Paused after it read the payloads, GC sees every remaining live record deleted: the victim is
    reclaimed by the engine under it, and the pass still ends cleanly with every move a lost race."""
    s, model = _gc_victim(tmp_path, "native")
    try:
        c = attach(s, GC_ONLY, background=False)
        with paused_pass(c, "compact.copy", "gc") as (_pause, out):
            for i in range(4, 8):
                assert s.delete(b"k%d" % i)
                model[b"k%d" % i] = None
        assert "error" not in out, out
        assert out["report"].lost_races == 4 and out["report"].gc_records == 0
        _check(s, model)
    finally:
        s.close()
    _check_reopened(tmp_path, "native", model)


@pytest.mark.parametrize("phase", ["gc", "relocate"])
def test_source_block_emptied_between_scan_and_copy(tmp_path: Path, phase: str) -> None:
    if phase == "gc":
        s, model = _gc_victim(tmp_path, "native")
        doomed = [b"k%d" % i for i in range(4, 8)]  # every live record of the victim
        spec = GC_ONLY
    else:
        keys = [b"g0", b"g1", b"g2"]
        s, model = _scattered_group(tmp_path, "native", keys, seal=True)
        doomed = [b"g1"]  # the only record of its (sealed) block
        spec = RELOCATE_ONLY
    try:
        c = attach(s, spec, background=False)
        if phase == "relocate":
            s.get_many(list(model))
        with paused_pass(c, "compact.scan", phase) as (_pause, out):
            for k in doomed:
                model[k] = v = value(k, 9, SIZE)
                s.put(k, v)
        if "error" in out:
            raise out["error"]
        assert out["report"].lost_races >= len(doomed)  # at least the changed keys; nothing raised
        _check(s, model)
        if phase == "relocate":  # the group is still co-located once it is requested again
            s.get_many(list(model))
            c.run_pass()
            assert len({loc.block_id for loc in s.locate_many(list(model)) if loc}) == 1
            _check(s, model)
    finally:
        s.close()


def test_relocation_set_stays_in_one_block_when_its_first_record_lost_the_race(tmp_path: Path) -> None:
    s = blockstore.open(tmp_path, block_size=MIB)
    try:
        c = attach(s, RELOCATE_ONLY, background=False)
        size = 230_000  # three of them fill ~70 % of a block: two groups never fit in one
        first = [b"a0", b"a1", b"a2"]
        second = [b"b0", b"b1", b"b2"]
        for i, k in enumerate(first + second):
            s.put(k, value(k, 0, size), partition=f"p{i % 3}")
        s.get_many(first)
        assert c.run_pass().relocated_groups == 1  # the relocation stream's open block is ~70 % full
        s.get_many(second)
        with paused_pass(c, "compact.copy", "relocate"):
            s.put(b"b0", b"newer")  # the group's oldest record: the first move of the set
        b1, b2 = s.locate_many([b"b1", b"b2"])
        assert b1 is not None and b2 is not None
        assert s.get(b"b0") == b"newer"
        assert b1.block_id == b2.block_id, "the records of one relocation set were split over two blocks"
    finally:
        s.close()
