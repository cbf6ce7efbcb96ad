"""A damaged directory never gives a short answer and never leaks RocksDB's bare exceptions (issue 13,
item 3): every read, listing and scan either answers in full or raises CorruptionError naming
`blockstore fsck --repair`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blockstore
from blockstore.errors import BlockstoreError, CorruptionError

N_KEYS = 165


def _store_with_flushed_directory(path: Path) -> dict[bytes, bytes]:
    want = {f"key-{i:04d}".encode(): os.urandom(200 + i) for i in range(N_KEYS)}
    with blockstore.open(path, block_size=64 << 10) as s:
        for i, (k, v) in enumerate(want.items()):
            s.put(k, v, partition=str(i % 5))
        s.dir.flush()  # into an .sst, where RocksDB checks block checksums on every read
    return want


def _largest_sst(path: Path) -> Path:
    ssts = sorted((path / "directory").glob("*.sst"), key=lambda p: p.stat().st_size)
    assert ssts, "the directory was not flushed to an .sst"
    return ssts[-1]


def _damage(f: Path, offset: int, n: int) -> None:
    with open(f, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in old))


@pytest.mark.parametrize("where", ["middle", "start"])
def test_damaged_sst_reads_and_listings_answer_in_full_or_raise(tmp_path: Path, where: str) -> None:
    path = tmp_path / "s"
    want = _store_with_flushed_directory(path)
    blocks_before = sorted(os.listdir(path / "blocks"))
    sst = _largest_sst(path)
    _damage(sst, sst.stat().st_size // 2 if where == "middle" else 0, 16)
    raised: list[BaseException] = []
    try:
        s = blockstore.open(path)
    except CorruptionError as exc:
        assert "fsck --repair" in str(exc)
        raised.append(exc)
    else:
        with s:
            for k, v in want.items():
                try:
                    assert s.get(k) == v
                except BlockstoreError as exc:
                    assert isinstance(exc, CorruptionError) and "fsck --repair" in str(exc), repr(exc)
                    raised.append(exc)
            try:
                listed = list(s.iter_keys())
            except BlockstoreError as exc:
                assert isinstance(exc, CorruptionError) and "fsck --repair" in str(exc), repr(exc)
                raised.append(exc)
            else:
                assert sorted(listed) == sorted(want), f"listing gave {len(listed)} of {len(want)} keys"
            try:
                got = s.get_many(list(want))
            except CorruptionError as exc:
                raised.append(exc)
            else:
                assert [bytes(g) for g in got] == list(want.values())
    # the damage was seen somewhere (a 16-byte flip inside a checksummed RocksDB block cannot pass)
    assert raised, "16 damaged bytes in the directory's only table went unnoticed"
    assert sorted(os.listdir(path / "blocks")) == blocks_before, "a block file was deleted or moved"


def test_missing_directory_names_the_repair(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _store_with_flushed_directory(path)
    os.rename(path / "directory", tmp_path / "elsewhere")
    with pytest.raises(CorruptionError, match="fsck --repair"):
        blockstore.open(path)
    assert os.listdir(path / "blocks"), "block files must stay"
