"""Review of session 30's changes (H72): a named regression test for each defect found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
/* fsync and fdatasync fail with EIO while the file named by H72_FAIL_SYNC exists */
static int failing(void) { const char *p = getenv("H72_FAIL_SYNC"); return p && access(p, F_OK) == 0; }
int fdatasync(int fd) { static int (*r)(int); if (!r) r = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
                        if (failing()) { errno = EIO; return -1; } return r(fd); }
int fsync(int fd) { static int (*r)(int); if (!r) r = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
                    if (failing()) { errno = EIO; return -1; } return r(fd); }
"""

_LEDGER_AFTER_A_FAILED_SYNC = """
import os, sys
from blockstore.remote.ledger import Ledger
flag, path = sys.argv[1], sys.argv[2]
led = Ledger(path)
led.set_cursor(3)
open(flag, "w").close()  # the disk starts failing syncs
try:
    led.reserve_many({8: 5}, 6)
except Exception as exc:
    print("reserve failed:", exc)
else:
    raise SystemExit("the reserve did not fail")
try:  # the disk still fails: the unsure reservation must not be read (the uploader names objects by it)
    got = led.reservation(8)
except Exception as exc:
    print("read while failing raised:", type(exc).__name__)
else:
    print("read while failing:", got)
os.remove(flag)  # the disk recovers
print("reservation after:", led.reservation(8), led.next_seq())
led.set_cursor(9)  # later durable writes work again
led.reserve_many({10: 6}, 7)
print("cursor after:", led.cursor, led.reservation(10))
led.close()
print("closed")
"""


_POOL_AFTER_A_FAILED_SYNC = """
import os, sys
from blockstore.remote.pool import RemotePool
flag, path = sys.argv[1], sys.argv[2]
pool = RemotePool(None, path)  # no object is read here
open(flag, "w").close()
try:
    pool._ingest([])  # the nodes' cursors, in one durable write
except Exception as exc:
    print("ingest failed:", exc)
os.remove(flag)
pool._ingest([])
print("ingest after: ok")
pool.close()
print("closed")
"""


def _run(tmp_path: Path, script_text: str) -> str:
    so = _shim(tmp_path)
    flag = tmp_path / "fail-now"
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(script_text))
    env = dict(os.environ, LD_PRELOAD=so, H72_FAIL_SYNC=str(flag),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, str(script), str(flag), str(tmp_path / "db")], env=env,
                         capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return text


def _shim(tmp_path: Path) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the fsync-failing shim")
    src, so = tmp_path / "failsync.c", tmp_path / "failsync.so"
    src.write_text(_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(src), "-ldl"], check=True)
    return str(so)


def test_remote_ledger_reopens_after_a_failed_durable_write(tmp_path: Path) -> None:
    """81f45c3 moved the remote tier's databases to an unsynced write + flush_wal(True). A sync that fails
    leaves the batch readable in the process, and RocksDB refuses every later write of that handle: the
    ledger went on serving the unsynced reservation (the uploader PUTs index objects named by it, and flags
    the block remote in the store, durably, while a power loss takes the reservation back, so the next block
    gets the same publication number), and it took no write again until the process restarted (its close
    raised too). Now the handle is reopened before its next use, as the engine settles a failed commit."""
    text = _run(tmp_path, _LEDGER_AFTER_A_FAILED_SYNC)
    assert "reserve failed:" in text
    assert "read while failing raised: IOErrorBS" in text, text  # not the reservation the disk may not hold
    # the disk recovered: the reopen replayed the WAL, whose bytes were written (only the sync failed)
    assert "reservation after: {'seq': 5} 6" in text, text
    assert "cursor after: 9 {'seq': 6}" in text, text
    assert "closed" in text, text


def test_remote_pool_writes_again_after_a_failed_durable_write(tmp_path: Path) -> None:
    """The pool's index (and the reclaim list: the same SyncedDB) took no write again after one failed sync,
    until the process restarted."""
    text = _run(tmp_path, _POOL_AFTER_A_FAILED_SYNC)
    assert "ingest failed:" in text, text
    assert "ingest after: ok" in text and "closed" in text, text
