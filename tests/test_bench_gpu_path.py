"""The GPU path benchmark (bench/gpu_path.py) keeps its output contract on a CPU-only run (the GPU part
skipped and said so), and its content check catches what a broken read path would land. The real
figures come from `python -m bench.gpu_path` on a GPU machine (bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import gpu_path
from bench.gpu_path import (
    ContentMismatch,
    HostBuf,
    Records,
    checksums,
    mismatches,
    pipeline,
    pipeline_threaded,
    verify,
)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def test_quick_cpu_run_keeps_the_json_contract(tmp_path: Path) -> None:
    out = tmp_path / "gpu_path.json"
    scratch = tmp_path / "scratch"
    env = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_path", "--quick", "--records", "12", "--record-mib", "1",
         "--batch-mib", "4", "--repeats", "2", "--no-gpu", "--no-lmcache-probe", "--dir", str(scratch),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any("GPU part skipped" in ln for ln in lines)
    last = json.loads(lines[-1])
    assert last["benchmark"] == "gpu_path" and last["gpu"] is None and "--no-gpu" in last["gpu_skipped"]
    assert last["records"] == 12 and last["repeats"] == 2 and last["verified_records"] > 0
    assert all(v > 0 for v in last["gb_per_s"].values()) and all(v > 0 for v in last["ratios"].values())

    doc = json.loads(out.read_text())
    assert doc["gpu"] is None and doc["gpu_skipped"]
    assert set(doc["figures"]) == {"disk_cold", "disk_cold_par", "store_files_cold", "raw_cold_pipeline",
                                   "store_cold", "store_cold_par", "disk_warm", "disk_warm_par",
                                   "raw_warm_pipeline", "store_warm", "store_warm_par"}
    for name, f in doc["figures"].items():
        g = f["gb_per_s"]
        assert 0 < g["min"] <= g["median"] <= g["max"], name
        assert len(f["seconds"]["values"]) == 2 and f["description"]
    for name in ("store_cold", "store_warm", "raw_cold_pipeline", "store_cold_par", "store_warm_par"):
        split = doc["figures"][name]["split_s"]
        assert set(split) == {"read_s", "wait_s", "copy_gpu_s", "other_s"} and split["read_s"]["median"] > 0
    r = doc["ratios"]["store_cold_vs_ceiling"]
    assert r["vs"] == ["disk_cold or disk_cold_par"] and r["target"] == 0.8 and isinstance(r["met"], bool) and r["median"] > 0
    assert "overlap_gain_cold" not in doc["ratios"]  # no copy to overlap without a GPU
    assert doc["bottleneck"]["cold"]["lower_ceiling"] == "disk" and doc["bottleneck"]["warm"]["text"]
    # 2 repeats x (2 + 2 cold, 2 + 2 warm store passes (1 and 2 readers), 2 + 2 raw pipeline passes) x 12
    assert doc["verification"]["verified_records"] == 2 * 12 * 12 and doc["verification"]["mismatches"] == 0
    assert doc["lmcache"]["ran"] is False and doc["lmcache"]["reason"]
    assert doc["config"]["records"] == 12 and doc["config"]["record_bytes"] == MiB
    assert doc["config"]["batch_records"] == 4 and doc["config"]["sink"].startswith("host")
    assert doc["config"]["parallel_readers"] == 2 and doc["config"]["slots"] == 3
    assert "bench.gpu_path" in doc["command"] and doc["machine"]["cpu_count"] >= 1
    assert doc["machine"]["fs_type_stat"] and doc["engine"]["commit"]
    assert len(doc["runs_seconds"]) == 2 and len(doc["runs_split_seconds"]) == 2
    assert not list(scratch.iterdir())  # the scratch data is gone

    md = gpu_path.summary_markdown(doc)
    assert "| store_cold |" in md and "bench.gpu_path" in md and "GPU: none" in md
    pytest.importorskip("matplotlib")
    pngs = gpu_path.plots(doc, str(tmp_path / "plots"))
    assert [Path(p).name for p in pngs] == ["gpu_path.png"] and Path(pngs[0]).stat().st_size > 1000


def _records(n: int = 6, size: int = 64 * 1024) -> tuple[Records, np.ndarray]:
    recs = Records(n, size, seed=1)
    data = np.empty((n, size // 8), dtype=np.int64)
    recs.fill(0, data)
    return recs, data


def test_checksum_catches_any_single_byte_change() -> None:
    recs, data = _records()
    assert verify(checksums(data, recs.weights), recs.expected, 0, "clean") == len(data)
    assert len(set(recs.expected.tolist())) == len(data)  # every record distinct
    raw = data.view(np.uint8).reshape(len(data), -1)
    rng = np.random.default_rng(7)
    for byte in [0, 7, 8, 4095, raw.shape[1] - 1, *rng.integers(0, raw.shape[1], 20).tolist()]:
        for delta in (1, 128, 255):  # the top bit of a word's top byte too
            row = int(rng.integers(0, len(data)))
            saved = raw[row, byte]
            raw[row, byte] = (int(saved) + delta) % 256
            assert mismatches(checksums(data, recs.weights), recs.expected) == [row], (byte, delta)
            raw[row, byte] = saved
    with pytest.raises(ContentMismatch, match="record 3"):
        verify(checksums(data[[0, 1, 2, 4]], recs.weights), recs.expected, 0, "swapped")


def test_checksums_agree_between_numpy_and_torch() -> None:
    torch = pytest.importorskip("torch")
    recs, data = _records()
    got = checksums(torch.from_numpy(data), torch.from_numpy(recs.weights)).numpy()
    assert (got == recs.expected).all()


@pytest.mark.parametrize("fault", ["next_record", "one_byte", "unfilled"])
def test_a_broken_read_path_fails_the_pass(fault: str) -> None:
    n, size = 9, 64 * 1024
    recs, data = _records(n, size)
    per_batch = 4
    slots = [HostBuf(per_batch * size)]

    def good(first: int, count: int, slot: HostBuf) -> None:
        slot.array[: count * size] = data[first : first + count].view(np.uint8).reshape(-1)

    def broken(first: int, count: int, slot: HostBuf) -> None:
        good(first, count, slot)
        if first == per_batch:  # the second batch only
            if fault == "next_record":
                slot.array[:size] = data[first + 1].view(np.uint8)
            elif fault == "one_byte":
                slot.array[size + 5] ^= 0x10
            else:
                slot.array[: count * size] = 0

    ok = pipeline(good, n, per_batch, size, slots, None, recs.expected, recs.weights)
    assert ok["verified_records"] == n and ok["seconds"] > 0
    with pytest.raises(ContentMismatch):
        pipeline(broken, n, per_batch, size, slots, None, recs.expected, recs.weights)
    # the same with two reader threads
    three = slots + [HostBuf(per_batch * size) for _ in range(2)]
    ok = pipeline_threaded(good, n, per_batch, size, three, None, recs.expected, recs.weights, 2)
    assert ok["verified_records"] == n
    with pytest.raises(ContentMismatch):
        pipeline_threaded(broken, n, per_batch, size, three, None, recs.expected, recs.weights, 2)
