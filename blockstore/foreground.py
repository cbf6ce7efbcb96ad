"""Foreground first (issue 16): the reads this process is serving now, and the background threads that step
aside for them.

A read is Python around C calls that release the GIL (directory lookup, block reads). After each one the
reader needs the GIL back, and while a background thread (the compactor) runs Python it waits up to a
switch interval for it, each time: on a quiet 16-core host that kept LoCoMo's get p99 at 2.2x idle
(bench/README.md, "On a quiet machine"), and shorter switch intervals did not help (taking turns more
often is still taking the reader's turn). So a background thread gives the reader its turn instead: at
checkpoints in its Python work (`step_aside`: each record the group commit it leads places and stages,
each block of its reads, each GC batch and victim, relocation's planning per cluster, group and record, every
STEP_EVERY entries of the block table it copies or a block's records it lists: `stepping`) it sleeps, GIL
released, while any read is in flight, so the reader's C calls come back to a free GIL. Checkpoints, not a
profile function on the thread: since Python 3.12, sys.setprofile on one thread instruments every thread's
code (a call-heavy loop in another thread ran 2.4x slower on 3.12.1, 2.8x on 3.13.0), which would slow the
very reads it protects.

One count for the process, not per store: every store of the process shares its GIL. A checkpoint does
not pause:
- on a thread not marked background (`background`), nor once its `stop` is set;
- where pausing would hold up the foreground instead: while a write or an `exclusive()` caller waits for
  the group-commit slot this thread leads, or another caller's write is in the group it applies
  (`leading`); checkpoints sit where no lock a read takes is held;
- for longer than MAX_WAIT_S at once: then the thread runs GRANT_S without pausing (the starvation bound:
  a reader that never stops leaves background work GRANT_S / (MAX_WAIT_S + GRANT_S) of the GIL at least,
  besides all it does with the GIL released).
With no read in flight a checkpoint costs one truth test of a deque.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

POLL_S = 0.0002  # the sleep between two looks at the reads in flight (each look takes the GIL)
MAX_WAIT_S = 0.0006  # the longest a background thread steps aside at once ...
GRANT_S = 0.0001  # ... before it runs this long without pausing
STEP_EVERY = 64  # items between two checkpoints of `stepping`

# one item per foreground read in progress (deque append and pop are atomic; its truth: any read in flight)
READS: deque[None] = deque()


class _Background(threading.local):
    on = False
    stop: threading.Event | None = None
    free_until = 0.0  # a grant: no pause before this perf_counter() time
    busy: Callable[[], bool] | None = None  # whether a write waits for the group commit this thread leads


class Stats:
    """What the background threads' checkpoints did (for the bench and tests)."""

    waits = 0  # pauses
    waited_s = 0.0
    grants = 0  # pauses that ended at MAX_WAIT_S with a read still in flight


_bg = _Background()
STATS = Stats()


def background(stop: threading.Event | None = None) -> None:
    """Mark the calling thread background (its checkpoints pause for reads) until `foreground()`; none
    after `stop` is set."""
    _bg.on, _bg.stop, _bg.free_until = True, stop, 0.0


def foreground() -> None:
    """The calling thread's checkpoints pause no more."""
    _bg.on, _bg.stop = False, None


@contextlib.contextmanager
def in_flight() -> Iterator[None]:
    """Count foreground work that reads outside `Reader.read` (a blend: its C layer readers, and the GPU ops
    its thread issues between them) as a read in flight while the block runs: background threads step
    aside for it as for a read."""
    READS.append(None)
    try:
        yield
    finally:
        READS.pop()


def is_background() -> bool:
    return _bg.on


def leading(busy: Callable[[], bool] | None) -> None:
    """The calling thread leads a group commit (`busy()`: a write waits for it), or no more (None)."""
    _bg.busy = busy


def step_aside() -> None:
    """A checkpoint: on a background thread, sleep while a read is in flight (up to MAX_WAIT_S), unless
    a write waits for the group commit it leads."""
    if not READS or not _bg.on:
        return
    now = time.perf_counter()
    busy = _bg.busy
    if now < _bg.free_until or (_bg.stop is not None and _bg.stop.is_set()) or (busy is not None and busy()):
        return
    began, deadline = now, now + MAX_WAIT_S
    while READS:
        if now >= deadline:
            _bg.free_until = now + GRANT_S
            STATS.grants += 1
            break
        time.sleep(POLL_S)
        now = time.perf_counter()
        if busy is not None and busy():  # a write queued meanwhile for the slot this thread leads
            break
    STATS.waits += 1
    STATS.waited_s += now - began


T = TypeVar("T")


def stepping(items: Iterable[T], every: int = STEP_EVERY) -> Iterator[T]:
    """`items`, with a checkpoint before every `every`-th one (a long loop of Python over a table)."""
    for i, x in enumerate(items):
        if i % every == 0:
            step_aside()
        yield x
