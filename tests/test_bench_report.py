"""The benchmark report (bench/report.py): renders bench/README.md's generated section and the PNG plots from
the bench JSONs, keeps everything outside its markers, and runs a bench end to end (slow test). The real
report is `bash scripts/bench.sh` (bench/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from bench import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "LMCACHE_TRACK_USAGE": "false",
       "PYTHONHASHSEED": "0"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BEFORE = "# bench/\n\nHand-written intro with `code` and a | pipe.\n\n"
AFTER = "\n\n## throughput.py\n\nHand-written section that must survive.\n"


def readme_text(stale: str = "stale generated text") -> str:
    return f"{BEFORE}## Latest results\n\n{report.BEGIN}\n{stale}\n{report.END}{AFTER}"


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100, (path, width, height)
    from matplotlib import image

    assert image.imread(str(path)).shape[:2] == (height, width)  # decodes as a whole


def images(section: str, readme_dir: Path) -> list[Path]:
    return [readme_dir / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)]


def generated(text: str) -> str:
    return text[text.index(report.BEGIN) : text.index(report.END)]


def timeline_doc() -> dict[str, Any]:
    """A foreground-latency entry as compaction.foreground_latency writes it (timeline included)."""
    ts = [i * 0.01 for i in range(300)]
    on = [0.5 <= t <= 1.2 for t in ts]
    lat = [2.5 if f else 0.4 for f in on]
    tl = {"t_s": ts, "latency_ms": lat, "compacting": on, "n": 300, "kept": 300, "phase_s": 3.0,
          "spans_s": [[0.5, 1.2]]}
    idle_tl = {"t_s": ts[:50], "latency_ms": [0.4] * 50, "compacting": [False] * 50, "n": 50, "kept": 50,
               "phase_s": 0.5, "spans_s": []}
    return {"idle": {"p50_ms": 0.4, "p99_ms": 0.6, "n": 50, "timeline": idle_tl},
            "full": {"during": {"p50_ms": 2.5, "p99_ms": 2.5, "n": 71}, "after": {"p50_ms": 0.4, "p99_ms": 0.4, "n": 229},
                     "compaction_busy_s": 0.7, "went_idle": True, "moved_bytes": 4_000_000, "passes": 3,
                     "timeline": tl}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """The committed bench JSONs of throughput, compaction and lmcache_peer, copied (with a compaction
    timeline added where the committed one predates it)."""
    out = tmp_path / "results"
    out.mkdir()
    copied = 0
    for name in ("throughput", "compaction", "lmcache_peer"):
        for fn in (f"{name}_quick.json", f"{name}.json"):
            if (RESULTS / fn).exists():
                shutil.copy(RESULTS / fn, out / fn)
                copied += 1
                break
    assert copied >= 3, "the committed bench/results JSONs are missing: the report has nothing to render"
    for path in out.glob("compaction*.json"):
        doc = json.loads(path.read_text())
        doc["foreground_latency"] = {"locomo": timeline_doc()}
        path.write_text(json.dumps(doc))
    return out


def test_no_run_renders_tables_plots_and_keeps_text_outside_the_markers(tmp_path: Path, results: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(readme_text())
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--no-run", "--results-dir", str(results),
                           "--readme", str(readme)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = readme.read_text()
    assert text.startswith(BEFORE + "## Latest results\n\n" + report.BEGIN + "\n")
    assert text.endswith(report.END + AFTER)
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    section = generated(text)
    assert "stale generated text" not in section
    assert "`python -m bench.report --quick --no-run --results-dir" in section  # how it was generated

    docs = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json") if p.stem != "report"}
    for stem, doc in docs.items():
        bench = doc["benchmark"]
        assert f"### {bench}" in section
        assert report.machine_line(doc) in section, stem  # the machine it ran on
        assert f"Reproduce: `{report.reproduce_command(doc)}`" in section
        assert f"[{stem}.json](results/{stem}.json)" in section
        if bench == "throughput":
            for k, r in doc["ratios"].items():
                assert f"**{r['median']:.3f}** ({r['min']:.3f} – {r['max']:.3f})" in section, k
            g = doc["figures"]["store_put_cache"]["gb_per_s"]
            assert f"{g['median']:.2f} ({g['min']:.2f} – {g['max']:.2f})" in section
        elif bench == "lmcache_peer":
            for k, r in doc["ratios"].items():
                assert f"| `{k}`" in section and f"**{r['median']:.3f}**" in section, k
        elif bench == "compaction":
            for tr, cells in doc["results"].items():
                c = cells["full"]
                # blocks/request (p95), the offline floor, space and write amplification
                assert re.search(re.escape(f"{c['blocks_per_request']:.2f} ({c['blocks_per_request_p95']:.0f}) | ")
                                 + r"[\d.]+ \| " + re.escape(f"{c['space_amp']:.3f} | {c['write_amp']:.3f}"),
                                 section), tr
            assert "| locomo | full | 0.40 / 0.60 | 2.50 / 2.50 (n=71) |" in section  # foreground table

    pngs = images(section, tmp_path)
    names = {p.name for p in pngs}
    tq = "_quick" if (results / "throughput_quick.json").exists() else ""
    cq = "_quick" if (results / "compaction_quick.json").exists() else ""
    assert f"throughput{tq}_vs_ceiling.png" in names
    assert f"compaction{cq}_blocks_per_request.png" in names and f"compaction{cq}_latency_timeline.png" in names
    assert any(n.startswith("lmcache_peer") for n in names)
    for p in pngs:
        assert p.parent == results
        assert_valid_png(p)

    index = json.loads((results / "report.json").read_text())
    assert index["mode"] == "quick" and index["no_run"] is True and len(index["commit"]) == 40
    for b in report.NAMES:
        assert b in index["benches"]
    shown = {n: e for n, e in index["benches"].items() if e.get("json")}
    assert {"throughput", "compaction", "lmcache_peer"} <= set(shown)
    for e in shown.values():
        assert e["mode"] in ("quick", "full") and e["plots"]

    # a second run replaces the section, and only the section
    readme.write_text(text.replace("Hand-written section", "Edited section"))
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--no-run", "--only", "throughput",
                           "--results-dir", str(results), "--readme", str(readme)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = readme.read_text()
    assert again.endswith(report.END + AFTER.replace("Hand-written section", "Edited section"))
    assert again.count(report.BEGIN) == 1


def test_splice_adds_markers_under_a_heading_before_the_first_section() -> None:
    text = "# bench/\n\nIntro.\n\n| a | b |\n|---|---|\n\n## throughput.py\n\nBody.\n"
    out = report.splice(text, "GENERATED")
    assert out == ("# bench/\n\nIntro.\n\n| a | b |\n|---|---|\n\n## Latest results\n\n"
                   f"{report.BEGIN}\nGENERATED\n{report.END}\n\n## throughput.py\n\nBody.\n")
    assert report.splice(out, "NEW") == out.replace("GENERATED", "NEW")
    assert report.splice("# t\n", "X") == f"# t\n\n## Latest results\n\n{report.BEGIN}\nX\n{report.END}\n\n"


def test_reproduce_command_and_machine_line() -> None:
    doc = {"command": f"/tmp/v/bin/python -m bench.compaction --quick --json {ROOT}/bench/results/x.json "
                      f"--dir={ROOT}/bench/.scratch --policies 'full:relocation_budget=inf'",
           "wall_s": 61.5,
           "machine": {"date": "2026-11-23T13:41:31+00:00", "cpu_count": 2, "cpu_affinity": 2, "cpu_model": "AMD EPYC",
                       "mem_gib": 23.5, "kernel": "6.18.44", "df": ["/dev/vda ext4 1 2 3 26% /"],
                       "fs_type_stat": "ext2/ext3", "gpu": {"name": "NVIDIA H100", "count": 1}}}
    assert report.reproduce_command(doc) == ("python -m bench.compaction --quick --json bench/results/x.json "
                                             "--dir=bench/.scratch --policies full:relocation_budget=inf")
    legacy = {"command": "python -m bench.eviction --quick --scratch /tmp/s --out=x.json"}  # before one interface
    assert report.reproduce_command(legacy) == "python -m bench.eviction --quick --dir /tmp/s --json=x.json"
    line = report.machine_line(doc)
    assert line == ("Machine: 2 CPUs (AMD EPYC), 23.5 GiB RAM, GPU 1 x NVIDIA H100, kernel 6.18.44, "
                    "scratch on ext4 (/dev/vda); run 2026-11-23 13:41 UTC, 62 s.")
    assert report.machine_line({}) == "Machine: not recorded; run date unknown."
    assert report.doc_mode({"config": {"mode": "full"}}) == "full"
    assert report.doc_mode({"config": {"quick": True}}) == "quick"
    assert report.doc_mode({"command": "python -m bench.throughput --quick"}) == "quick"
    assert report.fmt(None) == "–" and report.fmt(float("nan")) == "–" and report.fmt(1.2345, 3) == "1.234"


def test_missing_module_or_functions_are_skipped_with_a_message(tmp_path: Path) -> None:
    body, files, error = report.render_bench(report.Bench("no_such_bench", (1, 1)), {}, "",
                                             str(tmp_path), str(tmp_path))
    assert "`bench/no_such_bench.py` is not in this checkout" in body and files == [] and error is None
    body, files, error = report.render_bench(report.Bench("traces", (1, 1)), {}, "",
                                             str(tmp_path), str(tmp_path))  # a module with neither function
    assert "has no `plots`/`summary_markdown`" in body and files == [] and error is None


def test_gpu_path_is_not_run_without_cuda_and_missing_benches_are_not_run(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(report, "cuda_available", lambda: False)
    monkeypatch.setattr(report, "module_file", lambda name: None if name == "scaling" else f"/x/{name}.py")
    ran: list[list[str]] = []
    monkeypatch.setattr(report.subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    args = argparse.Namespace(only=["gpu_path", "scaling"], skip=[], mode="quick", results_dir=str(tmp_path),
                              dir=str(tmp_path), bench_args={})
    state = report.run_suite(args, {})
    assert ran == []
    assert state["gpu_path"]["status"] == "not run: no CUDA on this machine"
    assert state["scaling"]["status"] == "not run: bench/scaling.py is not in this checkout"
    assert state["throughput"]["status"] == "not selected (--only)"


def test_a_failing_bench_fails_the_report_but_the_readme_is_written(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(readme_text())
    res = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--quick", "--only", "throughput",
                           "--bench-args", "throughput=--repeats -1", "--dir", str(tmp_path / "scratch"),
                           "--results-dir", str(res), "--readme", str(readme)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "throughput: FAILED (exit status 2)" in proc.stderr
    index = json.loads((res / "report.json").read_text())
    assert index["benches"]["throughput"]["status"] == "failed (exit status 2)"
    section = generated(readme.read_text())
    assert "| throughput | – | failed (exit status 2) |" in section and "No results yet" in section


@pytest.mark.slow
def test_quick_report_runs_a_bench_end_to_end(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(BEFORE + AFTER.lstrip("\n"))  # no markers yet: the report adds them
    res = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--quick", "--only", "throughput",
                           "--bench-args", "throughput=--records 16 --repeats 1", "--dir", str(tmp_path / "scratch"),
                           "--results-dir", str(res), "--readme", str(readme)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1/1: throughput (quick)" in proc.stderr
    doc = json.loads((res / "throughput_quick.json").read_text())
    assert doc["config"]["records"] == 16 and doc["config"]["mode"] == "quick"
    assert "--quick --json " in doc["command"] and "--records 16" in doc["command"]
    assert_valid_png(res / "throughput_quick_vs_ceiling.png")
    text = readme.read_text()
    assert text.startswith(BEFORE + "## Latest results\n\n" + report.BEGIN)
    assert text.endswith(report.END + "\n\n" + AFTER.lstrip("\n"))
    section = generated(text)
    assert "![throughput quick vs ceiling](results/throughput_quick_vs_ceiling.png)" in section
    r = doc["ratios"]["put_cache_vs_write"]
    assert f"**{r['median']:.3f}**" in section
    index = json.loads((res / "report.json").read_text())
    t = index["benches"]["throughput"]
    assert t["status"] == "ran" and t["rc"] == 0 and t["run_wall_s"] > 0 and t["mode"] == "quick"
    assert t["plots"] and t["json"].endswith("throughput_quick.json")
    assert os.listdir(tmp_path / "scratch") == []
