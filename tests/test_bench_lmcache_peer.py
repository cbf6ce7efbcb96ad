"""The LMCache peer benchmark (bench/lmcache_peer.py) runs end to end on a tiny setting and keeps its output
contract: the JSON file, the one-line JSON summary as the last stdout line, every loaded object verified
against what was stored, and no scratch data left behind. The real figures come from
`python -m bench.lmcache_peer` (bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmcache")
pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
RECORDS = 16


def test_tiny_run_keeps_the_json_contract_and_verifies_every_load(tmp_path: Path) -> None:
    out = tmp_path / "peer.json"
    scratch = tmp_path / "scratch"
    env = {**os.environ, "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "LMCACHE_TRACK_USAGE": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.lmcache_peer", "--records", str(RECORDS), "--repeats", "1",
         "--task-keys", "4", "--inflight", "2", "--dir", str(scratch), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    last = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = {"store_bs_vs_fs", "warm_load_bs_vs_fs", "cold_load_bs_vs_fs", "store_bs_vs_raw_write",
              "warm_load_bs_vs_raw_read", "cold_load_bs_vs_raw_read"}
    assert last["benchmark"] == "lmcache_peer" and last["records"] == RECORDS and last["repeats"] == 1
    assert set(last["ratios"]) == ratios and set(last["targets_met"]) == ratios
    assert all(v > 0 for v in last["ratios"].values())

    doc = json.loads(out.read_text())
    figures = {"raw_write", "bs_store", "fs_store", "raw_read_warm", "raw_read_warm_xxh3", "bs_load_warm",
               "fs_load_warm", "raw_read_cold", "raw_read_cold_bs_files", "raw_read_cold_fs_files", "bs_load_cold",
               "fs_load_cold", "raw_durable_write",
               "bs_store_sync", "bs_sync_load_warm"}
    assert set(doc["figures"]) == figures
    for f in doc["figures"].values():
        assert f["gb_per_s"]["median"] > 0 and len(f["seconds"]["values"]) == 1
    for r in doc["ratios"].values():
        assert r["min"] <= r["median"] <= r["max"] and "target" in r and isinstance(r["met"], bool)
    assert {"bound_store_raw_write_vs_fs", "cold_load_bs_vs_bs_files_cold_read"} <= set(doc["diagnostics"])
    assert doc["config"]["records"] == RECORDS and doc["config"]["record_bytes"] == 1 << 20
    assert doc["config"]["blockstore_adapter"]["compaction"] is None
    assert "bench.lmcache_peer" in doc["command"] and doc["machine"]["cpu_count"] >= 1
    assert doc["code"]["lmcache"] == "0.5.6"

    # the byte check ran on every load pass: 2 warm + 2 cold per adapter, plus the sync store's warm read
    v = doc["verification"]
    assert v["load_passes"] == 9 and v["mismatches"] == 0
    assert v["verified_objects"] == 9 * RECORDS and v["verified_bytes"] == 9 * RECORDS * (1 << 20)
    assert v["store_tasks_ok"] == 5 * (RECORDS // 4)  # 2 blockstore + 2 fs + 1 sync store runs
    assert f"verified {9 * RECORDS} loaded objects" in proc.stdout

    assert list(scratch.iterdir()) == []  # every repeat's data and the run's directory are gone
