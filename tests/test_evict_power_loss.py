"""Power cuts around an eviction of whole blocks (`Store.evict_blocks`), through the fault layer of
tests/test_power_loss.py (`FaultInjector`: what survives a cut is only what was made durable).

A store is filled and closed (everything durable), reopened in cache mode, and its three oldest sealed
blocks evicted; a power image is taken at the eviction's hook points (before its directory write, after
it, after the unlinks), after a few more puts, and after the close. Every image, opened: no evicted key
is back, every other key of the durable fill reads its value, no block file is left that the directory
does not account for (fsck clean after a close), and a directory rebuilt from the blocks agrees.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from compaction_helpers import rebuild_violations, value  # noqa: E402
from power_loss import rocksdb_sync_points, work_dir  # noqa: E402

import blockstore  # noqa: E402
from blockstore import hooks  # noqa: E402
from blockstore.directory import BLOCK_SEALED  # noqa: E402
from blockstore.native import FaultInjector  # noqa: E402
from blockstore.tools import fsck  # noqa: E402

BLOCK = 64 << 10
SIZE = 8000


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory on a tmpfs when there is one (the fault layer decides what survives), spelled as
    realpath spells it (the layer matches paths)."""
    base = work_dir()
    d = Path(os.path.realpath(tempfile.mkdtemp(prefix="evict-power-", dir=base)))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _open(p: Path) -> blockstore.Store:
    return blockstore.open(p, durability="cache", block_size=BLOCK, backend="native", idle_seal_seconds=0)


def test_power_cuts_around_an_eviction_never_bring_an_evicted_key_back(root: Path) -> None:
    live, shadow = root / "root", root / "shadow"
    live.mkdir()
    shadow.mkdir()
    fi = FaultInjector()
    fi.install()
    fi.track(str(live), str(shadow))
    images: list[tuple[str, Path]] = []

    def image(label: str) -> None:
        dst = root / f"image-{len(images)}-{label}"
        fi.power_image(str(live), str(dst))
        images.append((label, dst))

    p = live / "store"
    keys = [b"k-%d" % i for i in range(60)]
    try:
        with rocksdb_sync_points(fi):
            s = _open(p)
            for k in keys:
                s.put_many([(k, value(k, 1, SIZE))])
            s.close()  # the fill is durable
            s = _open(p)
            victims = [e.block_id for e in s.block_table() if e.state == BLOCK_SEALED][:3]
            gone = {sfx[5:] for b in victims for _o, sfx in s.dir.block_records(b)}
            assert victims and gone
            with hooks.installed("evict.begin", lambda *_a: image("begin")), \
                    hooks.installed("evict.written", lambda *_a: image("written")):
                out = s.evict_blocks(victims)
            assert sorted(out.blocks) == sorted(victims)
            image("unlinked")
            for i in range(12):
                s.put_many([(b"late-%d" % i, value(b"late-%d" % i, 1, SIZE))])
            image("more-puts")
            s.close()
            image("closed")
    finally:
        fi.track(None)
        fi.uninstall()
    kept = [k for k in keys if k not in gone]
    for label, img in images:
        sp = img / "store"
        s = _open(sp)
        try:
            got = s.get_many(sorted(gone))
            if label == "begin":
                assert all(g is not None for g in got), f"{label}: evicted before the eviction's directory write"
            else:
                assert got == [None] * len(gone), f"{label}: an evicted key came back after the power cut"
            for k, v in zip(kept, s.get_many(kept)):
                assert v is not None and bytes(v) == value(k, 1, SIZE), f"{label}: {k!r} lost"
            assert rebuild_violations(s) == [], label
        finally:
            s.close()
        findings = [f.line() for f in fsck.check(sp, log=False).findings]
        assert not findings, (label, findings)
