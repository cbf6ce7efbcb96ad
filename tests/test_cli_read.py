"""`blockstore get` and `blockstore scan`: reading a key and listing keys from the shell (issue 17).

Mostly in-process (`main`, output through capfd, which sees the raw bytes `get` writes); the round trip
of escaped keys and the pipe into `head` run as separate processes, the way a user runs them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

import blockstore
from blockstore.tools.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from blockstore.tools.cli_common import escape, parse_key, terminal_text

ROOT = Path(__file__).resolve().parent.parent
ODD_KEYS = [b"\x00\xff", b"a b", b"back\\slash", b"\x1b[31mred", "caf\u00e9".encode(), b"\\x41"]
VALUES = {b"k%03d" % i: bytes([i % 251]) * (100 + i) for i in range(300)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("read") / "s"
    with blockstore.open(path, block_size=1 << 20) as s:
        s.put_many(list(VALUES.items()))
        s.put_many([(k, b"odd:" + k) for k in ODD_KEYS], ns="other")
        s.delete(b"k000")
    return path


def run_cli(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = main(list(args))
    out = capfd.readouterr()
    return rc, out.out, out.err


def cli_bytes(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "blockstore.tools.cli", *args], capture_output=True, cwd=str(ROOT),
                          timeout=120)


@pytest.mark.parametrize("key", ODD_KEYS + [b"plain", bytes(range(256))])
def test_escape_is_printable_and_parse_key_reads_it_back(key: bytes) -> None:
    text = escape(key)
    assert text.isprintable() and " " not in text
    assert parse_key(text, hex_input=False) == key
    assert parse_key(key.hex(), hex_input=True) == key


def test_get_writes_the_raw_value(store: Path) -> None:
    r = cli_bytes("get", str(store), "k005")
    assert r.returncode == EXIT_OK and r.stdout == VALUES[b"k005"] and r.stderr == b""
    r = cli_bytes("get", str(store), "00ff", "--hex", "--ns", "other")
    assert r.returncode == EXIT_OK and r.stdout == b"odd:\x00\xff"


def test_get_to_a_file_and_as_json(store: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "value.bin"
    rc, text, err = run_cli(capfd, "get", str(store), "k123", "--out", str(out))
    assert rc == EXIT_OK and text == "" and err == ""
    assert out.read_bytes() == VALUES[b"k123"]
    rc, text, err = run_cli(capfd, "get", str(store), "k123", "--json")
    assert rc == EXIT_OK, err
    doc = json.loads(text)
    assert base64.b64decode(doc["value_base64"]) == VALUES[b"k123"]
    assert doc["size"] == len(VALUES[b"k123"]) and doc["key"] == b"k123".hex() and doc["ns"] == "default"
    with blockstore.open(store, read_only=True) as s:
        [loc] = s.locate_many([b"k123"])
    assert loc is not None and doc["block"] == f"{loc.block_id:016x}" and doc["offset"] == loc.offset


def test_get_a_missing_key_or_namespace_is_operational(store: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capfd, "get", str(store), "k000")  # deleted
    assert rc == EXIT_ERROR and out == ""
    assert err == "blockstore get: no key k000 in namespace 'default'\n"
    rc, out, err = run_cli(capfd, "get", str(store), "k001", "--ns", "nope")
    assert rc == EXIT_ERROR and err == "blockstore get: no namespace 'nope' in this store (it has: default, other)\n"


def test_get_bad_key_input_is_usage(store: Path, capfd: pytest.CaptureFixture[str]) -> None:
    for args in (("0g", "--hex"), ("a\\qb",), ("",)):
        rc, out, err = run_cli(capfd, "get", str(store), *args)
        assert rc == EXIT_USAGE and out == "" and err.startswith("usage: blockstore get "), (args, err)


def test_scan_lists_keys_sizes_and_blocks(store: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capfd, "scan", str(store), "--ns", "default", "--json")
    assert rc == EXIT_OK, err
    rows = json.loads(out)
    assert [bytes.fromhex(r["key"]) for r in rows] == sorted(set(VALUES) - {b"k000"})
    with blockstore.open(store, read_only=True) as s:
        locs = s.locate_many([bytes.fromhex(r["key"]) for r in rows])
    for r, loc in zip(rows, locs):
        assert loc is not None
        assert r["size"] == len(VALUES[bytes.fromhex(r["key"])]) == loc.payload_len
        assert (r["block"], r["offset"]) == (f"{loc.block_id:016x}", loc.offset)
    assert len({r["block"] for r in rows}) >= 1


def test_scan_text_escapes_keys_and_they_round_trip_into_get(store: Path) -> None:
    r = cli_bytes("scan", str(store), "--ns", "other")
    assert r.returncode == EXIT_OK, r.stderr
    text = r.stdout.decode("ascii")  # nothing but ASCII reaches the terminal
    lines = text.splitlines()
    assert all(line.isprintable() for line in lines)
    assert len(lines) == len(ODD_KEYS)
    for line in lines:
        fields = dict(field.split("=", 1) for field in line.split("  "))
        assert fields["ns"] == "other"
        got = cli_bytes("get", str(store), fields["key"], "--ns", "other")
        assert got.returncode == EXIT_OK, got.stderr
        assert got.stdout.startswith(b"odd:") and int(fields["size"]) == len(got.stdout)
        assert escape(got.stdout[4:]) == fields["key"]


def test_scan_prefix_limit_hex_and_every_namespace(store: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capfd, "scan", str(store), "--prefix", "k01", "--limit", "5")
    assert rc == EXIT_OK
    assert [ln.split("  ")[1] for ln in out.splitlines()] == [f"key=k01{i}" for i in range(5)]
    rc, out, _ = run_cli(capfd, "scan", str(store), "--prefix", b"k29".hex(), "--hex")
    assert [ln.split("  ")[1] for ln in out.splitlines()] == ["key=" + (b"k29%d" % i).hex() for i in range(10)]
    rc, out, _ = run_cli(capfd, "scan", str(store), "--json")
    rows = json.loads(out)
    assert {r["ns"] for r in rows} == {"default", "other"} and len(rows) == len(VALUES) - 1 + len(ODD_KEYS)
    rc, out, _ = run_cli(capfd, "scan", str(store), "--prefix", "zzz", "--json")
    assert rc == EXIT_OK and json.loads(out) == []
    rc, out, err = run_cli(capfd, "scan", str(store), "--ns", "nope")
    assert rc == EXIT_ERROR and "no namespace 'nope'" in err


def test_scan_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`blockstore scan S | head`: more output than a pipe holds, so the writer sees the reader leave."""
    store = tmp_path / "many"
    with blockstore.open(store) as s:
        s.put_many([(b"key-%06d" % i, b"v") for i in range(5000)])  # ~80 bytes a line: 400 KB of output
    r = subprocess.run(f"{sys.executable} -m blockstore.tools.cli scan {store} | head -2", shell=True,
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    assert r.stderr == "", r.stderr


def test_get_on_a_terminal_escapes_control_bytes(store: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """Raw bytes go to a pipe or file untouched (above); on a terminal an escape sequence in a value is
    shown, not obeyed."""
    assert terminal_text(b"line 1\n\tcaf\xc3\xa9 \x1b[2J\x00\xff") == "line 1\n\tcaf\u00e9 \\x1b[2J\\x00\\xff"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    rc, out, err = run_cli(capfd, "get", str(store), "\\x1b[31mred", "--ns", "other")
    assert rc == EXIT_OK, err
    assert out == "odd:\\x1b[31mred\n"
