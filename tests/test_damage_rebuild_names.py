"""fsck --repair rebuilding a lost directory names a namespace from the blocks its users' chunk sessions share
(placement by a partition's parent: a chunk session's user, placement_choice.parent_of) as it does from a
session's own blocks and from its large-record lineage (tests/test_rebuild_large_lineage_names.py; review H85).

The rebuild matched a --namespace candidate against a chunk block's partition hash as the session's partition
only (NAME\\0u<user><session>). A namespace of agent memory whose requests read across each user's sessions is
placed by user (NAME\\0u<user>); when those are the blocks that survive, it came back as recovered-ns-<id>
with `--namespace NAME` given, and none of its chunks read under its name."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import blockstore
from blockstore.tools.repair import repair


def test_a_namespace_known_only_by_its_users_blocks_gets_its_name_back(tmp_path: Path) -> None:
    rng = random.Random(12)
    written: dict[tuple[str, str, str], str] = {}
    with blockstore.open(tmp_path, block_size=256 << 10, idle_seal_seconds=0) as s:
        pool: dict[int, list[tuple[str, str, str]]] = {}
        for i in range(800):
            u = rng.randrange(6)
            mine = pool.setdefault(u, [])
            if len(mine) >= 4:  # a request reads the user's newest chunks and two older ones, across sessions
                s.get_chunks(mine[-2:] + rng.sample(mine[:-2], 2), ns="mem")
            cid = (f"user{u}", f"s{i // 25}", f"c{i}")
            written[cid] = f"t{i} " + "x" * rng.randint(200, 2000)
            s.put_chunk(*cid, written[cid], ns="mem")
            mine.append(cid)
        by_user = {e.block_id for e in s.block_table() if e.partition.startswith(b"mem\0u") and
                   e.partition.count(b"\0") == 2}  # NAME \0 u <len><user>: no session after it
        assert by_user, sorted({e.partition for e in s.block_table()})
        gone = {e.block_id for e in s.block_table()} - by_user
    for bid in gone:  # only the users' blocks survive (with the directory gone, nothing else names "mem")
        os.remove(tmp_path / "blocks" / f"{bid:016x}.blk")
    shutil.rmtree(tmp_path / "directory")
    repair(tmp_path, namespaces=["mem"])
    with blockstore.open(tmp_path, read_only=True) as s:
        assert s.namespaces() == ["mem"], s.namespaces()
        found = [cid for cid in written if s.get_chunk(*cid, ns="mem") is not None]
        assert found and all(s.get_chunk(*cid, ns="mem").text == written[cid] for cid in found)  # type: ignore[union-attr]
