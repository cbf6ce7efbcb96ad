"""Another store's directory put in place of this one's (a wrong backup restored, folders mixed up by hand).

The directory names its store (`M store_id`, docs/format.md §5). Before, nothing compared it with the
MANIFEST: an open accepted another store's directory, read every key of this store as a miss and every
key of the other as a checksum failure, and would act on its block table (finishing "reclaims" it had
marked by deleting this store's files of those ids). Now every open refuses it before anything acts on
it, fsck reports it, and `fsck --repair` moves it to lost+found and rebuilds this store's directory from
the block files, salvaging nothing from it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import blockstore
from blockstore.directory import Directory, DirectoryBatch
from blockstore.errors import CorruptionError
from blockstore.keys import meta_key
from blockstore.manifest import load_manifest
from blockstore.tools import cli

MIB = 1 << 20


def _fill(path: Path, prefix: bytes, n: int) -> dict[bytes, bytes]:
    values = {b"%s%03d" % (prefix, i): os.urandom(50_000) for i in range(n)}
    with blockstore.open(path, block_size=MIB) as s:
        for k, v in values.items():
            s.put(k, v)
    return values


def _directory_store_id(path: Path) -> int | None:
    d = Directory(str(path / "directory"), read_only=True, sync=False, create=False)
    try:
        return d.get_meta("store_id")
    finally:
        d.close()


def test_a_new_store_names_itself_in_its_directory(tmp_path: Path) -> None:
    _fill(tmp_path / "a", b"a", 3)
    assert _directory_store_id(tmp_path / "a") == load_manifest(str(tmp_path / "a"))["store_id"]


def test_another_stores_directory_is_refused_reported_and_rebuilt(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    mine = _fill(a, b"a", 60)
    _fill(b, b"b", 60)
    files = sorted(os.listdir(a / "blocks"))
    shutil.rmtree(a / "directory")
    shutil.copytree(b / "directory", a / "directory")
    for read_only in (False, True):
        with pytest.raises(CorruptionError, match="another store's directory"):
            blockstore.open(a, read_only=read_only)
    assert sorted(os.listdir(a / "blocks")) == files  # nothing acted on
    assert cli.main(["fsck", str(a)]) == 4
    assert cli.main(["fsck", "--repair", "--namespace", "default", str(a)]) == 1
    assert cli.main(["fsck", str(a)]) == 0
    with blockstore.open(a) as s:
        assert all(s.get(k) == v for k, v in mine.items())
        assert s.get(b"b000") is None  # nothing of the other store came along
    assert _directory_store_id(a) == load_manifest(str(a))["store_id"]
    moved = [n for n in os.listdir(a / "lost+found") if n.startswith("directory")]
    assert moved, os.listdir(a / "lost+found")


def test_a_directory_that_names_no_store_is_adopted(tmp_path: Path) -> None:
    # stores made before the directory named its store
    mine = _fill(tmp_path / "a", b"a", 5)
    d = Directory(str(tmp_path / "a" / "directory"), read_only=False, sync=True, create=False)
    b = DirectoryBatch()
    b.delete(meta_key("store_id"))
    d.write(b, force_sync=True)
    d.close()
    assert _directory_store_id(tmp_path / "a") is None
    assert cli.main(["fsck", str(tmp_path / "a")]) == 0
    with blockstore.open(tmp_path / "a") as s:
        assert all(s.get(k) == v for k, v in mine.items())
    assert _directory_store_id(tmp_path / "a") == load_manifest(str(tmp_path / "a"))["store_id"]


def test_another_stores_block_in_place_of_the_only_one_is_not_adopted(tmp_path: Path) -> None:
    # a one-block store whose block file is replaced by another store's: with the block headers alone, fsck
    # took the MANIFEST for the damaged part and repair served the other store's values under this store's
    # keys (H66). The directory sides with the MANIFEST, so the block is the stranger.
    a, b = tmp_path / "a", tmp_path / "b"
    with blockstore.open(a, block_size=MIB) as s:
        s.put(b"k", b"mine")
    with blockstore.open(b, block_size=MIB) as s:
        s.put(b"k", b"theirs")
    (name,) = os.listdir(a / "blocks")
    shutil.copyfile(b / "blocks" / name, a / "blocks" / name)
    sid = load_manifest(str(a))["store_id"]
    assert cli.main(["fsck", str(a)]) == 4
    cli.main(["fsck", "--repair", str(a)])
    assert load_manifest(str(a))["store_id"] == sid  # the MANIFEST was right
    assert cli.main(["fsck", str(a)]) == 0
    with blockstore.open(a) as s:
        assert s.get(b"k") != b"theirs"  # lost (its only block was overwritten), never another store's value
