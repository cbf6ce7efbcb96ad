"""Every benchmark takes the same flags (issue 17): `--quick`, `--full`, `--dir PATH`, `--json PATH`, and a
quick run writes NAME_quick.json by default, never the committed full results NAME.json. No heavy runs here:
`--help` of each bench, `bench.common.results_path` directly, and three small benches run at toy sizes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import RESULTS, bench_mode, results_path, standard_args

ROOT = Path(__file__).resolve().parent.parent
# Modules of bench/ that are not benchmarks, so take none of the four flags:
NOT_BENCHES = {
    "__init__": "the package",
    "common": "helpers every bench imports (this interface among them)",
    "ceilings": "raw-disk ceiling helpers shared by throughput, lmcache_peer and gpu_path",
    "traces": "workload trace generators for compaction",
    "report": "the suite runner: it passes these flags to each bench, its own are --quick/--full/--only/...",
    "ab": "A/B of two commits: runs benches in worktrees, its own flags name commits and rounds",
}
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in NOT_BENCHES)
ENV = {**os.environ, "COLUMNS": "200", "DO_NOT_TRACK": "1", "LMCACHE_TRACK_USAGE": "false"}


def test_benchmarks_are_found_and_helpers_have_no_main() -> None:
    assert {"throughput", "compaction", "eviction", "gc_speed", "block_size", "directory_mmap"} <= set(BENCHES)
    for name in BENCHES:  # a benchmark is a module one runs: it has a __main__ block
        assert 'if __name__ == "__main__":' in (ROOT / "bench" / f"{name}.py").read_text(), name
    for name in ("common", "ceilings", "traces"):
        assert "__main__" not in (ROOT / "bench" / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", BENCHES)
def test_help_lists_the_four_flags_and_both_default_paths(name: str) -> None:
    p = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for flag in ("--quick", "--full", "--dir", "--json"):
        assert f"{flag} " in p.stdout or f"{flag}\n" in p.stdout or f"{flag}," in p.stdout, (name, flag)
    assert f"{name}_quick.json" in p.stdout and f"{name}.json" in p.stdout, name


def parser(default_mode: str = "full") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="x")
    standard_args(ap, "demo", default_mode=default_mode)
    return ap


def test_results_path_by_mode() -> None:
    full = os.path.join(RESULTS, "demo.json")
    quick = os.path.join(RESULTS, "demo_quick.json")
    assert results_path(parser().parse_args([]), "demo") == full
    assert results_path(parser().parse_args(["--full"]), "demo") == full
    assert results_path(parser().parse_args(["--quick"]), "demo") == quick
    assert results_path(parser("quick").parse_args([]), "demo") == quick  # a bench whose default is quick
    assert results_path(parser("quick").parse_args(["--full"]), "demo") == full
    assert results_path(parser().parse_args(["--quick", "--json", "/x/y.json"]), "demo") == "/x/y.json"
    assert bench_mode(parser().parse_args([])) == "full" and bench_mode(parser("quick").parse_args([])) == "quick"
    args = parser().parse_args(["--dir", "/scratch"])
    assert args.dir == "/scratch" and args.json is None


def test_quick_and_full_exclude_each_other_and_modes_are_checked() -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--quick", "--full"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="default_mode"):
        parser("medium")


@pytest.mark.parametrize("cmd", [
    ["block_size", "--records", "4", "--repeats", "1", "--sizes", "4"],
    ["directory_mmap", "--keys", "500", "--repeats", "1"],
    ["gc_speed", "--mb", "2", "--partitions", "4", "--repeats", "1"],
])
def test_small_bench_writes_json_path_and_prints_its_summary_last(cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", f"bench.{cmd[0]}", "--quick", *cmd[1:], "--dir", str(tmp_path / "s"),
                        "--json", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict) and summary
    doc = json.loads(out.read_text())
    assert f"bench.{cmd[0]}" in doc["command"] and "--quick" in doc["command"] and doc["machine"]["cpu_count"] >= 1
