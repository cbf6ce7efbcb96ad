"""Background compaction paces itself by the foreground's measured read latency (issue 16): the copy
rate halves while reads during a pass are slower than FG_P99_TARGET x their idle p99, and climbs back
when they are not. Timings are not asserted: the pacer is driven with given read durations."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import blockstore
from blockstore.compaction import Compactor
from blockstore.compaction.pacing import FG_P99_TARGET, Pacer


def test_the_copy_rate_follows_foreground_latency() -> None:
    durations: list[float] = []
    stop = threading.Event()
    stop.set()  # the bucket's waits return at once
    pacer = Pacer(64e6, stop, reads=lambda since: list(durations), idle_p99=0.001)
    durations[:] = [0.001 * FG_P99_TARGET * 3] * 20
    for _ in range(3):
        pacer(1 << 20)
    assert pacer.rate == 64e6 / 8
    for _ in range(20):
        pacer(1 << 20)
    assert pacer.rate == 64e6 / 64  # never below 1/64 of the policy's rate
    durations[:] = [0.001] * 20
    for _ in range(40):
        pacer(1 << 20)
    assert pacer.rate == 64e6  # back to the policy's, never above
    durations[:] = [0.5] * 3  # too few reads to judge: the rate stays
    pacer(1 << 20)
    assert pacer.rate == 64e6


def test_reads_are_timed_and_a_background_pass_judges_against_idle_reads(tmp_path: Path) -> None:
    with blockstore.open(tmp_path, compaction={"policy": "full", "background": False}) as s:
        s.put_many([(b"k%d" % i, b"v" * 1000) for i in range(4)])
        t0 = time.perf_counter()
        for _ in range(10):
            s.get_many([b"k0", b"k1"])
        s.get_chunks([("u", "s", "c")])
        recent = s.recent_reads(t0)
        assert len(recent) == 11 and all(d > 0 for d in recent)
        assert s.recent_reads(time.perf_counter()) == []
        c = s.compactor
        assert isinstance(c, Compactor)
        pacer = c.pacing.pacer(64e6, None)
        assert pacer.idle_p99 is not None and min(recent) <= pacer.idle_p99 <= max(recent)
        c.run_pass(pace=True)
        assert c.pacing.paced_rate is not None
