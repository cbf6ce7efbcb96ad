"""Named hook points: no-ops unless a test (or the crash harness) registers a callback.

The engine fires them at phase boundaries so tests can force races deterministically and the crash
harness can kill a writer at a precise point. Names in use:

- write.begin, write.appended, write.before_directory, write.committed   (the write path)
- read.located                                                             (between lookup and read)
- block.delete                                                             (before a block is removed)
- evict.begin, evict.written                                                (Store.evict_blocks: before its directory write, after it)
- recovery.scanned                                                         (after a block's scan)
- compact.scan, compact.copy, compact.repoint, compact.reclaim             (compaction's phases; args:
  "gc" or "relocate", the block or group id, a count)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_callbacks: dict[str, list[Callable[..., Any]]] = {}


def fire(name: str, *args: Any) -> None:
    cbs = _callbacks.get(name)
    if cbs:
        for cb in list(cbs):
            cb(*args)


def register(name: str, callback: Callable[..., Any]) -> None:
    _callbacks.setdefault(name, []).append(callback)


def unregister(name: str, callback: Callable[..., Any]) -> None:
    cbs = _callbacks.get(name, [])
    if callback in cbs:
        cbs.remove(callback)


@contextmanager
def installed(name: str, callback: Callable[..., Any]) -> Iterator[None]:
    register(name, callback)
    try:
        yield
    finally:
        unregister(name, callback)
