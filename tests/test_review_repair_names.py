"""repair(namespace_ids=...) (H8's request, applied by H7 in H3's files): a rebuild from the block files
names a namespace id from the ids given before it matches partition hashes, so blocks shared by several
namespaces (one partition across them) get their real names instead of recovered-ns-<id>; salvaged names
still win, a name already taken is not given twice, and a bad mapping is a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import blockstore
from blockstore.errors import InvalidArgument
from blockstore.store import DIRECTORY
from blockstore.tools.repair import repair


def _shared_partition_store(path: Path) -> dict[str, int]:
    with blockstore.open(path) as s:
        for ns in ("alpha", "beta"):
            s.put_many([(f"{ns}-{i}".encode(), ns.encode() * 100) for i in range(5)], ns=ns, partition="shared")
        return {ns: s.namespace_id(ns) for ns in ("alpha", "beta")}  # type: ignore[misc]


def test_given_namespace_ids_name_namespaces_that_share_blocks(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ids = _shared_partition_store(path)
    shutil.copytree(path, tmp_path / "copy")
    shutil.rmtree(path / DIRECTORY)
    assert not repair(path, namespaces=["alpha", "beta"]).refused
    with blockstore.open(path, read_only=True) as s:
        assert "alpha" not in s.namespaces()  # the hash match cannot tell shared blocks' namespaces apart
    path = tmp_path / "copy"
    shutil.rmtree(path / DIRECTORY)
    given = {nid: ns for ns, nid in ids.items()}
    given[99] = "alpha"  # a name already given to another id is not given twice
    assert not repair(path, namespace_ids=given).refused
    with blockstore.open(path, read_only=True) as s:
        assert {ns: s.namespace_id(ns) for ns in ("alpha", "beta")} == ids
        for ns in ("alpha", "beta"):
            assert s.get(f"{ns}-3".encode(), ns=ns) == ns.encode() * 100
    for bad in ({0: "x"}, {1: ""}, {True: "x"}, {"1": "x"}):
        with pytest.raises(InvalidArgument):
            repair(path, namespace_ids=bad)  # type: ignore[arg-type]
