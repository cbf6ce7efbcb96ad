"""Special files where the store's own files belong (an operator's mistake, a restore gone wrong; review H85):
every open returns or raises a BlockstoreError, never hangs and never lets an OSError out.

- A FIFO in a block file's place hung every writable open: the MANIFEST check read block headers with a
  blocking open(), which waits for a FIFO's writer forever (fsck and the read path already refused such files).
- A FIFO as LOCK: a second writer's open raised a bare OSError (ESPIPE from reading the holder's pid) instead of
  StoreLocked.
- A directory or a dangling link as LOCK: the writable open's error said only "cannot take the writer lock
  (Is a directory)" (NotFound for the link); it now says LOCK holds no data and is to be moved away.
- A folder named as a block file: fsck and fsck --repair stop (exit 8, as before) and now say what to do.
- A full disk under the directory (RocksDB's ENOSPC): the NoSpace now says to make room and retry (the writer
  still words its own, test_enospc).
- MANIFEST.json unreadable or lost (blocks still there): the open names fsck --repair, never create=True."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blockstore
from blockstore.directory import translate_rocksdb_error
from blockstore.errors import BlockstoreError, NoSpace
from blockstore.tools import cli

OPEN_AND_READ = """
import sys, blockstore
try:
    with blockstore.open(sys.argv[1], read_only=sys.argv[2] == "ro") as s:
        s.put(b"new", b"x") if sys.argv[2] == "rw" else None
        try:
            s.get(b"k1")
        except blockstore.BlockstoreError as e:
            print("read:", type(e).__name__)
    print("opened")
except blockstore.BlockstoreError as e:
    print("open:", type(e).__name__, e)
"""


def _store(path: Path) -> None:
    with blockstore.open(path, block_size=64 << 10) as s:
        for i in range(20):
            s.put(b"k%d" % i, b"v%d" % i * 1000)


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_a_fifo_in_a_block_files_place_does_not_hang_an_open(tmp_path: Path, mode: str) -> None:
    _store(tmp_path)
    name = tmp_path / "blocks" / sorted(os.listdir(tmp_path / "blocks"))[0]
    name.unlink()
    os.mkfifo(name)
    try:
        r = subprocess.run([sys.executable, "-c", OPEN_AND_READ, str(tmp_path), mode], capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a {mode} open hung on a FIFO in place of {name.name}")
    assert r.returncode == 0, r.stderr
    assert "opened" in r.stdout and "read: IOErrorBS" in r.stdout, r.stdout


def test_a_fifo_as_lock_gives_a_second_writer_store_locked(tmp_path: Path) -> None:
    _store(tmp_path)
    (tmp_path / "LOCK").unlink()
    os.mkfifo(tmp_path / "LOCK")
    with blockstore.open(tmp_path) as s:
        with pytest.raises(blockstore.StoreLocked):
            blockstore.open(tmp_path)
        assert s.get(b"k1") == b"v1" * 1000
    with blockstore.open(tmp_path) as s:
        assert s.get(b"k2") == b"v2" * 1000
    assert issubclass(blockstore.StoreLocked, BlockstoreError)


@pytest.mark.parametrize("damage", ["directory", "dangling link"])
def test_a_lock_that_is_not_a_file_says_what_to_do(tmp_path: Path, damage: str) -> None:
    _store(tmp_path)
    (tmp_path / "LOCK").unlink()
    if damage == "directory":
        (tmp_path / "LOCK").mkdir()
    else:
        os.symlink(tmp_path / "nowhere" / "LOCK", tmp_path / "LOCK")
    with pytest.raises(BlockstoreError, match="LOCK is .*move it away"):
        blockstore.open(tmp_path)
    with blockstore.open(tmp_path, read_only=True) as s:  # a reader takes no lock
        assert s.get(b"k1") == b"v1" * 1000


def test_a_folder_named_as_a_block_file_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A folder blocks/0000000000000099.blk (no such block): the writable open names `fsck --repair`, which
    # stopped (exit 8) with "cannot read block file ...: pread: IOErrorBS (EISDIR: Is a directory)" and no
    # word of what to do (tests/test_review_session26.py keeps the exit 8 and "repair changes nothing").
    _store(tmp_path)
    (tmp_path / "blocks" / "0000000000000099.blk").mkdir()
    with pytest.raises(BlockstoreError, match="fsck --repair"):
        blockstore.open(tmp_path)
    for args in ([], ["--repair"]):
        assert cli.main(["fsck", str(tmp_path), *args]) == 8
        err = capsys.readouterr().err
        assert "0000000000000099.blk" in err and "move the folder out of blocks/" in err, err
    (tmp_path / "blocks" / "0000000000000099.blk").rmdir()
    with blockstore.open(tmp_path) as s:
        assert s.get(b"k3") == b"v3" * 1000


def test_a_full_disk_under_the_directory_says_what_to_do(tmp_path: Path) -> None:
    # RocksDB's "No space left on device" became NoSpace("...: the disk is full (IO error: ...)") and no more:
    # `fsck --repair` of a store whose directory was lost, on a full disk, stopped (exit 8) with "cannot open the
    # directory: the disk is full (No space left on device (os error 28))" and no word of what to do.
    err = translate_rocksdb_error(Exception("IO error: No space left on device (os error 28)"),
                                  "cannot open the directory", str(tmp_path / "directory"))
    assert isinstance(err, NoSpace) and "make room" in str(err) and str(tmp_path) in str(err), err


def test_a_damaged_or_lost_manifest_names_the_repair(tmp_path: Path) -> None:
    # An unreadable MANIFEST.json failed every open (and get, scan, stats, dump, metrics, top) with
    # "MANIFEST.json is unreadable (Expecting property name ...)" and no word of what to do; a lost one, on a
    # read-only open, said "no store at ... (no MANIFEST.json); pass create=True to make one" beside the block files.
    _store(tmp_path)
    manifest = tmp_path / "MANIFEST.json"
    kept = manifest.read_bytes()
    manifest.write_text("{")
    for read_only in (True, False):
        with pytest.raises(BlockstoreError, match="unreadable.*fsck --repair"):
            blockstore.open(tmp_path, read_only=read_only)
    manifest.unlink()
    for read_only in (True, False):
        with pytest.raises(BlockstoreError, match="MANIFEST was lost; `blockstore fsck --repair") as caught:
            blockstore.open(tmp_path, read_only=read_only)
        assert "create=True" not in str(caught.value)
    manifest.write_bytes(kept)
    with blockstore.open(tmp_path, read_only=True) as s:
        assert s.get(b"k4") == b"v4" * 1000
