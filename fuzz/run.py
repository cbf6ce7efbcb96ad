"""Run the fuzz targets, one after another, and report executions, time and crashes per target.

    .venv/bin/python -m fuzz --target all --runs 1000000            # each target 1 M executions
    .venv/bin/python -m fuzz --target block_scan --seconds 60
    .venv/bin/python -m fuzz --target all --seconds 30 --sanitize   # C core with ASan + UBSan
    .venv/bin/python -m fuzz --target record_header --reproduce fuzz/out/record_header/artifacts/crash-...

Each target runs as its own process (`python -m fuzz.targets.<name>`, libFuzzer through atheris) with
its seeds (fuzz/corpus/<name>/, read only) and a working corpus that grows across runs
(fuzz/out/<name>/corpus/). Findings go to fuzz/out/<name>/artifacts/ (crash-*, timeout-*, oom-*),
the full log to fuzz/out/<name>/log.txt, and the summary of the run to fuzz/out/summary.json.
libFuzzer stops a target at its first finding, so "crashes" is 0 or 1 per target per run.

--sanitize builds the C core with ASan + UBSan into fuzz/build/sanitized (fuzz/build_sanitized.py),
loads it instead of the installed one, preloads gcc's ASan runtime, and runs the blind loop of
fuzz/blind.py over the working corpus (libFuzzer gets no coverage in that process: see blind.py).

Exit status: 0 when no target found anything, 1 when one did (or failed to run), 2 for bad usage.
Targets that need LMCache are skipped (not failed) where lmcache is not installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
SEEDS = os.path.join(FUZZ, "corpus")
DICTS = os.path.join(FUZZ, "dicts")
OUT = os.path.join(FUZZ, "out")


@dataclass(frozen=True)
class Target:
    name: str
    max_len: int = 4096
    needs: tuple[str, ...] = ()  # importable modules the target needs (skipped without them)
    rss_limit_mb: int = 2048


TARGETS = {t.name: t for t in (
    Target("record_header", max_len=8192),
    Target("block_footer", max_len=256),
    Target("block_header", max_len=256),
    Target("block_scan", max_len=32768, rss_limit_mb=4096),
    Target("directory_values", max_len=2048),
    Target("affinity_group", max_len=4096),
    Target("chunk_meta", max_len=8192),
    Target("manifest", max_len=8192),
    Target("object_key", max_len=4200, needs=("lmcache",)),
    Target("l2_cursor", max_len=8192, needs=("lmcache",)),
    Target("l2_config", max_len=8192, needs=("lmcache",)),
    Target("plugin_config", max_len=8192, needs=("lmcache",)),
)}

ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


def missing_needs(t: Target) -> list[str]:
    return [m for m in t.needs if importlib.util.find_spec(m) is None]


def _asan_runtime() -> str:
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    path = os.path.realpath(out.stdout.strip())
    if not os.path.isfile(path):
        raise SystemExit(f"fuzz: gcc's ASan runtime not found ({out.stdout.strip()!r}); install gcc's libasan")
    return path


def sanitizer_env() -> dict[str, str]:
    """Environment of a sanitized run: the ASan build of the C core, gcc's runtime preloaded."""
    from fuzz import build_sanitized

    so = build_sanitized.built_path()
    if so is None or build_sanitized.is_stale():
        print("fuzz: building the C core with ASan + UBSan (fuzz/build/sanitized)", file=sys.stderr, flush=True)
        so = build_sanitized.build()
    return {
        "LD_PRELOAD": _asan_runtime(),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:allocator_may_return_null=1:handle_abort=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        # every Python object from malloc, so ASan knows the exact end of each bytes buffer handed to C
        # (pymalloc's arenas would hide an overrun of a small one)
        "PYTHONMALLOC": "malloc",
        "BLOCKSTORE_FUZZ_NATIVE": so,
        "BLOCKSTORE_FUZZ_BLIND": "1",
    }


def _env(sanitize: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONHASHSEED", "0")
    if sanitize:
        env.update(sanitizer_env())
    return env


def _stat(log: str, name: str) -> int | None:
    m = re.findall(rf"stat::{name}:\s*(\d+)", log)
    return int(m[-1]) if m else None


def _executions(log: str) -> int:
    n = _stat(log, "number_of_executed_units")
    if n is not None:
        return n
    m = re.findall(r"^#(\d+)\s", log, re.M) or re.findall(r"Done (\d+) runs", log)
    return int(m[-1]) if m else 0


def run_target(t: Target, *, runs: int | None, seconds: float | None, sanitize: bool, seed: int | None,
               extra: list[str]) -> dict[str, object]:
    out = os.path.join(OUT, t.name + ("-sanitized" if sanitize else ""))
    corpus = os.path.join(OUT, t.name, "corpus")  # the sanitized run reads the guided runs' corpus
    artifacts = os.path.join(out, "artifacts")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(artifacts, exist_ok=True)
    result: dict[str, object] = {"target": t.name, "sanitize": sanitize}
    lacking = missing_needs(t)
    if lacking:
        result.update(status="skipped", reason=f"needs {', '.join(lacking)}")
        return result
    before = set(os.listdir(artifacts))
    cmd = [sys.executable, "-m", f"fuzz.targets.{t.name}", f"-artifact_prefix={artifacts}/", f"-max_len={t.max_len}",
           "-timeout=30", f"-rss_limit_mb={t.rss_limit_mb * (2 if sanitize else 1)}", "-print_final_stats=1"]
    if runs is not None:
        cmd.append(f"-runs={runs}")
    if seconds is not None:
        cmd.append(f"-max_total_time={max(1, int(seconds))}")
    if seed is not None:
        cmd.append(f"-seed={seed}")
    dict_path = os.path.join(DICTS, f"{t.name}.dict")
    if os.path.exists(dict_path) and not sanitize:
        cmd.append(f"-dict={dict_path}")
    cmd += extra
    cmd.append(corpus)
    if os.path.isdir(os.path.join(SEEDS, t.name)):
        cmd.append(os.path.join(SEEDS, t.name))
    log_path = os.path.join(out, "log.txt")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(sanitize), stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    current = os.path.join(artifacts, "current-input")
    if os.path.exists(current):  # the blind loop died inside an input (a sanitizer report): keep it
        with open(current, "rb") as f:
            data = f.read()
        os.replace(current, os.path.join(artifacts, f"crash-{hashlib.sha1(data).hexdigest()}"))
    new = sorted(a for a in set(os.listdir(artifacts)) - before if a.startswith(ARTIFACT_PREFIXES))
    execs = _executions(text)
    result.update(
        status="ok" if proc.returncode == 0 and not new else ("crash" if new else "error"),
        returncode=proc.returncode, executions=execs, seconds=round(wall, 1),
        exec_per_sec=_stat(text, "average_exec_per_sec") or (round(execs / wall) if wall else 0),
        peak_rss_mb=_stat(text, "peak_rss_mb"), crashes=len(new) if new else int(proc.returncode != 0),
        artifacts=[os.path.relpath(os.path.join(artifacts, a), ROOT) for a in new],
        log=os.path.relpath(log_path, ROOT),
    )
    return result


def reproduce(t: Target, files: list[str], sanitize: bool) -> int:
    """Run the target once on each file, printing what it raises (the libFuzzer/blind loop convention)."""
    cmd = [sys.executable, "-m", f"fuzz.targets.{t.name}", *[os.path.abspath(f) for f in files]]
    env = _env(sanitize)
    if not sanitize:
        env.pop("BLOCKSTORE_FUZZ_BLIND", None)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def _table(results: list[dict[str, object]]) -> str:
    lines = [f"{'target':<18} {'mode':<9} {'status':<8} {'executions':>11} {'seconds':>8} {'exec/s':>7} "
             f"{'crashes':>7}  artifacts"]
    for r in results:
        mode = "asan" if r["sanitize"] else "guided"
        if r["status"] == "skipped":
            lines.append(f"{r['target']:<18} {mode:<9} skipped  ({r['reason']})")
            continue
        lines.append(f"{r['target']:<18} {mode:<9} {r['status']:<8} {r['executions']:>11} {r['seconds']:>8} "
                     f"{r['exec_per_sec']:>7} {r['crashes']:>7}  {' '.join(r['artifacts']) or '-'}")  # type: ignore[arg-type]
    return "\n".join(lines)


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """--runs/--seconds: a finite number > 0. libFuzzer reads -runs=-1 as "forever" and took -max_total_time=-1
    silently, and nan or inf raised a traceback once the run had started."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="all", help=f"all, or comma-separated names: {', '.join(TARGETS)}")
    p.add_argument("--runs", type=_positive(int), help="executions per target (libFuzzer -runs)")
    p.add_argument("--seconds", type=_positive(float), help="time per target (libFuzzer -max_total_time)")
    p.add_argument("--sanitize", action="store_true", help="the C core built with ASan + UBSan (blind loop)")
    p.add_argument("--seed", type=int, help="random seed (libFuzzer -seed)")
    p.add_argument("--summary", default=os.path.join(OUT, "summary.json"), help="where to write the JSON summary")
    p.add_argument("--reproduce", nargs="+", metavar="FILE", help="run one target once on these inputs")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--fresh", action="store_true", help="start from the seeds: empty the working corpora first")
    p.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --, e.g. -- -only_ascii=1")
    args = p.parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(t.name + (f"  (needs {', '.join(t.needs)})" if t.needs else ""))
        return 0
    names = list(TARGETS) if args.target == "all" else [n.strip() for n in args.target.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    if args.reproduce:
        if len(names) != 1:
            p.error("--reproduce needs exactly one --target")
        not_files = [f for f in args.reproduce if not os.path.isfile(f)]
        if not_files:  # libFuzzer takes a folder as a corpus to fuzz from: a "reproduce" that never ended
            p.error(f"--reproduce takes input files; not files: {not_files}")
        return reproduce(TARGETS[names[0]], args.reproduce, args.sanitize)
    if args.runs is None and args.seconds is None:
        p.error("give --runs N or --seconds N (or both: whichever comes first)")
    results = []
    for name in names:
        if args.fresh:
            shutil.rmtree(os.path.join(OUT, name, "corpus"), ignore_errors=True)
        r = run_target(TARGETS[name], runs=args.runs, seconds=args.seconds, sanitize=args.sanitize, seed=args.seed,
                       extra=args.libfuzzer)
        results.append(r)
        print(_table([r]).splitlines()[1], flush=True)
    print(_table(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
    with open(args.summary, "w") as f:
        json.dump({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, f, indent=2)
    failed = [r for r in results if r["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
