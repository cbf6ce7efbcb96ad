"""What `fsck --repair` says it did with damage to the store's own files matches what it did (review H85).

An old block file put back (a backup restored over a store that has compacted since: GC had deleted that
block) is an orphan: the directory does not name it, so it lost writes, and repair rebuilds the directory
from every block file, the old one included. The orphan-block finding read "[corrected: moved to
lost+found]" while the file stayed in blocks/ and the rebuilt directory named it again (lost+found held
only the old directory), so an operator looked for the block in lost+found/ and did not find it."""

from __future__ import annotations

import shutil
from pathlib import Path

import blockstore
from blockstore.tools import cli
from blockstore.tools.repair import repair


def test_an_orphan_block_taken_back_by_the_rebuild_is_not_reported_as_moved(tmp_path: Path) -> None:
    path, old = tmp_path / "s", tmp_path / "old"
    values = {b"k%d" % i: b"v%d" % i * 500 for i in range(60)}
    with blockstore.open(path, block_size=64 << 10) as s:
        s.put_many(list(values.items()))
        first = s.block_table()[0].block_id
        shutil.copy(path / "blocks" / f"{first:016x}.blk", old)
        for k in list(values):  # the first block dies: every record overwritten, so it is deleted
            values[k] = b"new" + values[k]
            s.put(k, values[k])
        assert first not in {e.block_id for e in s.block_table()}, "the first block was not deleted"
    name = f"{first:016x}.blk"
    shutil.copy(old, path / "blocks" / name)  # the backup put back
    res = repair(path)
    orphan = [f for f in res.findings if f.kind == "orphan-block"]
    assert len(orphan) == 1 and orphan[0].corrected
    assert (path / "blocks" / name).exists() and not (path / "lost+found" / name).exists()
    assert "moved to lost+found" not in orphan[0].line(), orphan[0].line()
    assert "names it again" in orphan[0].line(), orphan[0].line()
    with blockstore.open(path) as s:  # nothing older came back
        assert all(s.get(k) == v for k, v in values.items())
    assert cli.main(["fsck", str(path)]) == 0
