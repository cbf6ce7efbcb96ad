"""Review (H7) of remote GC (blockstore/remote/reclaim.py) against damage: a block entry's remote flag that is
not UTF-8 (a damaged directory) must not stop every reclaim pass with a non-Blockstore error, nor let it
delete an object the store may still name. In-memory object store (a unit-test aid; GC on a real SeaweedFS
cluster: tests/test_remote_gc.py)."""

from __future__ import annotations

import os
from pathlib import Path

from test_review_remote_tier import BLOCK, MemoryObjects

import blockstore
from blockstore.directory import Directory, DirectoryBatch
from blockstore.remote.reclaim import Reclaimer
from blockstore.remote.uploader import Uploader
from blockstore.store import DIRECTORY


def test_a_damaged_remote_flag_does_not_break_remote_gc(tmp_path: Path) -> None:
    path = tmp_path / "s"
    objects = MemoryObjects()
    now = [1000.0]
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put_many([(f"a{i}".encode(), os.urandom(20_000)) for i in range(3)])
        s.seal_open_blocks()
        s.put_many([(f"b{i}".encode(), os.urandom(20_000)) for i in range(3)])
        s.seal_open_blocks()
        up = Uploader(s, objects, "node-x")
        try:
            up.run_once()
            a_block = s.locate_many([b"a0"])[0].block_id  # type: ignore[union-attr]
            b_block = s.locate_many([b"b0"])[0].block_id  # type: ignore[union-attr]
            s.delete_many([f"a{i}".encode() for i in range(3)])  # block a empties and is deleted
            s.seal_open_blocks()
            up.run_once()
            assert not s.has_block(a_block)
        finally:
            up.close()
    d = Directory(str(path / DIRECTORY), read_only=False, sync=True, create=False)
    try:
        e = d.load_blocks()[b_block]
        assert e.remote_name
        e.remote_name = b"\xff" * len(e.remote_name)  # damage
        b = DirectoryBatch()
        b.put_block(e)
        d.write(b, force_sync=True)
    finally:
        d.close()
    with blockstore.open(path, block_size=BLOCK) as s:
        up = Uploader(s, objects, "node-x")
        rec = Reclaimer(up, grace_s=200.0, max_poll_interval_s=10.0, clock=lambda: now[0])
        try:
            rec.run_once()  # block a: gone, its marker published
            now[0] += 300.0
            st = rec.run_once()  # the grace is over
            assert st.last_error is None or "decode" in st.last_error
        finally:
            rec.close()
            up.close()
