"""Outside examination of session 26 (H53): damage to every file a store holds, bad input, a full disk, the
README followed as written. Each test is a finding that failed on the HEAD it was found on; what it damages is
undone where the test says so, to check that nothing acknowledged was lost meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_enospc import SmallFs, small_fs  # noqa: F401 - small_fs is a fixture used by name

import blockstore
from blockstore import BlockstoreError
from blockstore.errors import CorruptionError, NoSpace
from blockstore.tools import cli
from blockstore.tools.fsck import check

BLOCK = 64 << 10
VALUE = 5000


def make_store(path: Path, n: int = 30) -> dict[bytes, bytes]:
    """A closed sync store of several sealed blocks; returns what it acknowledged."""
    acked = {}
    with blockstore.open(path, durability="sync", block_size=BLOCK) as s:
        for i in range(n):
            key, value = b"k%03d" % i, bytes([i]) * VALUE
            s.put(key, value)
            acked[key] = value
    return acked


def block_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "blocks").iterdir()) if p.is_file()}


def assert_all_read(path: Path, acked: dict[bytes, bytes]) -> None:
    with blockstore.open(path, read_only=True) as s:
        for key, value in acked.items():
            got = s.get(key)
            assert got is not None and bytes(got) == value, key


# ------------------------------------------------------------------ the store's own files


def test_a_folder_where_the_writer_lock_belongs_is_a_blockstore_error_naming_it(tmp_path: Path) -> None:
    """STORE/LOCK replaced by a folder: the open raised a bare IsADirectoryError."""
    store = tmp_path / "s"
    acked = make_store(store)
    (store / "LOCK").unlink()
    (store / "LOCK").mkdir()
    with pytest.raises(BlockstoreError, match="LOCK"):
        blockstore.open(store)
    (store / "LOCK").rmdir()
    assert_all_read(store, acked)


@pytest.mark.parametrize("damage", ["deleted", "a file"])
def test_a_store_without_its_blocks_folder_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    """STORE/blocks deleted (moved away) or replaced by a file: the open raised a bare FileNotFoundError /
    NotADirectoryError from deep in recovery. Refused before the directory is opened, naming the folder, and
    the store reads whole once the folder is back."""
    store = tmp_path / "s"
    acked = make_store(store)
    kept = tmp_path / "blocks-aside"
    shutil.move(store / "blocks", kept)
    if damage == "a file":
        (store / "blocks").write_bytes(b"x")
    for read_only in (False, True):
        with pytest.raises(CorruptionError, match="blocks"):
            blockstore.open(store, read_only=read_only)
    if damage == "a file":
        (store / "blocks").unlink()
    shutil.move(kept, store / "blocks")
    assert_all_read(store, acked)


def test_fsck_names_a_block_file_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder where a block file belongs: fsck (and --repair) stopped with "pread: IOErrorBS (EISDIR)", naming
    no file. Now the operational error (exit 8) names the block file, and repair changes nothing."""
    store = tmp_path / "s"
    acked = make_store(store)
    victim = sorted((store / "blocks").iterdir())[1]
    kept = victim.read_bytes()
    victim.unlink()
    victim.mkdir()
    for args in ([str(store)], [str(store), "--repair"]):
        assert cli.main(["fsck", *args]) == 8
        err = capsys.readouterr().err
        assert victim.name in err and "Traceback" not in err, err
    victim.rmdir()
    victim.write_bytes(kept)
    assert_all_read(store, acked)


def test_a_manifest_naming_another_store_id_is_refused_before_a_write(tmp_path: Path) -> None:
    """One digit of MANIFEST.json's store_id changed (it has no checksum: the JSON stays valid): a writable open
    took it and wrote new blocks under the wrong id; `fsck --repair` then moved every earlier block to
    lost+found as another store's and dropped their keys (0 of 30 readable). Now the open is refused naming
    the MANIFEST, and repair rewrites the MANIFEST from the blocks, which all agree."""
    store = tmp_path / "s"
    acked = make_store(store)
    path = store / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    right = manifest["store_id"]
    manifest["store_id"] = right ^ 1
    path.write_text(json.dumps(manifest))
    blocks_before = block_files(store)
    with pytest.raises(CorruptionError, match="MANIFEST"):
        blockstore.open(store)
    assert block_files(store) == blocks_before
    assert cli.main(["fsck", str(store), "--repair"]) == 1
    assert json.loads(path.read_text())["store_id"] == right
    with blockstore.open(store) as s:
        s.put(b"after", b"x")
    assert_all_read(store, acked)


def crash_a_sync_session(store: Path, acked: dict[bytes, bytes]) -> tuple[Path, bytes]:
    """A sync-mode session writes 16 more records (added to `acked`) and stops as kill -9 leaves it; then one of
    the sealed blocks it wrote is cut to half. Returns that block file and its bytes, to undo the damage."""
    s = blockstore.open(store, durability="sync", block_size=BLOCK)
    for i in range(8, 24):
        key, value = b"k%03d" % i, bytes([i]) * VALUE
        s.put(key, value)
        acked[key] = value
    s.abandon()  # as kill -9 leaves it
    victim = sorted((store / "blocks").iterdir())[-3]  # a sealed block the crashed session wrote
    kept = victim.read_bytes()
    os.truncate(victim, len(kept) // 2)
    return victim, kept


def test_a_cache_open_after_a_sync_session_crashed_does_not_drop_its_damaged_records(tmp_path: Path) -> None:
    """A sync-mode session stops without closing; one of its sealed blocks is then cut short. The next open in
    cache mode (the default) verified that session's blocks as if they were cache-mode pages a power cut may
    have taken, and dropped the directory entries of acknowledged, synced records: silently (fsck then said OK)
    and for good (putting the block back did not bring them back). Recovery now holds the crashed session to
    the durability it ran under (the MANIFEST's), so the open is refused as a sync open's is, and undoing the
    damage gives every record back. Every retry is refused too (H54): the refused open had already rewritten
    the MANIFEST's durability to "cache" before recovery, so opening again judged the sync session as a cache
    one and dropped 3 of 24 acknowledged keys, silently; the MANIFEST now changes mode only after recovery."""
    store = tmp_path / "s"
    acked = make_store(store, n=8)
    victim, kept = crash_a_sync_session(store, acked)
    for _attempt in range(2):
        with pytest.raises(CorruptionError, match="fsck --repair"):
            blockstore.open(store)  # cache mode
    victim.write_bytes(kept)
    with blockstore.open(store) as s:  # a writable open: recovery runs and keeps every record
        for key, value in acked.items():
            assert bytes(s.get(key) or b"") == value, key


def rocksdb_manifest(store: Path) -> Path:
    (manifest,) = (store / "directory").glob("MANIFEST-*")
    return manifest


def test_a_cut_rocksdb_manifest_is_refused_before_its_tables_are_deleted(tmp_path: Path) -> None:
    """directory/MANIFEST-* truncated to half: RocksDB recovered the edits before the cut and its writable
    open deleted the tables the lost edits had added (and the WAL and the cut MANIFEST), so putting the
    MANIFEST back no longer helped: the store stayed unopenable. Now the open is refused before anything is
    touched, and undoing the damage gives every acknowledged record back."""
    store = tmp_path / "s"
    acked = make_store(store)
    manifest = rocksdb_manifest(store)
    whole = manifest.read_bytes()
    files_before = sorted(p.name for p in (store / "directory").iterdir())
    blocks_before = block_files(store)
    manifest.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptionError, match="fsck --repair"):
        blockstore.open(store)
    assert sorted(p.name for p in (store / "directory").iterdir()) == files_before
    assert block_files(store) == blocks_before
    manifest.write_bytes(whole)
    assert_all_read(store, acked)
    with blockstore.open(store) as s:  # writable again, and whole
        assert bytes(s.get(b"k007") or b"") == acked[b"k007"]


def test_a_table_the_manifest_does_not_name_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    """A table file the MANIFEST does not name while every block file is named (what a flush cut short by
    kill -9 leaves): the open goes on, as RocksDB's would, but the table goes to lost+found instead of being
    deleted by RocksDB."""
    store = tmp_path / "s"
    acked = make_store(store)
    tables = sorted((store / "directory").glob("*.sst"))
    stray = store / "directory" / "999999.sst"
    shutil.copyfile(tables[0], stray)
    table = stray.read_bytes()
    with blockstore.open(store) as s:
        assert bytes(s.get(b"k003") or b"") == acked[b"k003"]
    assert not stray.exists()
    kept = list((store / "lost+found").glob("directory-tables-*/999999.sst"))
    assert len(kept) == 1 and kept[0].read_bytes() == table
    assert "999999.sst" in (store / "lost+found" / "fsck-log.jsonl").read_text()
    assert_all_read(store, acked)
    assert check(store).findings == []  # what was set aside is not damage


# ------------------------------------------------------------------ a full disk


def test_a_store_that_filled_its_disk_is_made_writable_again_by_deletes_and_gc(
        small_fs: SmallFs) -> None:  # noqa: F811 - the fixture imported above
    """Only the store on an 8 MiB filesystem, filled by puts until NoSpace: deleting half its records and
    collecting the emptied blocks must make it writable again, with every acknowledged record intact. On
    HEAD the 11th delete raised NoSpace, close and reopen raised NoSpace (RocksDB needs room to recover its
    WAL), and so did `blockstore compact`: no API call freed a byte; only files outside the store could.
    Now the store holds a reserve (STORE/RESERVE) that the first NoSpace gives up for exactly that."""
    acked: dict[bytes, bytes] = {}
    with small_fs.open(durability="sync", block_size=BLOCK) as s:
        for i in range(100_000):
            key = b"k%05d" % i
            value = os.urandom(20_000)
            try:
                s.put(key, value)
            except NoSpace:
                break
            acked[key] = value
        assert len(acked) > 100
        assert (small_fs.root / "store" / "RESERVE").stat().st_size == 0  # given up by the first NoSpace
        with pytest.raises(NoSpace, match="reserve"):  # the room given up is kept for deletes and GC
            s.put(b"more", b"x" * 20_000)
        for key in list(acked)[::2]:
            assert s.delete(key)
            del acked[key]
    with small_fs.open(durability="sync") as s:  # a reopen on the full disk
        with pytest.raises(NoSpace):
            s.put(b"more", b"x" * 20_000)  # deletes alone free nothing
    with small_fs.open(durability="sync", compaction={"policy": "aggressive", "gc_invalid_ratio": 0.3}) as s:
        s.compactor.run_until_idle()
        s.put(b"after", b"x" * 20_000)
        for key, value in acked.items():
            assert bytes(s.get(key) or b"") == value
    reserve = small_fs.root / "store" / "RESERVE"
    assert not reserve.exists() or reserve.stat().st_size > 0  # taken back, or dropped on a disk roomy again
    report = check(small_fs.root / "store")
    assert report.findings == [], [f.line() for f in report.findings]


def test_a_cut_wal_is_refused_before_the_directory_moves_past_it(tmp_path: Path) -> None:
    """A sync session stops without closing; its directory WAL is then emptied. The open refused (the directory
    does not name the session's block files) but only after RocksDB's writable open had started a new MANIFEST
    and WAL past the old one, so putting the WAL back no longer helped: the store stayed unopenable. Now the
    check runs on a read-only look first, and undoing the damage gives every record back."""
    store = tmp_path / "s"
    acked = make_store(store, n=8)
    session = ("import os, sys, blockstore\n"
               "s = blockstore.open(sys.argv[1], durability='sync', block_size=65536)\n"
               "for i in range(8, 24): s.put(b'k%03d' % i, bytes([i]) * 5000)\n"
               "os._exit(0)  # as kill -9 leaves it: the session is in the directory's WAL only\n")
    subprocess.run([sys.executable, "-c", session, str(store)], check=True)
    acked.update({b"k%03d" % i: bytes([i]) * VALUE for i in range(8, 24)})
    (wal,) = [p for p in (store / "directory").glob("*.log") if p.stat().st_size > 0]
    kept = wal.read_bytes()
    files_before = sorted(p.name for p in (store / "directory").iterdir())
    wal.write_bytes(b"")
    for durability in ("cache", "sync"):
        with pytest.raises(CorruptionError, match="fsck --repair"):
            blockstore.open(store, durability=durability)
    assert sorted(p.name for p in (store / "directory").iterdir()) == files_before
    wal.write_bytes(kept)
    with blockstore.open(store, durability="sync") as s:
        for key, value in acked.items():
            assert bytes(s.get(key) or b"") == value, key


def test_a_store_on_a_roomy_disk_holds_no_reserve(tmp_path: Path) -> None:
    """The reserve is taken only while the disk is low: a store on a roomy disk (every store of the test
    suite, or an operator's many small stores) holds no bytes for it; a read-only open and stats() never make
    one, and fsck does not count the file as damage where there is one."""
    store = tmp_path / "s"
    make_store(store)
    reserve = store / "RESERVE"
    assert not reserve.exists()
    with blockstore.open(store, read_only=True) as s:
        s.stats()
    assert not reserve.exists()
    reserve.write_bytes(b"")  # as a reserve given up leaves it
    assert check(store).findings == []
    with blockstore.open(store) as s:
        s.put(b"more", b"x" * 100)  # roomy: the given-up reserve is dropped, the put goes through
    assert not reserve.exists()


@pytest.mark.parametrize("field,value", [("durability", "zync"), ("block_size", 0), ("block_size", "64MiB")])
def test_a_manifest_field_no_writer_records_is_an_fsck_finding(tmp_path: Path, field: str, value: object) -> None:
    """A damaged `durability` or `block_size` that is still valid JSON was ignored by the open and passed by fsck
    (H53's finding). fsck now reports it as a manifest finding; the store still opens and reads."""
    store = tmp_path / "s"
    acked = make_store(store, n=8)
    p = store / "MANIFEST.json"
    m = json.loads(p.read_text())
    m[field] = value
    p.write_text(json.dumps(m))
    rep = check(str(store))
    assert [f.kind for f in rep.findings] == ["manifest"], rep.findings
    assert field in rep.findings[0].detail
    assert_all_read(store, acked)


def test_a_damaged_durability_is_read_as_sync_after_a_crash(tmp_path: Path) -> None:
    """The crashed session of the test above, with its MANIFEST's durability then damaged ("zync"): an unknown
    value reads as sync everywhere (`manifest.recorded_durability`: recovery's block checks, which already took
    anything but "cache" as sync, and now the directory's WAL reading too), so the open refuses and drops
    nothing."""
    store = tmp_path / "s"
    acked = make_store(store, n=8)
    victim, kept = crash_a_sync_session(store, acked)
    p = store / "MANIFEST.json"
    m = json.loads(p.read_text())
    m["durability"] = "zync"
    p.write_text(json.dumps(m))
    with pytest.raises(CorruptionError, match="fsck --repair"):
        blockstore.open(store)
    victim.write_bytes(kept)
    with blockstore.open(store) as s:
        for key, value in acked.items():
            assert bytes(s.get(key) or b"") == value, key
