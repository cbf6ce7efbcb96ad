"""bench/compaction_profile.py splits each measured request's blocks consistently (a small replay; the
figures come from `python -m bench.compaction_profile`, see docs/compaction.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compaction_profile import main, profile


@pytest.mark.parametrize("name", ["swe", "sessions"])
def test_the_split_adds_up(name: str) -> None:
    out = profile(name, 0, 0.25, "full")
    assert out["requests"] > 0
    # every block of a request holds a record read before, or only records never read before
    assert out["blocks"] == pytest.approx(out["blocks_only_never_read"] + out["blocks_read_before"])
    assert 1.0 <= out["floor"] <= out["blocks"] + 1e-9
    assert out["floor_read_before"] <= out["blocks_read_before"] + 1e-9
    assert out["records_in_no_cluster"] <= out["records_read_before"]
    assert sum(n for n, _mean in out["key_set_seen_before"].values()) == out["requests"]
    # both traces name partitions as paths (repo/task, tenant/session): every request has a parent's pool
    assert sum(n for n, _mean in out["by_parent_pool_blocks"].values()) == out["requests"]
    assert out["compaction"]["relocated_bytes"] >= 0


def test_the_last_line_is_a_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--traces", "swe", "--scale", "0.25", "--json", str(tmp_path / "p.json"), "--dir", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads((tmp_path / "p.json").read_text())
    assert last["traces"]["swe"]["blocks"] == round(doc["traces"]["swe"]["blocks"], 3) >= 1.0
