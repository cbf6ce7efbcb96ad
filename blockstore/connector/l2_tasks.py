"""The L2 adapter's task plumbing: LMCache submits store, lookup-and-lock and load tasks and collects their results
after the task's event fd fired. `TaskBoard` numbers the tasks, runs each on the pool it is given, publishes its
result and signals its kind's fd exactly once, failures included (a task that never signals hangs its prefetch
request with its locks and L1 buffers), and keeps the health counters of failed tasks.

A module of its own because this promise holds for every kind of task alike and owes nothing to what a task
does: the work is a callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2TaskId

from blockstore.connector.l2_state import AdapterState

_log = logging.getLogger("blockstore.connector")

KINDS = ("store", "lookup", "load")


class Notifier(Protocol):
    def notify(self) -> None: ...


class TaskBoard:
    """Tasks in flight and results not collected yet, by kind ("store", "lookup", "load"); under the state's lock.
    `notifiers` are the kinds' event fds (the adapter creates and closes them)."""

    def __init__(self, state: AdapterState, notifiers: dict[str, Notifier]) -> None:
        self._state = state
        self._notifiers = notifiers
        self._next_id: L2TaskId = 0
        self._done: dict[str, dict[L2TaskId, Any]] = {k: {} for k in KINDS}
        self.inflight = dict.fromkeys(KINDS, 0)

    def pop_all(self, kind: str) -> dict[L2TaskId, Any]:
        """Every result of `kind` not collected yet (LMCache collects stores this way)."""
        with self._state.lock:
            done, self._done[kind] = self._done[kind], {}
        return done

    def pop(self, kind: str, task_id: L2TaskId) -> Any:
        """The result of one task, None while it runs (or once collected)."""
        with self._state.lock:
            return self._done[kind].pop(task_id, None)

    def unread(self) -> dict[str, int]:
        """Results not collected yet, by kind (caller holds the state's lock)."""
        return {k: len(v) for k, v in self._done.items()}

    def submit(self, kind: str, pool: ThreadPoolExecutor, work: Callable[..., Any], keys: Sequence[ObjectKey],
                *rest: Sequence[Any]) -> L2TaskId:
        """Never raises: a task that cannot even start completes at once as a failure (and signals). The
        lists are copied: the caller may reuse its own."""
        with self._state.lock:
            task_id = self._next_id
            self._next_id += 1
            self.inflight[kind] += 1
            closed = self._state.closed
        n = 0
        try:
            keys = list(keys)
            n = len(keys)
            if closed:
                raise RuntimeError("the blockstore L2 adapter is closed")
            pool.submit(self._task, kind, task_id, work, keys, *(list(r) for r in rest))
        except Exception as exc:
            _log.error("blockstore L2: %s task %d not started: %s", kind, task_id, exc)
            self._complete(kind, task_id, self._failure(kind, n), f"{type(exc).__name__}: {exc}")
        return task_id

    def _task(self, kind: str, task_id: L2TaskId, work: Callable[..., Any], keys: list[ObjectKey],
              *rest: Any) -> None:
        result: Any = None
        error: str | None = None
        try:
            result = work(keys, *rest)
        except BaseException as exc:  # invisible to LMCache otherwise: record a failure and still signal
            _log.exception("blockstore L2: %s task %d failed", kind, task_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._complete(kind, task_id, self._failure(kind, len(keys)) if result is None else result, error)

    @staticmethod
    def _failure(kind: str, n: int) -> Any:
        return L2StoreResult(False, 0) if kind == "store" else Bitmap(n)

    def _complete(self, kind: str, task_id: L2TaskId, result: Any, error: str | None) -> None:
        """Publish the result, then signal its fd: the controller reads results only after the fd fired."""
        failed = error is not None or (kind == "store" and not result.is_successful())
        with self._state.lock:
            self.inflight[kind] -= 1
            if error is not None:
                self._state.counters.task_errors += 1
                self._state.last_error = error
            # health: a run of failed tasks (a full or failing disk) marks the adapter unhealthy
            self._state.consecutive_failures = self._state.consecutive_failures + 1 if failed else 0
            self._done[kind][task_id] = result
            notifier = self._notifiers[kind]
        try:
            notifier.notify()
        except (OSError, ValueError):  # closed (its fd is -1 then): nobody is listening any more
            _log.debug("blockstore L2: %s fd closed before task %d signalled", kind, task_id)
