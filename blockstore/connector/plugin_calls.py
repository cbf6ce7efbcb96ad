"""Where the in-process plugin's blocking store calls run: never on LMCache's event loop, reads on a small pool,
writes on one thread in the order LMCache issued them, each call counted so that closing waits for it.

A module of its own because it is the connector's concurrency contract, apart from what the calls do: the
connector hands it functions and asks it whether it is closed; nothing else touches the pools or the count.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

_WORKERS = 4
_T = TypeVar("_T")


class CallPools:
    """The read pool, the ordered writer and the count of calls under way, for the plugin named `name`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._closed = False
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._reads = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=f"blockstore-{name}")
        # Writes run one at a time, in the order LMCache issued them (its layer-wise store sends one
        # batch per layer without waiting; parallel writers would put layer 2 before layer 1). That also
        # keeps a batch's look-up-then-write duplicate check free of races with another batch.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"blockstore-{name}-w")

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., _T], *args: Any, write: bool = False) -> _T:
        """Run a blocking store call on the read pool (or, with `write`, the writer); RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"blockstore plugin {self._name} is closed")
            self._inflight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer if write else self._reads, fn, *args)
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()

    def close(self) -> bool:
        """Refuse new calls; False when already closed. `drain` then waits for the calls under way."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True

    def drain(self) -> None:
        """Wait for the calls under way and stop the threads (blocking: run it off the event loop)."""
        with self._lock:
            while self._inflight:
                self._idle.wait()
        self._reads.shutdown(wait=True)
        self._writer.shutdown(wait=True)
