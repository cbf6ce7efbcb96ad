"""Pacing of background compaction by what the foreground sees (issue 16).

A background pass copies at most the policy's rate, and less while the store's reads are slower than
they were while no pass ran: `ForegroundPacing` keeps those idle read durations between passes and
hands each background pass a `Pacer`, which the pass calls with the bytes of each copied batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from blockstore import metrics

FG_P99_TARGET = 1.5  # foreground read p99 during compaction / while idle that pacing aims under
IDLE_READS = 2048  # durations of reads made while no pass ran, kept as the foreground's idle reference
MIN_READS = 8  # reads needed before a p99 is trusted (fewer: pacing keeps its rate)

RecentReads = Callable[[float], list[float]]  # durations of the reads made since a perf_counter() time


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


class Pacer:
    """Token bucket on copied bytes: the background thread sleeps so its copies average `rate` B/s,
    and `rate` follows what the foreground sees (issue 16): after each batch, the reads made since the
    last one are compared with the reads made while no pass ran; while their p99 is above
    FG_P99_TARGET x the idle p99 the rate halves (down to 1/64 of the policy's), else it climbs back
    (x1.25, up to the policy's). A fixed rate either slowed compaction for nothing on an idle store
    or let a busy one's get p99 reach 3-13x idle (bench/README.md, compaction)."""

    def __init__(self, rate_bytes_s: float, stop: threading.Event | None, *, start_rate: float | None = None,
                 reads: RecentReads | None = None, idle_p99: float | None = None) -> None:
        self.max_rate = rate_bytes_s
        self.rate = min(start_rate or rate_bytes_s, rate_bytes_s)
        self.stop = stop
        self.reads = reads
        self.idle_p99 = idle_p99
        self.checked = time.perf_counter()
        self.free_at = time.monotonic()  # when the bucket has room for the next batch

    def __call__(self, nbytes: int) -> None:
        self._follow_foreground()
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + nbytes / self.rate
        ahead = self.free_at - now
        if ahead > 0:
            if metrics.enabled:
                metrics.compaction_paced(ahead)
            if self.stop is not None:
                self.stop.wait(ahead)
            else:
                time.sleep(ahead)

    def _follow_foreground(self) -> None:
        if self.reads is None or self.idle_p99 is None:
            return
        now = time.perf_counter()
        recent = self.reads(self.checked)
        if len(recent) < MIN_READS:
            return  # too few reads to judge: keep the rate, and judge these with the next ones
        self.checked = now
        slow = p99(recent) > FG_P99_TARGET * self.idle_p99
        if slow:
            self.rate = max(self.rate / 2, self.max_rate / 64)
        else:
            self.rate = min(self.rate * 1.25, self.max_rate)
        if metrics.enabled:
            metrics.compaction_guard(self.rate, slowed=slow)


class ForegroundPacing:
    """What pacing remembers between passes: the durations of reads made while no pass ran (the
    foreground's idle latency) and the rate the last background pass ended with."""

    def __init__(self, reads: RecentReads) -> None:
        self.reads = reads
        self.idle_reads: deque[float] = deque(maxlen=IDLE_READS)
        self.idle_since = time.perf_counter()
        self.paced_rate: float | None = None  # the copy rate the last background pass ended with

    def idle_p99(self) -> float | None:
        """The p99 of the reads made while no pass ran (None until MIN_READS were seen)."""
        now = time.perf_counter()
        self.idle_reads.extend(self.reads(self.idle_since))
        self.idle_since = now
        return p99(self.idle_reads) if len(self.idle_reads) >= MIN_READS else None

    def pacer(self, rate_bytes_s: float, stop: threading.Event | None) -> Pacer:
        """A background pass's pacer: it starts at the rate the last pass ended with, judged against the
        reads made since then (no pass ran meanwhile: the foreground's idle latency)."""
        return Pacer(rate_bytes_s, stop, start_rate=self.paced_rate, reads=self.reads, idle_p99=self.idle_p99())

    def pass_done(self, pacer: Pacer | None) -> None:
        """A pass ended: reads from now on are idle ones again."""
        if pacer is not None:
            self.paced_rate = pacer.rate
        self.idle_since = time.perf_counter()
