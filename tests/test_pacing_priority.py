"""The background compactor thread's CPU priority (issue 16, "a foreground that does not notice"): its passes
run under SCHED_IDLE, a pass starved of CPU is put back to normal priority by a watchdog, and a caller's
own pass (the CLI's `compact`, `run_until_idle`) never changes the caller's thread."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

import blockstore
from blockstore.compaction import pacing as pacing_mod
from blockstore.compaction.pacing import STARVE_S, ForegroundPacing, Pacer, ThreadPriority, idle_reversible, spare_cpu

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
# leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE (sched(7)); without them the thread keeps normal
# priority (tests/test_review_session23.py checks that case)
reversible = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or not idle_reversible(),
                                reason="this process cannot leave SCHED_IDLE again")


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """Run fn() in a fresh thread (priorities set there die with it); return what it returned."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@reversible
def test_idle_then_normal_changes_only_the_calling_thread() -> None:
    me = threading.get_native_id()
    stop = threading.Event()

    def body() -> tuple[int, int, str, bool]:
        p = ThreadPriority(stop)
        p.idle()
        during = os.sched_getscheduler(p.tid)
        p.normal()
        p.idle()  # within HOLD_S of being put back: stays normal
        return during, os.sched_getscheduler(p.tid), p.mode, p.normal_until > time.monotonic()

    try:
        during, after, mode, held = _in_thread(body)
    finally:
        stop.set()
    assert during == os.SCHED_IDLE
    assert (after, mode, held) == (os.SCHED_OTHER, "normal", True)
    assert os.sched_getscheduler(me) == os.SCHED_OTHER  # the caller was never touched


@reversible
def test_sched_idle_only_while_the_machine_is_not_oversubscribed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle-priority thread on an oversubscribed machine starves, and starved while holding the GIL it
    stalls the reader: a pass starts at normal priority there, and under SCHED_IDLE otherwise."""
    cpus = len(os.sched_getaffinity(0))
    stop = threading.Event()
    load = [cpus + 3.0]
    monkeypatch.setattr(pacing_mod.os, "getloadavg", lambda: (load[0], 0.0, 0.0))

    def body() -> list[tuple[str, int]]:
        p = ThreadPriority(stop)
        seen = []
        for value in (cpus + 3.0, cpus - 0.5, cpus + 0.5):
            load[0] = value
            p.choose()
            seen.append((p.mode, os.sched_getscheduler(p.tid)))
        return seen

    try:
        assert not spare_cpu()
        seen = _in_thread(body)
    finally:
        stop.set()
    assert seen == [("normal", os.SCHED_OTHER), ("idle", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)]


@reversible
def test_the_watchdog_puts_a_starved_pass_back_to_normal_priority() -> None:
    """A pass that shows no progress for STARVE_S (outside the pacer's waits) under SCHED_IDLE: the
    watchdog, a thread of normal priority, puts it back. Starvation is simulated by a thread that
    simply stops reporting progress (a loaded machine is not something a test can order)."""
    stop = threading.Event()
    seen: dict[str, object] = {}
    began = threading.Event()
    release = threading.Event()

    def compactor_thread() -> None:
        p = ThreadPriority(stop)
        seen["p"] = p
        p.idle()
        p.working()  # a pass begins ...
        began.set()
        release.wait(10)  # ... and makes no progress
        seen["policy"] = os.sched_getscheduler(p.tid)

    t = threading.Thread(target=compactor_thread)
    t.start()
    try:
        began.wait(5)
        p = seen["p"]
        assert isinstance(p, ThreadPriority)
        deadline = time.monotonic() + STARVE_S * 6
        while p.mode == "idle" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.mode == "normal" and p.starved == 1
    finally:
        release.set()
        t.join()
        stop.set()
    assert seen["policy"] == os.SCHED_OTHER


@linux_only
def test_a_resting_pass_is_not_starved() -> None:
    stop = threading.Event()
    try:
        p = _in_thread(lambda: ThreadPriority(stop))
        p.mode = "idle"  # as if idle() had run in that thread (gone now)
        p.working()
        p.rest(20 * STARVE_S)  # the pacer waits: no progress expected meanwhile
        assert not p.is_starved(time.monotonic() + 10 * STARVE_S)
        assert p.is_starved(time.monotonic() + 22 * STARVE_S)  # its rest is over, and it has not woken
        p.working()
        assert not p.is_starved(time.monotonic())
        assert p.is_starved(time.monotonic() + 2 * STARVE_S)
    finally:
        stop.set()


def test_the_pacer_marks_progress_and_rest_on_its_priority() -> None:
    rec = _Recorder()
    pacer = Pacer(1e12, None, priority=rec)  # type: ignore[arg-type]
    pacer(0)  # a batch copied (an empty one: the bucket never waits for it)
    pacer.wait(0.001)
    assert rec.calls == ["working", "rest", "working"]


class _Recorder:
    """A priority that records what the pacer tells it (a unit-test aid beside the real one above)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def working(self) -> None:
        self.calls.append("working")

    def rest(self, _seconds: float) -> None:
        self.calls.append("rest")


@reversible
def test_the_background_thread_runs_its_passes_under_sched_idle(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing_mod.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine
    with blockstore.open(str(tmp_path / "s"), block_size=1 << 20,
                         compaction={"policy": "full", "interval_s": 0.01}) as s:
        s.put_many([(b"k%03d" % i, os.urandom(4096)) for i in range(64)])
        deadline = time.monotonic() + 10
        while s.compactor.pacing.priority is None and time.monotonic() < deadline:
            time.sleep(0.01)
        prio = s.compactor.pacing.priority
        while prio is not None and prio.mode != "idle" and time.monotonic() < deadline:  # its first pass
            time.sleep(0.01)
        assert prio is not None and prio.mode == "idle"
        thread = next(t for t in threading.enumerate() if t.name == "blockstore-compactor")
        assert thread.native_id == prio.tid
        assert os.sched_getscheduler(prio.tid) == os.SCHED_IDLE
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


@linux_only
def test_a_callers_pass_leaves_the_callers_priority_alone(tmp_path: Path) -> None:
    pacing = ForegroundPacing(lambda _since: [])

    def body() -> tuple[int, bool]:
        pacer = pacing.pacer(64e6, None)  # no background_thread() here: a caller's pass
        pacing.pass_done(pacer)
        return os.sched_getscheduler(threading.get_native_id()), pacer.priority is None

    policy, no_priority = _in_thread(body)
    assert policy == os.SCHED_OTHER and no_priority

    def other_threads_pass() -> bool:
        pacer = pacing.pacer(64e6, None)
        pacing.pass_done(pacer)
        return pacer.priority is None

    def background_then_other() -> tuple[bool, bool]:
        pacing.background_thread(stop, 0.01)
        pacer = pacing.pacer(64e6, None)  # the background thread's own pass has its priority
        pacing.pass_done(pacer)
        return pacer.priority is pacing.priority, _in_thread(other_threads_pass)

    before = sys.getswitchinterval()
    stop = threading.Event()
    try:
        assert _in_thread(background_then_other) == (True, True)
    finally:
        stop.set()
    assert sys.getswitchinterval() == before  # every pass gave the fast switch interval back
