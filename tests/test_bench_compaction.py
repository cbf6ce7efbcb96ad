"""The compaction benchmark runs end to end and keeps its output contract (a small replay: the real
figures come from `python -m bench.compaction --quick`, see bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_replay_prints_the_json_contract_as_its_last_line(tmp_path: Path) -> None:
    out = tmp_path / "compaction.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compaction", "--quick", "--scale", "0.25", "--policies", "append-only", "full",
         "--cold-samples", "3", "--dir", str(tmp_path / "scratch"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) == {"traces"}
    assert set(last["traces"]) == {"locomo", "webarena", "swe", "lmcache", "shared", "sessions"}
    for trace, cells in last["traces"].items():
        assert set(cells) == {"append-only", "full"}, trace
        for policy, cell in cells.items():
            assert set(cell) == {"blocks_per_request", "space_amp", "write_amp", "p95_cold_ms"}, (trace, policy)
            assert cell["blocks_per_request"] >= 1.0
            assert cell["space_amp"] > 1.0 and cell["write_amp"] >= 1.0
        # append-only never copies: its write amplification is the record layout alone
        assert cells["append-only"]["write_amp"] <= cells["full"]["write_amp"] + 1e-9
    doc = json.loads(out.read_text())
    assert doc["config"]["mode"] == "quick" and doc["results"]["locomo"]["full"]["requests_measured"] > 0
    # every figure has its floor (the offline lower bound), and no placement beats it
    for trace, cells in doc["results"].items():
        for policy, cell in cells.items():
            assert 1.0 <= cell["blocks_floor"] <= cell["blocks_per_request"] + 1e-9, (trace, policy)
        assert doc["targets"][trace]["blocks_floor_ratio"] <= doc["targets"][trace]["blocks_ratio"] + 1e-9
