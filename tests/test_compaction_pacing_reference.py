"""What pacing judges the foreground against (issue 16): a pass with no idle reference probes for one
before copying, reads made while the pacer waits join the reference, and the interpreter switches
threads faster only while a paced pass runs. No timing is asserted: reads are given durations."""

from __future__ import annotations

import sys
import threading

from blockstore.compaction.pacing import FAST_SWITCH_S, MIN_READS, SWITCH_INTERVAL, ForegroundPacing, Pacer


def test_a_pass_with_no_idle_reads_probes_the_foreground_first() -> None:
    calls = []

    def reads(since: float) -> list[float]:  # none before the pass (a store opened with a backlog), then some
        calls.append(since)
        return [0.002] * MIN_READS if len(calls) > 1 else []

    pacing = ForegroundPacing(reads)
    pacer = pacing.pacer(64e6, threading.Event())
    try:
        assert pacer.idle_p99 == 0.002  # judged against what the probe saw, not copying blind
    finally:
        pacing.pass_done(pacer)


def test_a_quiet_store_is_not_probed_forever() -> None:
    pacing = ForegroundPacing(lambda since: [])
    pacer = pacing.pacer(64e6, threading.Event())
    pacing.pass_done(pacer)
    assert pacer.idle_p99 is None and pacer.rate == 64e6  # nobody reads: nothing to protect, full rate


def test_reads_made_while_the_pacer_waits_refresh_the_reference() -> None:
    durations = [0.001] * 20
    pacer = Pacer(1e6, None, reads=lambda since: list(durations), idle_p99=0.001)
    durations[:] = [0.010] * 200  # the machine got slower; nothing is being copied while the bucket waits
    pacer(20_000)  # 20 ms wait at 1 MB/s
    assert pacer.idle_p99 == 0.010
    stopped = threading.Event()
    stopped.set()
    quick = Pacer(1e6, stopped, reads=lambda since: [0.5] * 20, idle_p99=0.001)
    quick(20_000)  # a wait cut short (stop set): its reads may have waited on the copy, not a reference
    assert quick.idle_p99 == 0.001


def test_the_fast_switch_interval_holds_only_while_paced_passes_run() -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        a, b = ForegroundPacing(lambda since: []), ForegroundPacing(lambda since: [])
        pa = a.pacer(64e6, threading.Event())
        assert sys.getswitchinterval() == FAST_SWITCH_S
        pb = b.pacer(64e6, threading.Event())  # a second store's pass in the same process
        a.pass_done(pa)
        assert sys.getswitchinterval() == FAST_SWITCH_S  # b's pass still runs
        b.pass_done(pb)
        b.pass_done(None)  # a pass without a pacer ends: nothing to give back
        assert sys.getswitchinterval() == 0.005
        assert SWITCH_INTERVAL._users == 0
    finally:
        sys.setswitchinterval(before)
