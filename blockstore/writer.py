"""Group commit (docs/format.md §3): the queue and the leader slot, and what a group's plan holds.

Callers enqueue mutations; one thread at a time holds the leader slot and applies everything queued
(the store's `_apply_group`: plan, append, publish), then wakes every caller of the group. In `sync`
mode concurrent writers so share fsyncs, and a put is acknowledged only after its bytes and its
directory entry are durable. Work that must not interleave with a group (close, a synced directory
write for moves, reclaiming blocks) takes the same slot with `exclusive()`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from blockstore.blocks import OpenBlock
from blockstore.directory import DirectoryBatch, Location
from blockstore.mutations import Mutation
from blockstore.records import AppendRecord, Kind


@dataclass(slots=True)
class _Group:
    mutations: list[Mutation]
    done: bool = False
    error: BaseException | None = None


class LeaderSlot:
    """The group-commit queue and its one leader slot."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: list[_Group] = []
        self._leader = False

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
                self._leader = True
                batch, self._queue = self._queue, []
                self._cv.release()
                error: BaseException | None = None
                try:
                    apply([m for g in batch for m in g.mutations])
                except BaseException as exc:  # delivered to every caller of the group
                    error = exc
                finally:
                    self._cv.acquire()
                    self._leader = False
                    for g in batch:
                        g.done = True
                        g.error = error
                    self._cv.notify_all()
        if group.error is not None:
            raise group.error

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the leader slot: no group is applied meanwhile."""
        with self._cv:
            while self._leader:
                self._cv.wait()
            self._leader = True
        try:
            yield
        finally:
            with self._cv:
                self._leader = False
                self._cv.notify_all()


@dataclass(slots=True)
class Planned:
    """The records of one group that go to one open block, in order."""

    block: OpenBlock
    records: list[AppendRecord] = field(default_factory=list)


@dataclass(slots=True)
class GroupPlan:
    """What the plan step decided for a group; the append and publish steps carry it out."""

    batch: DirectoryBatch
    created_ns: dict[str, int]  # namespaces this group creates (published only once it commits)
    current: dict[bytes, Location | None]  # each key suffix's location, updated as the group's records land
    seq: int  # the next sequence number once the group's records have theirs
    planned: dict[int, Planned] = field(default_factory=dict)  # by block id
    tails: dict[int, int] = field(default_factory=dict)  # each planned block's tail after the group
    placed: list[tuple[Mutation, bytes, OpenBlock, AppendRecord]] = field(default_factory=list)
    retired_tombstones: list[int] = field(default_factory=list)  # old blocks of tombstone moves
    moves: bool = False  # compaction moves: durable whatever the mode
    deletes: bool = False  # a delete is durable when it returns, whatever the mode
    overwrites: bool = False  # an overwrite's new bytes are synced before the directory names them


def takes_effect(m: Mutation, suffix: bytes, plan: GroupPlan, live_after: dict[bytes, bool],
                 touched: set[bytes]) -> bool:
    """Whether a mutation of the group writes a record; sets `m.result` for deletes and moves.
    `live_after`: whether each key is live after the group's mutations so far; `touched`: keys a put or
    delete of the group changed."""
    if m.expected is not None and m.expected.kind == Kind.TOMBSTONE:
        # a tombstone leaves its old block (compaction): carried only while the key stays
        # deleted, since a newer put supersedes every older record anyway
        plan.retired_tombstones.append(m.expected.block_id)
        m.result = not m.drop and suffix not in touched and not live_after[suffix]
        return bool(m.result)
    if m.expected is not None:
        # compare-and-swap: move only if the directory still names the old place (invariant 3;
        # Badger issue 2310 resurrected deleted keys by skipping this check)
        cur = plan.current[suffix]
        m.result = suffix not in touched and cur is not None and cur.same_place(m.expected)
        return bool(m.result)
    if m.kind == Kind.TOMBSTONE:
        m.result = live_after[suffix]
        if not m.result:
            return False  # deleting a missing key writes nothing
    touched.add(suffix)
    return True
