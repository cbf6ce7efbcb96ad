"""bench/scaling.py: a tiny real run (every job in its own process, a real SIGKILL crash, compaction
while reading), its growth verdicts, plots and markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import scaling

REPO = Path(__file__).resolve().parents[1]


def _row(records: int, open_s: float, rss: float, dir_bytes: float) -> dict:
    us = {"p50": 100.0, "p99": 200.0, "n": 10, "mean": 110.0}
    return {"records": records, "open_clean_s": {"median": open_s}, "open_crash_s": 0.1, "directory_bytes": dir_bytes,
            "rss_open_mb": rss, "rss_after_gets_mb": rss, "get_cold_us": us, "get_warm_us": us,
            "put": {"records_per_s": 1000.0}, "compaction": {"moved_mb_per_s": 50.0, "get_during_us": us}}


def test_verdicts_flag_a_figure_that_grows_with_the_record_count() -> None:
    flat = [_row(10_000, 0.03, 40, 1e6), _row(10_000_000, 0.031, 41, 1e9)]
    v = scaling.verdicts({"records": flat})["records"]
    assert v["open_clean_s.median"]["ok"] and abs(v["open_clean_s.median"]["exponent"]) < 0.05
    assert v["directory_bytes"]["ok"] and abs(v["directory_bytes"]["exponent"] - 1) < 0.01  # linear: allowed
    scanning = [_row(10_000, 0.03, 40, 1e6), _row(10_000_000, 30.0, 41, 1e9)]  # open time linear in records
    assert not scaling.verdicts({"records": scanning})["records"]["open_clean_s.median"]["ok"]
    leaking = [_row(10_000, 0.03, 40, 1e6), _row(10_000_000, 0.03, 4000, 1e9)]  # memory per record
    assert not scaling.verdicts({"records": leaking})["records"]["rss_open_mb"]["ok"]
    slow = [_row(10_000, 0.03, 40, 1e6), _row(10_000_000, 0.03, 40, 1e9)]
    slow[1]["put"]["records_per_s"] = 400.0  # throughput fell by more than half
    assert not scaling.verdicts({"records": slow})["records"]["put.records_per_s"]["ok"]


def test_version_of_follows_the_overwrite_windows() -> None:
    windows = [[10, 20], [16, 26]]  # every other record of each window, from its first, was rewritten
    assert [scaling.version_of(i, windows) for i in (9, 10, 11, 16, 17, 20, 21, 26)] == [0, 1, 0, 2, 0, 1, 0, 0]


def test_a_tiny_run_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    p = subprocess.run([sys.executable, "-m", "bench.scaling", "--series", "records", "--stages", "1000,3000",
                        "--gets", "20", "--dir", str(tmp_path / "scratch"), "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["series"]["records"]
    assert [r["stage"] for r in rows] == [1000, 3000] and doc["partial"] is False
    for r in rows:
        assert r["records"] >= r["stage"] and r["blocks"] > 0 and r["directory_bytes"] > 0
        assert len(r["open_clean_s"]["values"]) == 3 and all(v > 0 for v in r["open_clean_s"]["values"])
        assert r["open_crash_s"] > 0 and r["recovery"]["scanned_blocks"] >= 1  # the crash left open blocks
        assert r["get_cold_us"]["n"] == 20 and r["get_warm_us"]["p50"] > 0
        assert r["put"]["records_per_s"] > 0 and r["rss_open_mb"] > 0
        c = r["compaction"]
        assert c["gc_bytes"] > 0 and c["moved_mb_per_s"] > 0 and c["get_during_us"]["n"] >= 1
    assert rows[-1]["compaction"]["timeline"], "the last stage keeps its latency timeline"
    assert set(doc["verdicts"]["records"]) == {f for f, *_ in scaling.FIGURES}
    assert not list((tmp_path / "scratch").iterdir()), "the scratch store is removed"
    files = scaling.plots(doc, str(tmp_path))
    assert len(files) == 2 and all(Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    md = scaling.summary_markdown(doc)
    assert f"| records | {rows[-1]['records']:,} |" in md and "bench.scaling" in md and "Machine:" in md
    assert json.loads(p.stdout.strip().splitlines()[-1])["series"]["records"][0]["records"] == rows[0]["records"]
