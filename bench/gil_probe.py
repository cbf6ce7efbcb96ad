"""How late a GIL-hungry reader gets beside a thread of pure-Python work, and what foreground first buys
(issue 16, blockstore/foreground.py). No store: the mechanism alone, so a noisy machine's disk and load
fall on every variant alike.

The reader makes "reads": each is marked in flight (as Store reads are) and makes 8 GIL-releasing calls
(time.sleep(0)); how long each call takes is what it waited for the GIL (plus the call itself: see
"alone"). Beside it, a worker thread runs 10-20 µs chunks of Python with a checkpoint (`step_aside`) between,
under the 125 µs switch interval a paced pass sets:

    alone      no worker: the reader's floor
    unmarked   the worker not marked background: it takes the reader's turn (compaction before 904bc36)
    marked     the worker marked background: it pauses while a read is in flight (within the bound)

Rounds of 1 s each, the three variants in turn. Reported: the reader's per-call wait (p50, p99, p99.9 µs)
and the worker's chunks per second (what stepping aside costs background work: the reader is in flight
but for 0.3 ms gaps between its reads).

    python -m bench.gil_probe --quick      # 3 rounds
    python -m bench.gil_probe              # 10 rounds
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
from typing import Any

from blockstore import foreground

from .common import engine_state, machine_info, results_path, standard_args, write_json

CALLS_PER_READ = 8
GAP_S = 0.0003  # between two reads (the reader sleeps: a request's own work elsewhere)
VARIANTS = ("alone", "unmarked", "marked")


def _chunk() -> int:
    s = 0
    for i in range(300):  # 10-20 µs of bytecode on this project's machines
        s += i * i
    return s


def worker(stop: threading.Event, marked: bool, done: list[int]) -> None:
    if marked:
        foreground.background(stop)
    n = 0
    while not stop.is_set():
        _chunk()
        n += 1
        foreground.step_aside()
    foreground.foreground()
    done.append(n)


def reader(seconds: float) -> list[float]:
    late: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        foreground.READS.append(None)
        try:
            for _ in range(CALLS_PER_READ):
                t0 = time.perf_counter()
                time.sleep(0)
                late.append(time.perf_counter() - t0)
        finally:
            foreground.READS.pop()
        time.sleep(GAP_S)
    return late


def pct_us(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q / 100 * len(v)))] * 1e6, 1) if v else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gil_probe", description=__doc__.split("\n\n")[0] if __doc__ else None)
    standard_args(ap, "gil_probe", quick="3 rounds of 1 s per variant", full="10 rounds of 1 s per variant",
                  dir_help="(unused: no store)")
    ap.add_argument("--rounds", type=int, help="rounds (default 10, --quick 3)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 10)
    out = results_path(args, "gil_probe")
    command = "python -m bench.gil_probe " + shlex.join(sys.argv[1:] if argv is None else argv)
    waits: dict[str, list[float]] = {v: [] for v in VARIANTS}
    work: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
    saved = sys.getswitchinterval()
    stats0 = (foreground.STATS.waits, foreground.STATS.waited_s, foreground.STATS.grants)
    sys.setswitchinterval(0.000125)  # what a paced pass sets (compaction/pacing.py FAST_SWITCH_S)
    try:
        for _ in range(rounds):
            for v in VARIANTS:
                stop = threading.Event()
                done: list[int] = []
                t = None if v == "alone" else threading.Thread(target=worker, args=(stop, v == "marked", done))
                if t is not None:
                    t.start()
                began = time.perf_counter()
                waits[v] += reader(1.0)
                elapsed = time.perf_counter() - began
                stop.set()
                if t is not None:
                    t.join()
                    work[v].append(done[0] / elapsed)
    finally:
        sys.setswitchinterval(saved)
    per = {v: {"p50": pct_us(w, 50), "p99": pct_us(w, 99), "p99.9": pct_us(w, 99.9), "calls": len(w)}
           for v, w in waits.items()}
    doc: dict[str, Any] = {
        "command": command, "rounds": rounds, "reader_wait_us": per,
        "worker_chunks_per_s": {v: round(sum(x) / len(x)) for v, x in work.items()},
        "stepped_aside": {"waits": foreground.STATS.waits - stats0[0], "s": round(foreground.STATS.waited_s - stats0[1], 3),
                          "grants": foreground.STATS.grants - stats0[2]},
        "bound": {"max_wait_s": foreground.MAX_WAIT_S, "grant_s": foreground.GRANT_S, "poll_s": foreground.POLL_S},
        "machine": machine_info(tempfile.gettempdir()), "engine": engine_state()}
    print(f"# {command}")
    print(f"{'variant':<10} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'worker chunks/s':>16}")
    for v in VARIANTS:
        print(f"{v:<10} {per[v]['p50']:>8} {per[v]['p99']:>8} {per[v]['p99.9']:>9} "
              f"{doc['worker_chunks_per_s'].get(v, ''):>16}")
    write_json(out, doc)
    print(json.dumps({"bench": "gil_probe", "rounds": rounds,
                      **{f"{v}_p99_us": per[v]["p99"] for v in VARIANTS},
                      **{f"{v}_chunks_per_s": n for v, n in doc["worker_chunks_per_s"].items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
