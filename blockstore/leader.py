"""The group-commit queue and its one leader slot (docs/format.md §3).

Callers enqueue mutations; one thread at a time holds the leader slot and applies everything queued,
then wakes every caller of the group: in `sync` mode concurrent writers so share fsyncs. Work that
must not interleave with a group (close, a synced directory write for moves, reclaiming blocks)
takes the same slot with `exclusive()`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blockstore import foreground
from blockstore.errors import StoreClosed
from blockstore.mutations import Mutation


@dataclass(slots=True)
class _Group:
    mutations: list[Mutation]
    done: bool = False
    error: BaseException | None = None


def _always() -> bool:
    return True


class LeaderSlot:
    """The group-commit queue and its one leader slot."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: list[_Group] = []
        self._leader = False
        self._last = False  # exclusive(last=True) began: no group leads any more (the store is closing)
        self._exclusive_waiting = 0  # callers of exclusive() waiting for the slot

    def submit(self, muts: list[Mutation], apply: Callable[[list[Mutation]], None],
               may_lead: Callable[[], None]) -> None:
        """Queue `muts`, and either lead a group (`apply` all that is queued) or wait for the leader that
        applies ours. `may_lead()` raises if this caller must not lead (the store was closed meanwhile).
        A group's error is raised in every caller of the group."""
        group = _Group(muts)
        with self._cv:
            self._queue.append(group)
            while not group.done:
                if self._leader:
                    self._cv.wait()
                    continue
                may_lead()
                if self._last:
                    self._queue.remove(group)
                    raise StoreClosed("the store was closed while this write waited (not written)")
                self._leader = True
                batch, self._queue = self._queue, []
                self._cv.release()
                error: BaseException | None = None
                # a background leader pauses for reads only while no other caller waits: for the slot, or for
                # this batch (it holds every group queued when the slot was taken)
                foreground.leading(self.waiting if len(batch) == 1 else _always)
                try:
                    apply([m for g in batch for m in g.mutations])
                except BaseException as exc:  # delivered to every caller of the group
                    error = exc
                finally:
                    foreground.leading(None)
                    self._cv.acquire()
                    self._leader = False
                    for g in batch:
                        g.done = True
                        g.error = error
                    self._cv.notify_all()
        if group.error is not None:
            raise group.error

    def waiting(self) -> bool:
        """Whether a write or an `exclusive()` caller waits for the leader slot (a snapshot, read without the
        lock): a background leader does not pause for reads meanwhile (foreground.py)."""
        return bool(self._queue) or self._exclusive_waiting > 0

    @contextmanager
    def exclusive(self, *, last: bool = False) -> Iterator[None]:
        """Hold the leader slot: no group is applied meanwhile. `last` (close): nor after it, and writes waiting
        for the slot are refused at once (they kept it from close, which waited seconds behind a busy writer,
        and one that led after close's last seal wrote a block left open in a store marked clean)."""
        with self._cv:
            self._last = self._last or last
            self._exclusive_waiting += 1
            try:
                while self._leader:
                    self._cv.wait()
            finally:
                self._exclusive_waiting -= 1
            self._leader = True
        try:
            yield
        finally:
            with self._cv:
                self._leader = False
                self._cv.notify_all()
