"""Listeners of the L2 adapter (LMCache's eviction): the replay of the records already held to a listener that
registers late, and the delivery of later changes, each key told exactly once.

A module of its own because its promise is subtle and self-contained: a store or delete that ends while a replay
runs is told by the replay or by the task, never both. `ListenerHub` owns the listeners, the lock every delivery,
replay step and task end runs under (`task_end`), and the keys a replay deferred to a task's end (`settle`,
`resolve`). It reads the directory (one namespace after another, REPLAY_BATCH keys a step) and, from the
adapter's shared state, only which keys are in flight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from lmcache.v1.distributed.api import ObjectKey

from blockstore.connector.l2_keys import (
    decode_object_key,
    encode_object_key,
    group_by_namespace,
    lmcache_namespaces,
    namespace_for,
)
from blockstore.connector.l2_state import AdapterState

if TYPE_CHECKING:
    from lmcache.v1.distributed.internal_api import L2AdapterListener

    from blockstore import Store

_log = logging.getLogger("blockstore.connector")

REPLAY_BATCH = 1024  # records per replay step and listener call (a step holds the delivery lock: ~5-10 ms)


class _Sub:
    """A registered listener and how far the replay of the records already held has reached for it."""

    __slots__ = ("listener", "cursor", "deferred")

    def __init__(self, listener: L2AdapterListener) -> None:
        self.listener = listener
        # (namespace, serialized key) of the last position the replay covered; None once it covered everything
        self.cursor: tuple[str, bytes] | None = ("", b"")
        # keys the replay passed while a task was storing or deleting them: that task's end announces their
        # final state to this listener (bounded by the keys in flight)
        self.deferred: set[ObjectKey] = set()


class ListenerHub:
    """The adapter's listeners (the base class's list stays empty: its _notify_keys_* only keep the usage counters
    and publish events). Every listener delivery, every replay step and the end of every store or delete (its
    counters and its announcement) happen under `deliver_lock`, so a replay step sees each key either before or
    after a task's end, never in between. Lock order: `deliver_lock`, then the state's lock; reentrant, so a
    listener may call back into the adapter."""

    def __init__(self, store: Store, state: AdapterState) -> None:
        self.store = store
        self._state = state
        self.deliver_lock = threading.RLock()
        self._subs: list[_Sub] = []
        self._ends_queued = 0  # task ends that asked for deliver_lock (see task_end)
        self._ends_admitted = 0  # ... and got it

    def register(self, listener: L2AdapterListener) -> None:
        """Attach a listener at any time: it hears exactly once of every record the adapter holds. The records
        already held are replayed to it (streamed from the directory, REPLAY_BATCH keys per call, nothing kept
        per record); records stored, replaced or deleted meanwhile reach it as they happen once the replay has
        passed their position, and through the replay (their state when it gets there) before that. A key that
        a task is storing or deleting when the replay passes it is announced by that task's end instead."""
        sub = _Sub(listener)
        with self.deliver_lock:
            self._subs.append(sub)
        try:
            while self._replay_step(sub):
                self._let_task_ends_pass()
        except Exception:
            _log.exception("blockstore L2: replaying the records held to a listener failed; it hears of changes "
                           "from now on")
            with self.deliver_lock:
                sub.cursor = None

    @contextlib.contextmanager
    def task_end(self) -> Iterator[None]:
        """deliver_lock for the end of a task (or a delivery), counted so that a replay can let the ends
        waiting for it go between two steps (Python's locks are not fair: without this, a long replay could
        keep the lock to itself and hold up every store and delete for its whole length)."""
        with self._state.lock:
            self._ends_queued += 1
        with self.deliver_lock:
            with self._state.lock:
                self._ends_admitted += 1
            yield

    def _let_task_ends_pass(self) -> None:
        """Between two replay steps: wait (briefly, bounded) until the task ends already waiting got the lock."""
        with self._state.lock:
            target = self._ends_queued
        deadline = time.monotonic() + 0.05
        while time.monotonic() < deadline:
            with self._state.lock:
                if self._ends_admitted >= target:
                    return
            time.sleep(0.0002)

    def _replay_step(self, sub: _Sub) -> bool:
        """Announce the next batch of records after `sub.cursor` to `sub`; False once the replay is complete.
        Runs under deliver_lock, so no store or delete ends during the step: a key no task holds in flight
        when the step has read the directory is what the step read, and stays so until a task that claims it
        later ends, when the advanced cursor makes that task announce the change. Keys in flight in the range
        read are deferred to their task's end (`settle`, `resolve`)."""
        with self.deliver_lock:
            lo = sub.cursor
            assert lo is not None
            found: list[tuple[str, bytes, int]] = []
            full = False
            for ns in lmcache_namespaces(self.store):  # read now: namespaces created since the last step are included
                if ns < lo[0]:
                    continue
                for kb, loc in self.store.iter_locations(ns=ns, after=lo[1] if ns == lo[0] else None):
                    found.append((ns, kb, loc.payload_len))
                    if len(found) >= REPLAY_BATCH:
                        full = True
                        break
                if full:
                    break
            hi = (found[-1][0], found[-1][1]) if full else None  # None: read to the end of the directory
            with self._state.lock:
                inflight = [*self._state.storing, *self._state.deleting]
            skip: set[tuple[str, bytes]] = set()
            for k in inflight:
                try:
                    pos = self._pos(k)
                except (ValueError, AttributeError, TypeError):
                    continue
                if pos > lo and (hi is None or pos <= hi):
                    sub.deferred.add(k)
                    skip.add(pos)
            keys: list[ObjectKey] = []
            sizes: list[int] = []
            for ns, kb, size in found:
                if (ns, kb) in skip:
                    continue
                try:
                    key = decode_object_key(kb)
                except ValueError:
                    continue  # not an ObjectKey (see l2_listing.records_held)
                if namespace_for(key.model_name, key.cache_salt) == ns:
                    keys.append(key)
                    sizes.append(size)
            sub.cursor = hi
            if keys:
                self._call(sub, "stored", keys, sizes)
            return hi is not None

    @staticmethod
    def _pos(key: ObjectKey) -> tuple[str, bytes]:
        """A key's place in the replay's order (namespaces by name, then keys bytewise, as the directory)."""
        return namespace_for(key.model_name, key.cache_salt), encode_object_key(key)

    def _knows(self, sub: _Sub, key: ObjectKey) -> bool:
        """Whether `sub` has been told the current state of `key`'s record (caller holds deliver_lock): the
        replay has passed it and no task's end still owes it the key's final state."""
        if key in sub.deferred:
            return False
        if sub.cursor is None:
            return True
        try:
            return self._pos(key) <= sub.cursor
        except (ValueError, AttributeError, TypeError):
            return False

    def settle(self, keys: Sequence[ObjectKey]) -> dict[ObjectKey, int | None]:
        """At the end of a task (caller holds deliver_lock, the keys are still claimed by the task, so their
        records cannot change): the payload size (None: no record) of those of `keys` that a replay deferred.
        Empty, without touching the directory, unless a replay passed one of them in flight (rare)."""
        if not any(sub.deferred for sub in self._subs):
            return {}
        want = [k for k in dict.fromkeys(keys) if any(k in sub.deferred for sub in self._subs)]
        if not want:
            return {}
        finals: dict[ObjectKey, int | None] = dict.fromkeys(want)
        groups, _bad = group_by_namespace(want)
        for ns, items in groups.items():
            try:
                locs = self.store.locate_many([kb for _, kb in items], ns=ns)
            except Exception as exc:
                _log.error("blockstore L2: cannot tell a replaying listener about %d key(s) in %s: %s",
                           len(items), ns, exc)
                continue
            for (i, _kb), loc in zip(items, locs):
                finals[want[i]] = None if loc is None else loc.payload_len
        return finals

    def resolve(self, finals: dict[ObjectKey, int | None]) -> None:
        """Announce the final state of deferred keys to the listeners that deferred them (caller holds
        deliver_lock, after the task's own announcements, which skipped them)."""
        if not finals:
            return
        for sub in list(self._subs):
            keys = [k for k in finals if k in sub.deferred]
            if not keys:
                continue
            sub.deferred.difference_update(keys)
            held = [(k, n) for k in keys if (n := finals[k]) is not None]
            if held:
                self._call(sub, "stored", [k for k, _ in held], [n for _, n in held])

    def deliver(self, what: str, keys: list[ObjectKey], sizes: list[int] | None = None) -> None:
        """Tell each listener of a change ("stored", "deleted" or "accessed"), only of keys whose state it knows
        (`_knows`): the others reach it through its replay. Caller holds `task_end()`."""
        with self.deliver_lock:
            for sub in list(self._subs):
                if sub.cursor is None and not sub.deferred:
                    self._call(sub, what, keys, sizes)
                    continue
                idx = [i for i, k in enumerate(keys) if self._knows(sub, k)]
                if idx:
                    self._call(sub, what, [keys[i] for i in idx], None if sizes is None else [sizes[i] for i in idx])

    @staticmethod
    def _call(sub: _Sub, what: str, keys: list[ObjectKey], sizes: list[int] | None) -> None:
        try:
            if what == "stored":
                sub.listener.on_l2_keys_stored(keys, sizes or [])
            elif what == "deleted":
                sub.listener.on_l2_keys_deleted(keys)
            else:
                sub.listener.on_l2_keys_accessed(keys)
        except Exception:  # one listener's failure must neither fail the task nor keep the others uninformed
            _log.exception("blockstore L2: a listener failed on %d %s key(s)", len(keys), what)
