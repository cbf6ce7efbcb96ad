"""A damaged directory counter (`M` values, docs/format.md §5: a u64 each) is named as damage and repaired
(review H85).

Before: a store counter of the wrong length failed every open with "directory counter 'next_seq' has 3 bytes,
not 8" (no word of what to do), and fsck called it "missing". An eviction floor counter
(`block_min_seq/<block>`, seqfloor.py) of the wrong length was not looked at by fsck at all (OK, exit 0), while
`Store.evict_blocks` raised that same message once the block's file was gone, and repair left it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

import blockstore
from blockstore.errors import CorruptionError
from blockstore.keys import meta_key
from blockstore.seqfloor import min_seq_name
from blockstore.tools import cli


def _store(path: Path) -> dict[bytes, bytes]:
    values = {b"k%d" % i: os.urandom(8000) for i in range(20)}
    with blockstore.open(path, block_size=64 << 10) as s:
        for k, v in values.items():
            s.put(k, v)
    return values


def _set_raw(path: Path, key: bytes, value: bytes) -> None:
    db = Rdict(str(path / "directory"), options=Options(raw_mode=True))
    db[key] = value
    db.close()


@pytest.mark.parametrize("name", ["next_seq", "next_block", "bytes_put", "clean"])
def test_a_store_counter_of_the_wrong_length_names_the_repair(tmp_path: Path, name: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    values = _store(tmp_path)
    _set_raw(tmp_path, meta_key(name), b"\x01\x02\x03")
    for read_only in (True, False):
        with pytest.raises(CorruptionError, match=f"{name}.*damaged.*fsck --repair"):
            blockstore.open(tmp_path, read_only=read_only)
    assert cli.main(["fsck", str(tmp_path)]) == 4
    assert f"store counter {name} is damaged" in capsys.readouterr().out
    assert cli.main(["fsck", str(tmp_path), "--repair"]) == 1
    assert cli.main(["fsck", str(tmp_path)]) == 0
    with blockstore.open(tmp_path) as s:
        assert all(s.get(k) == v for k, v in values.items())
        s.put(b"after", b"x")
        assert s.get(b"after") == b"x"


def test_a_damaged_eviction_floor_counter_is_found_and_dropped(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path)
    with blockstore.open(tmp_path, read_only=True) as s:
        bids = [e.block_id for e in s.block_table()]
    _set_raw(tmp_path, meta_key(min_seq_name(bids[2])), b"\x01\x02\x03")
    assert cli.main(["fsck", str(tmp_path)]) == 4
    out = capsys.readouterr().out
    assert f"counter {bids[2]:016x} store counter {min_seq_name(bids[2])} is damaged" in out, out
    os.rename(tmp_path / "blocks" / f"{bids[2]:016x}.blk", tmp_path / "aside")
    with blockstore.open(tmp_path) as s, pytest.raises(CorruptionError, match="damaged.*fsck --repair"):
        s.evict_blocks([bids[0]])  # the floor needs the missing block's counter
    os.rename(tmp_path / "aside", tmp_path / "blocks" / f"{bids[2]:016x}.blk")
    assert cli.main(["fsck", str(tmp_path), "--repair"]) == 1
    assert "counter dropped" in capsys.readouterr().out
    assert cli.main(["fsck", str(tmp_path)]) == 0
    with blockstore.open(tmp_path) as s:
        assert s.evict_blocks([bids[0]]).blocks == [bids[0]]
