"""Logs (issue 17): blockstore is quiet by default; recovery, fsck and repair say what they did (INFO), and
anything that lost or quarantined data is a WARNING; `blockstore.logs.configure(verbosity)` is what -v/-q
set."""

from __future__ import annotations

import glob
import io
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore
from blockstore import logs
from blockstore.tools import fsck, repair


def _crash(path: Path, n: int = 5) -> None:
    """n puts in cache mode, then a crash (abandon: no seal, not marked clean)."""
    s = blockstore.open(path)
    for i in range(n):
        s.put(b"k%d" % i, bytes([i]) * 3000)
    s.abandon()


def _cut_last_record(path: Path) -> None:
    """What a power cut may do to a cache-mode store: the block's unsynced tail is gone."""
    [blk] = glob.glob(os.path.join(path, "blocks", "*.blk"))
    os.truncate(blk, os.path.getsize(blk) - 100)


@pytest.fixture
def configured() -> Iterator[None]:
    yield
    logs.unconfigure()


def test_recovery_after_an_unclean_stop_logs_what_it_did(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _crash(tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="blockstore"):
        with blockstore.open(tmp_path / "s") as s:
            assert s.recovery_report is not None
            assert s.get(b"k4") == bytes([4]) * 3000
    [rec] = [r for r in caplog.records if r.name == "blockstore.recovery"]
    assert rec.levelno == logging.INFO
    msg = rec.getMessage()
    assert str(tmp_path / "s") in msg and "recovered after an unclean stop" in msg
    assert "scanned 1 block(s) (0000000000000001)" in msg and "dropped 0 directory entr(ies)" in msg

    caplog.clear()  # a clean close, then an open: no recovery, no recovery line
    with caplog.at_level(logging.INFO, logger="blockstore"):
        blockstore.open(tmp_path / "s").close()
    assert not [r for r in caplog.records if r.name == "blockstore.recovery"]


def test_recovery_that_dropped_records_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _crash(tmp_path / "s")
    _cut_last_record(tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="blockstore"):
        with blockstore.open(tmp_path / "s") as s:
            assert s.get(b"k4") is None and s.get(b"k3") == bytes([3]) * 3000
            assert s.recovery_report is not None and s.recovery_report["dropped_entries"] == 1
    [rec] = [r for r in caplog.records if r.name == "blockstore.recovery"]
    assert rec.levelno == logging.WARNING
    assert "dropped 1 directory entr(ies) naming records that were lost" in rec.getMessage()


def test_quiet_by_default(tmp_path: Path) -> None:
    """No logging configured: not a line, even for the warning of a recovery that dropped records (the
    NullHandler keeps Python's last-resort handler from printing it)."""
    _crash(tmp_path / "s")
    _cut_last_record(tmp_path / "s")
    script = textwrap.dedent(f"""
        import blockstore
        with blockstore.open({str(tmp_path / "s")!r}) as s:
            assert s.recovery_report["dropped_entries"] == 1
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n" and out.stderr == ""


@pytest.mark.parametrize(("verbosity", "shows_info", "shows_warning"),
                         [(-1, False, False), (0, False, True), (1, True, True), (2, True, True)])
def test_configure_verbosity(tmp_path: Path, configured: None, verbosity: int, shows_info: bool,
                             shows_warning: bool) -> None:
    stream = io.StringIO()
    logs.configure(verbosity, stream)
    logs.configure(verbosity, stream)  # again: replaces its handler, lines are not doubled
    _crash(tmp_path / "s")
    _cut_last_record(tmp_path / "s")
    blockstore.open(tmp_path / "s").close()  # a WARNING (records dropped)
    assert fsck.check(tmp_path / "s").findings == []  # an INFO (fsck: clean)
    text = stream.getvalue()
    assert ("WARNING blockstore.recovery:" in text) == shows_warning
    assert ("INFO blockstore.fsck: fsck" in text) == shows_info
    assert text.count("blockstore.recovery:") <= 1
    assert logs.level_for(verbosity) == logging.getLogger("blockstore").level


def test_fsck_logs_findings_and_repair_warns_of_quarantine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s"
    with blockstore.open(path) as s:
        for i in range(5):
            s.put(b"k%d" % i, bytes([i]) * 3000)
    [blk] = glob.glob(os.path.join(path, "blocks", "*.blk"))
    with open(blk, "r+b") as f:  # damage the first record's payload
        f.seek(4096 + 200)
        f.write(b"\xff\xfe")
    with caplog.at_level(logging.INFO, logger="blockstore"):
        rep = fsck.check(path)
    assert [f.kind for f in rep.findings] == ["payload"]
    fsck_lines = [r.getMessage() for r in caplog.records if r.name == "blockstore.fsck"]
    assert fsck_lines == [f"fsck {path}: 1 finding(s): payload 1", f"fsck {path}: {rep.findings[0].line()}"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="blockstore"):
        res = repair.repair(path)
    assert res.lost_found and all(f.corrected for f in res.findings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path}: put 0000000000000001.blk in lost+found: damaged block, evacuated"]
    infos = [r.getMessage() for r in caplog.records if r.name == "blockstore.repair" and r.levelno == logging.INFO]
    assert infos == [f"repair {path}: {res.findings[0].line()}"]
    assert not [r for r in caplog.records if r.name == "blockstore.fsck"]  # repair's own checks stay quiet


def test_open_and_seal_log_one_line_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _crash(tmp_path / "s")
    with caplog.at_level(logging.INFO, logger="blockstore"):
        with blockstore.open(tmp_path / "s") as s:
            s.put(b"after", b"v")  # a new block, sealed at close
    opened = [r.getMessage() for r in caplog.records if r.name == "blockstore.open"]
    assert opened == [f"{tmp_path / 's'}: opened after recovery (1 block(s) scanned, 0 entr(ies) dropped); "
                      "durability cache, 1 block(s)"]
    sealed = [r.getMessage() for r in caplog.records if r.name == "blockstore.blocks"]
    assert len(sealed) == 1 and "sealed block 0000000000000002" in sealed[0]
