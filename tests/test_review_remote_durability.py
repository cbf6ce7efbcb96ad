"""Review (H7) of durability="remote" (blockstore/tiering.py): a put returns only once the object store
confirmed a block holding its record. The wait follows block ids, and counts a block that left the table
as done ("deleted: nothing left in it"); compaction can empty a block by moving its live records, not
only by their deaths."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import blockstore
from blockstore.directory import BLOCK_SEALED

BLOCK = 64 << 10


def test_a_remote_put_is_not_acknowledged_when_compaction_moves_its_record_before_the_upload(tmp_path: Path) -> None:
    """A put in remote mode; its block is sealed, then, before any upload (the seal observer confirms
    nothing), compaction's relocation moves the record to a new block and sync_moves deletes the emptied
    one. The wait then finds no unconfirmed block at or below the id it waits for and returns: the put
    is acknowledged as remote while its record is only on the local disk. Expected: RemoteNotConfirmed
    once remote_timeout passes (the record's new block is not confirmed either)."""
    value = os.urandom(3000)
    with blockstore.open(tmp_path / "s", block_size=BLOCK, durability="remote", remote_seal_seconds=0.0,
                         remote_timeout=3.0) as s:
        s.add_seal_observer(lambda _bid: None)  # a tier that never confirms (the object store is down)
        outcome: list[BaseException | None] = []

        def writer() -> None:
            try:
                s.put(b"k", value)
                outcome.append(None)
            except BaseException as exc:  # RemoteNotConfirmed expected
                outcome.append(exc)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 2.0
        while True:  # the record's block, once the wait has sealed it
            loc = s.locate_many([b"k"])[0]
            states = {e.block_id: e for e in s.block_table()}
            if loc is not None and states[loc.block_id].state == BLOCK_SEALED:
                break
            assert time.monotonic() < deadline, "the remote wait did not seal the put's block"
            time.sleep(0.01)
        old = loc.block_id
        (sfx,) = [sx for off, sx in s.dir.block_records(old) if off == loc.offset]
        payload = s.read_locations([loc])[0]
        assert s.relocate_many([(sfx, loc, payload)], partition=states[old].partition) == [True]
        s.sync_moves()  # compaction's pass end (in sync-on-disk modes the emptied block went at once)
        assert not s.has_block(old)
        t.join(10.0)
        assert outcome, "the put is still waiting"
        assert not any(e.remote_name for e in s.block_table())  # nothing was ever confirmed
        assert isinstance(outcome[0], blockstore.BlockstoreError), \
            "the put was acknowledged as remote-durable though no block holding its record was confirmed"
