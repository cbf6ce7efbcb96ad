"""Pacing of background compaction by what the foreground sees (issue 16).

A background pass copies at most the policy's rate, and less while the store's reads are slower than
they are while nothing is copied: `ForegroundPacing` keeps those idle read durations between passes
and hands each background pass a `Pacer`, which the pass calls with the bytes of each copied batch.
Five things keep a reader from noticing a pass:
- the reference: the reads made while no pass ran, and those made while a pass waited between batches
  (so it follows the machine's load as it drifts); a pass that finds none first waits up to PROBE_S
  for some, rather than copying blind at full rate (a store opened with a backlog did exactly that);
- the rate: halved while the reads since the last batch have a p99 over FG_P99_TARGET x the idle p99,
  climbing back (x1.25) while they do not;
- the interpreter's switch interval, FAST_SWITCH_S while a paced pass runs: a reader waiting for the
  GIL held by the copying thread waited up to the default 5 ms, which is what its p99 saw (and at
  0.5 ms, a read that takes the GIL back after each of its C calls still waited that long each time);
- the background thread's CPU priority (`ThreadPriority`): SCHED_IDLE while the machine is not
  oversubscribed, so the copying takes only CPU time nothing else wants and waits for the reader rather
  than the reader for it; normal priority on an oversubscribed machine, and for a pass starved of CPU
  for STARVE_S;
- the GIL: the background thread's passes run marked background (`blockstore.foreground`), so at the
  checkpoints of its Python work (relocation's planning, the group commit it leads, its reads, GC's
  batches) it sleeps while a foreground read is in flight, and the reader's C calls come back to a free GIL.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from blockstore import foreground, metrics

_log = logging.getLogger("blockstore.compaction")

FG_P99_TARGET = 1.5  # foreground read p99 during compaction / while idle that pacing aims under
IDLE_READS = 2048  # durations of reads made while nothing was copied, kept as the foreground's idle reference
MIN_READS = 8  # reads needed before a p99 is trusted (fewer: pacing keeps its rate)
PROBE_S = 0.25  # the longest a pass with no idle reference waits, before copying, to see the foreground
SETTLE_S = 0.002  # a read ending this soon after a copy may have waited on it: not an idle reference
FAST_SWITCH_S = 0.000125  # the interpreter's switch interval while a paced pass runs (whole microseconds)
STARVE_S = 0.5  # a pass showing no progress this long (its pacer's waits aside) leaves SCHED_IDLE
HOLD_S = 10.0  # ... for this long (ThreadPriority)
_REFRESH_EVERY = 64  # new idle reads between two computations of the idle p99 (a sort of up to 2,048)

RecentReads = Callable[[float], list[float]]  # durations of the reads made since a perf_counter() time


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


class _SwitchInterval:
    """Process-wide: the interpreter switches threads every FAST_SWITCH_S while any paced pass runs (of
    any store in the process), and goes back to what it was when the last one ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, FAST_SWITCH_S))
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


SWITCH_INTERVAL = _SwitchInterval()


def spare_cpu() -> bool:
    """Whether the machine is not oversubscribed: a 1-minute load average below the CPUs this process may
    use, so an idle-priority thread still finds CPU time. False where either is unknown."""
    try:
        return os.getloadavg()[0] < len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return False


@functools.cache
def idle_reversible() -> bool:
    """Whether a thread of this process put under SCHED_IDLE can be put back to normal priority: leaving
    SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE that allows nice 0 (sched(7)), which a server run by an
    ordinary user lacks (RLIMIT_NICE is 0 by default). Tried once, on a thread of its own that ends
    (H24's finding and fix)."""
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_IDLE"):
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, name="blockstore-priority-probe")
    t.start()
    t.join()
    return ok[0]


class ThreadPriority:
    """The background compactor thread's CPU priority (Linux; a no-op elsewhere). `idle()`: SCHED_IDLE, so
    the thread runs only on a CPU nothing else wants: on this project's 2-core VM one thread of C work
    with the GIL released took a closed-loop reader's get p99 from 0.7 to 2.9-8.6 ms, and to 0.75 ms
    under SCHED_IDLE (bench/README.md, "Foreground p99 during compaction"). A machine whose CPUs other
    work keeps busy leaves such a thread none, and a starved thread may hold the GIL the reader waits
    for: a watchdog thread puts it back to normal priority (SCHED_OTHER) once a pass has shown no
    progress for STARVE_S outside the pacer's own waits, and it stays there for HOLD_S."""

    def __init__(self, stop: threading.Event) -> None:
        self.tid = threading.get_native_id()
        self.mode = "normal"
        self.progress = time.monotonic()  # the last sign of progress: a batch copied, a pass begun
        self.due: float | None = None  # resting (between passes, in the pacer's wait) until then
        self.normal_until = 0.0
        self.starved = 0  # passes put back to normal priority
        self._stop = stop
        self._watchdog: threading.Thread | None = None

    def choose(self) -> None:
        """At a pass's start: SCHED_IDLE while the machine is not oversubscribed (`spare_cpu`) and no
        starved pass was put back within HOLD_S; else normal priority. On an oversubscribed machine an
        idle thread starves, and one starved while it holds the GIL stalls the reader waiting for it
        (measured with a first version at a load average of 3-6 on 2 cores: busy phases with no
        compaction at all, others with a get p99 of 14-272 ms)."""
        if spare_cpu():
            self.idle()
        elif self.mode == "idle" and self._set(getattr(os, "SCHED_OTHER", None)):
            self.mode = "normal"

    def idle(self) -> None:
        """SCHED_IDLE (unless a starved pass put the thread back less than HOLD_S ago); starts the watchdog."""
        # never a priority the thread could not leave: the watchdog and an oversubscribed machine need normal()
        if (self.mode != "idle" and time.monotonic() >= self.normal_until and idle_reversible()
                and self._set(getattr(os, "SCHED_IDLE", None))):
            self.mode = "idle"
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="blockstore-compactor-watchdog",
                                                  daemon=True)
                self._watchdog.start()

    def normal(self) -> None:
        if self.mode == "idle" and self._set(getattr(os, "SCHED_OTHER", None)):
            self.mode = "normal"
            self.normal_until = time.monotonic() + HOLD_S

    def working(self) -> None:
        self.progress = time.monotonic()
        self.due = None

    def rest(self, seconds: float) -> None:
        """The thread sleeps `seconds` by choice; from then on it should be working again."""
        self.due = time.monotonic() + seconds

    def is_starved(self, now: float) -> bool:
        """Under SCHED_IDLE and neither progressing nor back from a rest for STARVE_S (a thread that
        never gets a CPU never starts its next pass either)."""
        since = self.progress if self.due is None else max(self.progress, self.due)
        return self.mode == "idle" and now - since > STARVE_S

    def _watch(self) -> None:
        while not self._stop.wait(STARVE_S / 4):
            if self.is_starved(time.monotonic()):
                self.starved += 1
                _log.debug("compactor thread starved under SCHED_IDLE for %.1f s: normal priority for %.0f s",
                           STARVE_S, HOLD_S)
                self.normal()

    def _set(self, policy: int | None) -> bool:
        if policy is None or not hasattr(os, "sched_setscheduler"):
            return False
        try:
            os.sched_setscheduler(self.tid, policy, os.sched_param(0))  # Linux: a TID names that thread
        except OSError as exc:  # not permitted here: the thread keeps the priority it has
            _log.debug("compactor thread priority unchanged (%s)", exc)
            return False
        return True


class Pacer:
    """Token bucket on copied bytes: the background thread sleeps so its copies average `rate` B/s,
    and `rate` follows what the foreground sees (issue 16): after each batch, the reads made since the
    last one are compared with the idle reads; while their p99 is above FG_P99_TARGET x the idle p99
    the rate halves (down to 1/64 of the policy's), else it climbs back (x1.25, up to the policy's).
    Reads that end while the bucket waits join the idle reference. A fixed rate either slowed
    compaction for nothing on an idle store or let a busy one's get p99 reach 3-13x idle
    (bench/README.md, compaction)."""

    def __init__(self, rate_bytes_s: float, stop: threading.Event | None, *, start_rate: float | None = None,
                 reads: RecentReads | None = None, idle_p99: float | None = None,
                 idle: deque[float] | None = None, priority: ThreadPriority | None = None) -> None:
        self.max_rate = rate_bytes_s
        self.priority = priority
        self.rate = min(start_rate or rate_bytes_s, rate_bytes_s)
        self.stop = stop
        self.reads = reads
        self.idle = idle if idle is not None else deque(maxlen=IDLE_READS)
        self.idle_p99 = idle_p99
        self._new_idle = 0
        self.checked = time.perf_counter()
        self.free_at = time.monotonic()  # when the bucket has room for the next batch

    def __call__(self, nbytes: int) -> None:
        self._follow_foreground()
        if self.priority is not None:
            self.priority.working()
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + nbytes / self.rate
        ahead = self.free_at - now
        if ahead > 0:
            if metrics.enabled:
                metrics.compaction_paced(ahead)
            self.wait(ahead)

    def wait(self, seconds: float) -> None:
        """Sleep (until `stop` is set at most); the reads that end meanwhile, nothing being copied, are
        idle references."""
        began = time.perf_counter()
        if self.priority is not None:
            self.priority.rest(seconds)
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)
        if self.priority is not None:
            self.priority.working()
        if self.reads is not None and time.perf_counter() - began >= 5 * SETTLE_S:  # long enough to settle
            self.note_idle(self.reads(began + SETTLE_S))
            self.checked = max(self.checked, time.perf_counter())  # judged: those reads saw no copy

    def note_idle(self, durations: list[float]) -> None:
        self.idle.extend(durations)
        self._new_idle += len(durations)
        if len(self.idle) >= MIN_READS and (self.idle_p99 is None or self._new_idle >= _REFRESH_EVERY):
            self.idle_p99 = p99(self.idle)
            self._new_idle = 0

    def probe(self) -> None:
        """With no idle reference yet, wait up to PROBE_S for MIN_READS reads before the first copy
        (none come: nobody is reading, nothing to protect)."""
        if self.reads is None or self.idle_p99 is not None:
            return
        began = deadline = time.perf_counter()
        deadline += PROBE_S
        while time.perf_counter() < deadline and not (self.stop is not None and self.stop.is_set()):
            if len(self.reads(began)) >= MIN_READS:
                break
            time.sleep(PROBE_S / 10)
        self.note_idle(self.reads(began))
        self.checked = time.perf_counter()

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
    """What pacing remembers between passes: the durations of reads made while nothing was copied (the
    foreground's idle latency) and the rate the last background pass ended with."""

    def __init__(self, reads: RecentReads) -> None:
        self.reads = reads
        self.idle_reads: deque[float] = deque(maxlen=IDLE_READS)
        self.idle_since = time.perf_counter()
        self.paced_rate: float | None = None  # the copy rate the last background pass ended with
        self.priority: ThreadPriority | None = None  # the background thread's, once it runs
        self.interval_s = 0.0  # the background thread's rest between passes
        self._fast_switch = False

    def background_thread(self, stop: threading.Event, interval_s: float) -> None:
        """Called by the background thread as it starts: its passes (every `interval_s`) run under
        SCHED_IDLE (ThreadPriority) until `stop`."""
        self.priority = ThreadPriority(stop)
        self.interval_s = interval_s

    def idle_p99(self) -> float | None:
        """The p99 of the reads made while nothing was copied (None until MIN_READS were seen)."""
        now = time.perf_counter()
        self.idle_reads.extend(self.reads(self.idle_since))
        self.idle_since = now
        return p99(self.idle_reads) if len(self.idle_reads) >= MIN_READS else None

    def pacer(self, rate_bytes_s: float, stop: threading.Event | None) -> Pacer:
        """A background pass's pacer: it starts at the rate the last pass ended with, judged against the
        idle reads (probed for first if there are none yet); the fast switch interval holds until
        pass_done."""
        # the background thread's passes run under SCHED_IDLE; a caller's (run_until_idle, the CLI's
        # compact) keep the caller's priority
        on_thread = self.priority is not None and self.priority.tid == threading.get_native_id()
        priority = self.priority if on_thread else None
        if priority is not None:
            priority.choose()
            priority.working()
        pacer = Pacer(rate_bytes_s, stop, start_rate=self.paced_rate, reads=self.reads, idle_p99=self.idle_p99(),
                      idle=self.idle_reads, priority=priority)
        pacer.probe()
        if not self._fast_switch:
            SWITCH_INTERVAL.enter()
            self._fast_switch = True
        if priority is not None:  # the background thread's passes step aside for reads; a caller's never do
            foreground.background(stop)
        return pacer

    def pass_done(self, pacer: Pacer | None) -> None:
        """A pass ended: reads from now on are idle ones again."""
        foreground.foreground()
        if self._fast_switch:
            SWITCH_INTERVAL.leave()
            self._fast_switch = False
        if pacer is not None:
            self.paced_rate = pacer.rate
            if pacer.priority is not None:
                pacer.priority.rest(self.interval_s)
        self.idle_since = time.perf_counter()
