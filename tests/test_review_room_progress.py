"""Review H86 of f7deb4a (compaction/room.py): a low-disk pass that freed a victim's block and then meets a NoSpace
on the next victim says it "could free nothing". Room.collect raises Room.full when settling after the NoSpace
frees no block, whatever the victims before it freed in the same pass (the compactor's own check at the end of
_collect asks for no GC work and no block reclaimed); the exception also drops the pass's report. Fixed with the patch
H86 proposed: the pass counts the blocks it freed and, when any, ends its GC quietly (the victims left count as
skipped_room)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore.compaction import gc, room
from blockstore.errors import NoSpace


def test_a_low_pass_that_freed_a_block_does_not_say_it_freed_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    with blockstore.open(path, block_size=64 << 10) as s:
        for i in range(120):
            s.put(b"k%04d" % i, bytes([i % 251]) * 3000)
        for i in range(120):
            if i % 4:
                s.delete(b"k%04d" % i)
    monkeypatch.setattr(room, "low_free_bytes", lambda *_a: 1)  # the disk is low: victim by victim
    monkeypatch.setattr(room, "free_bytes", lambda *_a: 1 << 40)  # and each victim looks as if it fits
    calls: list[int] = []
    real = gc.collect

    def second_fails(store: Any, e: Any, *args: Any, **kw: Any) -> gc.Collected:
        calls.append(e.block_id)
        if len(calls) >= 2:  # the disk filled meanwhile (another file on it): the next victim's copy fails
            raise NoSpace(errno.ENOSPC, "No space left on device (test)")
        return real(store, e, *args, **kw)

    monkeypatch.setattr(room.gc, "collect", second_fails)
    with blockstore.open(path, compaction={"policy": "aggressive", "background": False}) as s:
        rep = s.compactor.run_pass()  # raised NoSpace "could free nothing" before, with a block freed
        assert len(calls) >= 2 and rep.reclaimed_blocks >= 1 and s.compactor.reclaimed >= 1, rep
        assert rep.skipped_room >= 1, rep  # the victim that met the NoSpace (and those after it) left for room
    with blockstore.open(path) as s:  # every record kept reads back
        assert all(s.get(b"k%04d" % i) == bytes([i % 251]) * 3000 for i in range(0, 120, 4))
