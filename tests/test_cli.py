"""The `blockstore` command line, run as a separate process the way a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import blockstore

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockstore.tools.cli", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "s"
    with blockstore.open(path, block_size=1 << 20) as s:
        s.put_many([(b"k%02d" % i, bytes([i]) * 200_000) for i in range(8)])  # two blocks or more
        s.put(b"\x00\xff", b"binary key", ns="other")
        s.put_chunk("u", "s", "c", "a chunk")
        s.delete(b"k00")
    return path


def test_help() -> None:
    r = cli("--help")
    assert r.returncode == 0
    assert "stats" in r.stdout and "dump" in r.stdout
    for sub in ("stats", "dump"):
        r = cli(sub, "--help")
        assert r.returncode == 0 and "path" in r.stdout


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"blockstore {blockstore.__version__}"


def test_compact_is_a_registered_command() -> None:
    """compaction adds `compact` through the blockstore.commands entry point: the CLI lists it without
    importing compaction itself."""
    assert "compact" in cli("--help").stdout
    code = ("import sys, blockstore.tools.cli; "
            "assert not [m for m in sys.modules if m.startswith('blockstore.compaction')], sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 0, r.stderr


def test_stats_text(store: Path) -> None:
    r = cli("stats", str(store))
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("  ", 1) for line in r.stdout.splitlines() if "  " in line)
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["records (live)"] == "9"  # 7 KV left in default, 1 in other, 1 chunk
    assert "amplification" in r.stdout
    assert lines["space amplification"].endswith("x") and float(lines["space amplification"][:-1]) > 0
    assert float(lines["write amplification"][:-1]) >= 1
    assert "default" in lines["namespaces"] and "other" in lines["namespaces"]


def test_stats_json(store: Path) -> None:
    r = cli("stats", str(store), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["records"] == 9
    assert st["blocks"] >= 2
    assert st["write_amplification"] >= 1 and st["space_amplification"] > 0
    assert sorted(st["namespaces"]) == ["default", "other"]
    with blockstore.open(store, read_only=True) as s:
        want = s.stats().as_dict()
    for k in ("records", "live_bytes", "written_bytes", "blocks", "bytes_put", "bytes_appended"):
        assert st[k] == want[k], k


def test_dump_lists_blocks(store: Path) -> None:
    with blockstore.open(store, read_only=True) as s:
        table = s.block_table()
    r = cli("dump", str(store))
    assert r.returncode == 0, r.stderr
    for e in table:
        assert f"block={e.block_id:016x}" in r.stdout
    assert "state=sealed" in r.stdout
    rj = cli("dump", str(store), "--json")
    rows = json.loads(rj.stdout)
    assert [row["block"] for row in rows] == [f"{e.block_id:016x}" for e in table]
    assert sum(row["live_records"] for row in rows) == 9
    assert all(0 <= row["invalid_ratio"] <= 1 for row in rows)


def test_dump_keys_json(store: Path) -> None:
    r = cli("dump", str(store), "--keys", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    got = {(row["ns"], bytes.fromhex(row["key"])) for row in rows}
    want = {("default", b"k%02d" % i) for i in range(1, 8)} | {("other", b"\x00\xff")}
    assert got == want  # hex keys, the deleted key and the chunk record not among them
    assert all(row["key"] == row["key"].lower() for row in rows)


def test_dump_one_block_json(store: Path) -> None:
    with blockstore.open(store, read_only=True) as s:
        loc = s.locate_many([b"k03"])[0]
    assert loc is not None
    r = cli("dump", str(store), "--block", f"{loc.block_id:x}", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mine = [row for row in rows if row["offset"] == loc.offset]
    assert len(mine) == 1
    row = mine[0]
    assert row["key"] == b"k03".hex() and row["live"] is True and row["payload_ok"] is True
    assert row["kind"] == "kv" and row["payload_len"] == 200_000
    # the tombstone of k00 is listed (dead data) if it is in this block
    assert all(row["kind"] in ("kv", "chunk", "tombstone") for row in rows)


def test_missing_store_is_exit_8(tmp_path: Path) -> None:
    for args in (("stats", str(tmp_path / "nope")), ("dump", str(tmp_path / "nope")),
                 ("dump", str(tmp_path / "nope"), "--keys", "--json")):
        r = cli(*args)
        assert r.returncode == 8, (args, r.returncode)
        assert "nope" in r.stderr and r.stdout == ""
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "nope").exists()


def test_a_block_id_that_is_not_hex_is_a_usage_error_and_a_missing_block_operational(store: Path) -> None:
    r = cli("dump", str(store), "--block", "zz")
    assert r.returncode == 16 and r.stdout == ""
    assert r.stderr.startswith("usage: blockstore dump ") and "argument --block: a block id is hex" in r.stderr
    r = cli("dump", str(store), "--block", "ffffffff")
    assert r.returncode == 8 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "blockstore dump: no block 00000000ffffffff in the block table (`blockstore dump` lists them)"


@pytest.mark.parametrize("args", [(), ("bogus",), ("stats",), ("dump",), ("stats", "p", "--nope"),
                                  ("dump", "p", "--keys", "--block", "1"), ("dump", "p", "--block", "-1"),
                                  ("fsck", "p", "--namespace", "foo"), ("scan", "p", "--limit", "0"),
                                  ("get", "p", "zz", "--hex"), ("get", "p", "a\\qb"), ("get", "p")],
                         ids=["none", "unknown-command", "stats-no-path", "dump-no-path", "unknown-flag",
                              "exclusive-flags", "negative-block", "fsck-namespace-without-repair", "scan-limit-0",
                              "get-bad-hex", "get-bad-escape", "get-no-key"])
def test_bad_usage_is_exit_16(args: tuple[str, ...]) -> None:
    """Every usage error exits 16 with the usage of the command it was for, before touching the path."""
    r = cli(*args)
    assert r.returncode == 16, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    prog = f"blockstore {args[0]}" if args and args[0] != "bogus" else "blockstore"
    assert r.stderr.startswith(f"usage: {prog} "), r.stderr
    assert f"\n{prog}: error: " in r.stderr, r.stderr


def test_every_command_explains_itself() -> None:
    top = cli("--help").stdout
    for command in ("get", "scan", "stats", "dump", "fsck", "compact", "metrics", "top"):
        assert command in top, command
        r = cli(command, "--help")
        assert r.returncode == 0 and "--json" in r.stdout, command
        assert len(r.stdout.split("options:")[0]) > 200, f"{command} --help says too little:\n{r.stdout}"


def test_not_a_store_is_said_one_way(tmp_path: Path) -> None:
    """Every command words a path that is not a store the same way, never with the engine's create=True."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "damaged" / "blocks").mkdir(parents=True)
    for name, why in (("nope", "not a directory"), ("empty", "none of MANIFEST.json, blocks/, directory/ is there"),
                      ("damaged", "no MANIFEST.json there; `blockstore fsck` checks a damaged one")):
        path = tmp_path / name
        for command in ("stats", "dump", "scan", "compact"):
            r = cli(command, str(path))
            assert r.returncode == 8, (command, name, r.stderr)
            assert r.stderr.strip() == f"blockstore {command}: no store at {str(path)!r} ({why})", r.stderr
        r = cli("get", str(path), "k")
        assert r.stderr.strip() == f"blockstore get: no store at {str(path)!r} ({why})"
        assert "create=True" not in r.stderr
    assert not (tmp_path / "nope").exists() and not any((tmp_path / "empty").iterdir())


def test_text_dump_prints_no_control_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with blockstore.open(path) as s:
        s.put(b"k", b"v", partition=b"p\x00\x1b[31m")
    r = cli("dump", str(path))
    assert r.returncode == 0, r.stderr
    assert all(ch.isprintable() for ch in r.stdout.replace("\n", "")), repr(r.stdout)
    assert "\\x00p\\x00\\x1b[31m" in r.stdout  # partition = namespace + NUL + partition, escaped
    rows = json.loads(cli("dump", str(path), "--json").stdout)
    assert any(row["partition"].endswith("p\\x00\\x1b[31m") for row in rows)


def test_stats_beside_a_live_writer(tmp_path: Path) -> None:
    """The CLI opens read-only: it works while this process holds the writer lock, and sees what the
    writer had committed when it started."""
    path = tmp_path / "live"
    with blockstore.open(path, durability="sync") as s:
        s.put_many([(b"w%d" % i, b"x" * 1000) for i in range(25)])
        r = cli("stats", str(path), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["records"] == 25
        r = cli("dump", str(path), "--keys", "--json")
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 25
        s.put(b"after", b"y")  # the writer is undisturbed
        assert s.get(b"after") == b"y"
    with blockstore.open(path) as s:
        assert s.stats().records == 26


def test_stats_beside_a_live_cache_mode_writer(tmp_path: Path) -> None:
    path = tmp_path / "live"
    with blockstore.open(path) as s:
        s.put_many([(b"w%d" % i, b"x" * 10) for i in range(5)])
        r = cli("stats", str(path), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["records"] == 5


def test_cli_on_a_corrupt_manifest_is_exit_8(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with blockstore.open(path) as s:
        s.put(b"k", b"v")
    (path / "MANIFEST.json").write_text("{broken")
    r = cli("stats", str(path))
    assert r.returncode == 8 and "manifest" in r.stderr.lower() and "Traceback" not in r.stderr
