"""fsck --repair rebuilding a lost directory names a namespace from the blocks of its large-record lineage
(partition `ns\\0\\0\\0large`, placement_choice.py, 31d0db3) as it does from its one-lineage blocks (review H81).

A namespace placed as one lineage with its large records apart writes blocks of two partitions; the rebuild
matched a --namespace candidate only against `ns` itself (and chunk sessions), so a namespace whose blocks
that survive are its large ones (a KV namespace of large records; its small ones collected or lost) came
back as recovered-ns-<id>."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import blockstore
from blockstore.tools.repair import repair


def _tenants(path: Path) -> None:
    """Six tenants (namespaces) of four sessions; a request reads the tenant's four newest small records and
    three drawn at random: each tenant is placed as one lineage, its 40 KB records (1/16 of a 256 KiB block
    or more) apart (as tests/test_placement_large_apart.py's replay, through a store)."""
    rng = random.Random(5)
    small: dict[int, list[bytes]] = {t: [] for t in range(6)}
    with blockstore.open(path, block_size=256 << 10) as s:
        for i in range(360):
            t = rng.randrange(6)
            ns = f"tenant{t}"
            if len(small[t]) >= 8:
                with s.request():
                    s.get_many(list(dict.fromkeys(small[t][-4:] + rng.sample(small[t], 3))), ns=ns)
            items = [(b"small%d.%d" % (i, j), os.urandom(600)) for j in range(2)]
            s.put_many([*items, (b"large%d" % i, os.urandom(40_000))], ns=ns, partition=f"session{rng.randrange(4)}")
            small[t] += [k for k, _ in items]


def test_a_namespace_known_only_by_its_large_lineage_gets_its_name_back(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _tenants(path)
    with blockstore.open(path, read_only=True) as s:
        table = s.block_table()
        nid = s.namespace_id("tenant1")
        large = b"tenant1\0\0\0large"
        assert any(e.partition == large for e in table), sorted({e.partition for e in table})
        keep = {e.block_id for e in table if e.partition == large}
        # every other block holding tenant1's records goes (lost), so only its large lineage names it
        gone = {e.block_id for e in table if e.partition.startswith(b"tenant1") and e.block_id not in keep}
        assert nid is not None and gone
    shutil.rmtree(path / "directory")
    for bid in gone:
        os.remove(path / "blocks" / f"{bid:016x}.blk")
    repair(path, namespaces=[f"tenant{t}" for t in range(6)])
    with blockstore.open(path, read_only=True) as s:
        assert "tenant1" in s.namespaces(), s.namespaces()
        assert any(k.startswith(b"large") for k in s.iter_keys(ns="tenant1"))
