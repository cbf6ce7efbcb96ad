"""`blockstore top` (issue 17): run in a pseudo-terminal beside a writer process that keeps writing, the
screen shows live numbers that change (records, throughput) and, given the writer's metrics endpoint, its
hit rate; --once and --json print one frame; a path that is no store is an operational error."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore
from blockstore.tools import top

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# A writer process: serves its metrics, then puts a batch of records and reads some (hits and misses) every
# 50 ms until its stdin closes.
WRITER = textwrap.dedent("""
    import sys, threading, time
    import blockstore
    from blockstore import metrics
    store = blockstore.open(sys.argv[1], block_size=64 << 10)
    metrics.track(store)  # what Store's open does: its operations become countable
    endpoint = metrics.serve(0, addr="127.0.0.1")
    print(endpoint.port, flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    i = 0
    while not stop.wait(0.05):
        store.put_many([(b"k%06d" % (i + j), b"v" * 2000) for j in range(5)])
        store.get_many([b"k%06d" % i, b"absent"])
        i += 5
    store.close()
""")


@contextlib.contextmanager
def writer(path: Path) -> Iterator[int]:
    """A writer process on `path`; yields its metrics port."""
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=ROOT)
    try:
        assert w.stdout is not None
        yield int(w.stdout.readline())
    finally:
        assert w.stdin is not None
        w.stdin.close()
        try:
            w.wait(timeout=20)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def _screen(fd: int, seconds: float) -> str:
    """What the terminal received in `seconds` (escape sequences removed)."""
    out = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return ANSI.sub("", out.decode("utf-8", "replace"))


def _wait_reading(proc: subprocess.Popen[bytes], fd: int, seconds: float) -> int | None:
    """Wait for `proc` to exit while reading its terminal, as a real terminal would: a child blocked
    writing its last frames into a full pseudo-terminal buffer never exits otherwise."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            try:
                os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
    except subprocess.TimeoutExpired:
        return None


def test_top_in_a_terminal_shows_numbers_that_change_while_a_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with writer(path) as port:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockstore.tools.top", str(path), "--interval", "0.4",
             "--metrics", f"http://127.0.0.1:{port}/metrics"],
            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, start_new_session=True)
        os.close(slave)
        try:
            screen = _screen(master, 6.0)
            proc.send_signal(signal.SIGINT)
            assert _wait_reading(proc, master, 20.0) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
    records = [int(n.replace(",", "")) for n in re.findall(r"│ records\s*│\s*([\d,]+) │", screen)]
    assert len(records) >= 4, screen[-3000:]
    assert records == sorted(records) and records[-1] > records[0], records  # live, growing
    put_rates = re.findall(r"│ put\s*│\s*([\d.]+ (?:B|KiB|MiB))/s │", screen)
    assert any(float(r.split()[0]) > 0 for r in put_rates[1:]), put_rates
    hits = re.findall(r"│ get hits\s*│\s*([\d.]+) % │", screen)  # half of the writer's reads hit
    assert hits and all(40.0 <= float(h) <= 60.0 for h in hits), hits
    assert f"blockstore top {path}" in screen


def _main(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = top.main(list(argv))
    return code, out.getvalue()


def test_once_and_json_print_one_frame(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with blockstore.open(path, block_size=64 << 10) as s:
        for i in range(40):
            s.put(b"k%02d" % i, bytes([i]) * 3000)
        s.delete_many([b"k%02d" % i for i in range(15)])  # the first sealed block past φ 0.5
        stats = s.stats()
        code, text = _main(path, "--once", "--interval", "0.05")
        assert code == 0
        assert re.search(r"records\s*│\s*25 │", text), text
        assert re.search(r"gc due\s*│\s*1 │", text), text
        assert "pass --metrics URL" in text

        code, text = _main(path, "--once", "--json", "--interval", "0.05")
        doc = json.loads(text)
        assert code == 0 and doc["stats"]["records"] == 25 and doc["stats"]["bytes_put"] == stats.bytes_put
        assert doc["gc_due_blocks"] == 1 and doc["rates"]["put_bytes_s"] == 0.0 and doc["rates"]["get_hit_ratio"] is None


def test_errors(tmp_path: Path) -> None:
    assert _main(str(tmp_path / "missing"), "--once")[0] == 8
    blockstore.open(tmp_path / "s").close()
    assert _main(str(tmp_path / "s"), "--once", "--interval", "0")[0] == 16  # usage errors, as every command's
    assert _main(str(tmp_path / "s"), "--interval", "x")[0] == 16
    # an endpoint that cannot be read: exit 8, saying why (tests/test_left_alone_30.py)
    assert _main(str(tmp_path / "s"), "--once", "--interval", "0.01", "--metrics", "http://127.0.0.1:1/metrics")[0] == 8


@pytest.mark.parametrize("interval", ["nan", "-1", "inf", "1e-300", "0.001"])
def test_interval_must_be_a_finite_number_of_seconds_not_too_small(tmp_path: Path, interval: str) -> None:
    blockstore.open(tmp_path / "s").close()
    assert _main(str(tmp_path / "s"), "--once", "--interval", interval)[0] == 16
