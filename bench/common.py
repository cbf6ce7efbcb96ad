"""What every benchmark records besides its figures: the machine, the engine measured, CPU use by
others, spreads over repeats, and an atomic write of the results JSON.

    machine_info(scratch)  CPU, memory, kernel, the scratch directory's filesystem, dirty-page ratios
    engine_state()         the commit measured and a digest of uncommitted engine changes
    cpu_busy_s()           CPU seconds of the whole machine and of this process (noise on shared cores)
    spread(values)         median, min, max, quartiles, IQR, stdev and the values themselves
    write_json(path, doc)  never a half-written results file
    run_quiet(cmd)         a command's stdout in the repository, or "" if it fails
    standard_args(ap, name)  the four flags every bench takes: --quick, --full, --dir, --json PATH
    bench_mode(args)       "quick" or "full", from those flags and the bench's documented default
    results_path(args, name)  --json, else bench/results/NAME.json (full) or NAME_quick.json (quick), so a
                           quick run never overwrites the committed full results
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keys_for(n: int) -> list[bytes]:
    return [b"bench-kv-%012d" % i for i in range(n)]  # 21 bytes, sorted in put order


def spread(values: list[float]) -> dict[str, Any]:
    q1, _q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def run_quiet(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_info(scratch: str) -> dict[str, Any]:
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    mem_kib = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "scratch_dir": scratch,
        "fs_type_stat": run_quiet(["stat", "-f", "-c", "%T", scratch]),
        "df": run_quiet(["df", "-PT", scratch]).splitlines()[-1:],
        "vm_dirty_ratio": open("/proc/sys/vm/dirty_ratio").read().strip(),
        "vm_dirty_background_ratio": open("/proc/sys/vm/dirty_background_ratio").read().strip(),
    }


def cpu_busy_s() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process) so far."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    t = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def engine_state() -> dict[str, Any]:
    """Which engine was measured: the commit, plus a digest of uncommitted engine changes if any."""
    diff = run_quiet(["git", "diff", "HEAD", "--", "blockstore", "native"])
    return {
        "commit": run_quiet(["git", "rev-parse", "HEAD"]),
        "engine_uncommitted": run_quiet(["git", "status", "--porcelain", "--", "blockstore", "native"]).splitlines(),
        "engine_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"  # never leave a half-written results file behind
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


RESULTS = os.path.join(REPO, "bench", "results")


def _scratch_root(value: str) -> str:
    """--dir: a folder, or a path one can be made at; a file there (or on the way) is a usage error at once,
    not a FileExistsError traceback once the bench has started."""
    probe = os.path.abspath(value)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"{value!r}: {probe!r} is a file, not a folder (--dir is a scratch folder)")
    return value


def standard_args(ap: argparse.ArgumentParser, name: str, *, default_mode: str = "full", quick: str = "",
                  full: str = "", dir_default: str | None = None, dir_help: str = "") -> None:
    """Add --quick, --full (mutually exclusive), --dir and --json PATH with one help text each; `quick` and
    `full` say what the mode measures, `default_mode` which one runs without either flag."""
    if default_mode not in ("quick", "full"):
        raise ValueError(f"default_mode {default_mode!r}: must be 'quick' or 'full'")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"short run{': ' + quick if quick else ''}" + (" (the default)" if default_mode == "quick"
                                                                         else ""))
    mode.add_argument("--full", action="store_true",
                      help=f"full run{': ' + full if full else ''}" + (" (the default)" if
                                                                                  default_mode == "full" else ""))
    ap.add_argument("--dir", default=dir_default, metavar="PATH", type=_scratch_root,
                    help="scratch root, on the disk under test " + (dir_help or f"(default {dir_default or 'a new temporary folder'})"))
    ap.add_argument("--json", metavar="PATH", help=f"results file (default bench/results/{name}.json; "
                    f"--quick: bench/results/{name}_quick.json)")
    ap.set_defaults(default_mode=default_mode)


def bench_mode(args: argparse.Namespace) -> str:
    if args.quick:
        return "quick"
    return "full" if args.full else str(args.default_mode)


def results_path(args: argparse.Namespace, name: str) -> str:
    if args.json:
        return str(args.json)
    return os.path.join(RESULTS, f"{name}_quick.json" if bench_mode(args) == "quick" else f"{name}.json")
