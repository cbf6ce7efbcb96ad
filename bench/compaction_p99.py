"""Foreground get p99 during background compaction ÷ idle, with its noise floor and a profile (issue 16).

`bench.compaction` judges the ≤ 1.5 target on one busy phase per trace and seed; on a shared 2-core machine
one such ratio moves 2x from seed to seed. This bench measures the same quantity the same way (a trace
replayed with no pass leaves a learned backlog; warm copies of it are opened without compaction, "idle",
and with `compaction={"policy": "full", "interval_s": 0.01}`, "busy"; a busy request counts as "during"
when it overlaps the compactor's hook activity, gaps under 50 ms merged) and adds, per trace and repeat:

    noise      the same ratio between the two idle phases (p99 idle after ÷ idle before): what the ratio
               reads when nothing differs but time
    work       what the background thread did meanwhile: MB moved, seconds busy, MB/s, whether it
               finished its backlog ("went idle"), and blocks/request of the measured requests before
               compaction, after the paced background run, and after an unpaced `run_until_idle` of
               the same backlog (after the same reads as the busy phase made) (pacing that starved compaction would leave the second above the third)

With `--hog`, the idle requests are also timed beside a thread of GIL-free C work (hashing), at normal
priority and under SCHED_IDLE: what any background thread's CPU use costs the foreground on this machine.
With `--profile`, the busy phase also records where the foreground's slow requests went: a probe thread
(0.2 ms sleeps; its lateness is the time a thread waits for the GIL) and timed spans of every engine call
the compactor makes (`Store.relocate_many`, `read_locations`, `place_copies`, `block_table`,
`sync_moves`, the planning steps and the pacer's waits). For the requests slower than 1.5 x idle p99, the
share of their time that overlapped each kind of span, beside the same share over all "during" requests.

    python -m bench.compaction_p99 --quick                       # 8 traces, 3 repeats, full policy
    python -m bench.compaction_p99 --full                        # traces 4x bigger, 400 requests
    python -m bench.compaction_p99 --quick --traces webarena shared --repeats 1 --profile
    python -m bench.compaction_p99 --quick --hog                 # plus the CPU-hog floor

The last line of stdout is one JSON object: {"traces": {TRACE: {"ratio", "noise", "gc_mb_s"}}} (medians).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import blockstore
from blockstore import foreground, hooks
from blockstore.compaction import clusters, gc, pacing, relocation
from blockstore.reader import choose_places

from .common import bench_mode, engine_state, machine_info, results_path, standard_args
from .compaction import (
    DEFAULT_DIR,
    TRACE_BLOCK_SIZE,
    Payloads,
    evenly,
    finite,
    pct,
    read_until_quiet,
    replay,
    write_json_compact,
)
from .traces import FAMILIES, GENERATORS, Request, Trace, check, generate

MiB = 1 << 20
GAP_S = 0.05  # hook events closer than this are one span of compaction work
SLOW_X = 1.5  # a "slow" request, for the profile: above this x the idle p99
PROBE_SLEEP_S = 0.0002
HOOKS = ("compact.scan", "compact.copy", "compact.repoint", "compact.reclaim")
MODES: dict[str, dict[str, Any]] = {
    "quick": {"scale": 1.0, "requests": 100, "repeats": 3, "traces": [*FAMILIES, "heldout", "agents"]},
    "full": {"scale": 4.0, "requests": 400, "repeats": 2, "traces": [*FAMILIES, "agents"]},
}


def warm(path: str) -> None:
    """Read every block file once: timings compare CPU, GIL and lock contention, not the disk."""
    blocks = os.path.join(path, "blocks")
    for name in sorted(os.listdir(blocks)):
        with open(os.path.join(blocks, name), "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


def warm_copy(base: str, suffix: str) -> str:
    path = f"{base}-{suffix}"
    shutil.copytree(base, path)
    warm(path)
    return path


def blocks_per_request(store: blockstore.Store, reqs: Sequence[Request]) -> float:
    """Mean distinct blocks a read of each request touches (a record with copies: where the read goes)."""
    counts = []
    for op in reqs:
        live = [loc for loc in choose_places(store.locate_many(op.keys, ns=op.ns)) if loc is not None]
        counts.append(len({loc.block_id for loc in live}))
    return statistics.fmean(counts) if counts else float("nan")


def merged_spans(ts: list[float], gap: float) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    for t in sorted(ts):
        if spans and t - spans[-1][1] <= gap:
            spans[-1] = (spans[-1][0], t)
        else:
            spans.append((t, t))
    return spans


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


# ------------------------------------------------------------------------------------------ profile


class Profile:
    """The busy phase's instruments: a GIL probe thread and timed spans of the compactor's engine calls."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []  # (what, start, end), on the compactor's thread
        self.probe: list[tuple[float, float]] = []  # (end, lateness s) of each probe sleep
        self._undo: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def timed(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append((what, t0, time.perf_counter()))
        return wrapper

    def patch(self, owner: Any, name: str, what: str) -> None:
        """Time `owner.name` (an instance's method or a module's function) until `undo`."""
        old = getattr(owner, name)
        is_own = name in getattr(owner, "__dict__", {})
        setattr(owner, name, self.timed(what, old))
        self._undo.append(lambda: setattr(owner, name, old) if is_own else delattr(owner, name))

    def install(self, store: blockstore.Store, compactor: Any) -> None:
        for name in ("relocate_many", "read_locations", "place_copies", "block_table", "sync_moves",
                     "reclaim_empty_blocks"):
            self.patch(store, name, f"store.{name}")
        self.patch(compactor.tracker, "ranked", "plan.tracker_ranked")
        self.patch(clusters, "build", "plan.clusters_build")
        self.patch(clusters, "borrow", "plan.clusters_borrow")
        self.patch(relocation, "layout", "plan.relocation_layout")
        self.patch(gc, "victims", "plan.gc_victims")
        self.patch(gc, "records_here", "gc.records_here")
        self.patch(gc, "tombstones", "gc.tombstones")
        self.patch(pacing.Pacer, "wait", "pacer.wait")
        self.patch(gc, "yield_gil", "pacer.yield_gil")
        self.start_probe()

    def start_probe(self) -> None:
        self._thread = threading.Thread(target=self._run_probe, name="gil-probe", daemon=True)
        self._thread.start()

    def undo(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()

    def _run_probe(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(PROBE_SLEEP_S)
            t1 = time.perf_counter()
            self.probe.append((t1, t1 - t0 - PROBE_SLEEP_S))

    def attribute(self, timed: list[tuple[float, float]], during: list[bool], idle_p99_ms: float) -> dict[str, Any]:
        """Share of the slow (and of all) during-requests' time that overlapped each kind of span, and the
        GIL probe's lateness within them."""
        slow_at = SLOW_X * idle_p99_ms / 1e3
        groups = {"slow": [(a, b) for (a, b), on in zip(timed, during) if on and b - a > slow_at],
                  "all_during": [(a, b) for (a, b), on in zip(timed, during) if on]}
        out: dict[str, Any] = {"slow_threshold_ms": round(slow_at * 1e3, 3)}
        for label, reqs in groups.items():
            total = sum(b - a for a, b in reqs) or 1e-12
            share: dict[str, float] = defaultdict(float)
            for what, s0, s1 in self.spans:
                for a, b in reqs:
                    share[what] += overlap(a, b, s0, s1)
            late = [lt for t, lt in self.probe if any(a <= t <= b for a, b in reqs)]
            out[label] = {"n": len(reqs), "ms_total": round(total * 1e3, 2),
                          "share": {k: round(v / total, 3) for k, v in sorted(share.items(), key=lambda kv: -kv[1])},
                          "probe_late_ms": {"p50": round(pct(late, 50) * 1e3, 3), "p99": round(pct(late, 99) * 1e3, 3),
                                            "max": round(max(late, default=0.0) * 1e3, 3), "n": len(late)}}
        out["slowest"] = [{"ms": round((b - a) * 1e3, 3), "at_s": round(a - timed[0][0], 4),
                           "overlaps": {what: round(overlap(a, b, s0, s1) * 1e3, 3) for what, s0, s1 in self.spans
                                        if overlap(a, b, s0, s1) > 0}}
                          for a, b in sorted(groups["slow"], key=lambda ab: ab[0] - ab[1])[:12]]
        calls: dict[str, list[float]] = defaultdict(list)
        for what, s0, s1 in self.spans:
            calls[what].append((s1 - s0) * 1e3)
        # the probe's wake-ups that fell inside each kind of call: a call that holds the GIL makes them late
        late_in: dict[str, list[float]] = defaultdict(list)
        ends = sorted(self.probe)
        for what, s0, s1 in self.spans:
            k = bisect.bisect_left(ends, (s0, -1.0))
            while k < len(ends) and ends[k][0] <= s1:
                late_in[what].append(ends[k][1] * 1e3)
                k += 1
        out["calls_ms"] = {k: {"n": len(v), "total": round(sum(v), 1), "p99": round(pct(v, 99), 3),
                               "max": round(max(v), 3), "probe_late_max_ms": round(max(late_in[k], default=0.0), 3),
                               "probe_wakeups": len(late_in[k])} for k, v in sorted(calls.items())}
        return out


# ----------------------------------------------------------------------------------------------- phases


def cpu_hog(stop: threading.Event, sched_idle: bool) -> None:
    """C work with the GIL released (hashlib hashes large buffers without it), until `stop`: what any
    background thread's CPU use does to the foreground, GIL aside."""
    if sched_idle:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    buf = bytes(8 * MiB)
    while not stop.is_set():
        hashlib.sha256(buf).digest()


def idle_phase(base: str, block_size: int, reqs: Sequence[Request], probe: bool,
               hog: str | None = None) -> dict[str, Any]:
    """The requests timed one by one on a warm copy opened without compaction (ms); with `probe`, the GIL
    probe runs beside them (as in a profiled busy phase); with `hog` ("normal" or "sched_idle"), a
    GIL-free CPU hog thread at that priority."""
    path = warm_copy(base, "idle")
    prof = Profile()
    lat: list[float] = []
    stop = threading.Event()
    hogger = threading.Thread(target=cpu_hog, args=(stop, hog == "sched_idle"), daemon=True) if hog else None
    try:
        with blockstore.open(path, block_size=block_size) as s:
            if probe:
                prof.start_probe()
            if hogger is not None:
                hogger.start()
            for op in reqs:
                t0 = time.perf_counter()
                s.get_many(op.keys, ns=op.ns)
                lat.append((time.perf_counter() - t0) * 1e3)
            stop.set()
            bpr = blocks_per_request(s, reqs)
            prof.undo()
    finally:
        stop.set()
        if hogger is not None and hogger.is_alive():
            hogger.join()
        shutil.rmtree(path, ignore_errors=True)
    late = [lt * 1e3 for _t, lt in prof.probe]
    return {"lat_ms": lat, "blocks_per_request": bpr,
            "probe_late_ms": {"p50": pct(late, 50), "p99": pct(late, 99)} if probe else None}


def busy_phase(base: str, block_size: int, reqs: Sequence[Request], policy: str, profile: bool,
               idle_p99_ms: float) -> dict[str, Any]:
    """The requests repeated on a warm copy whose background compactor works through the backlog, until it
    has been quiet (bench.compaction.read_until_quiet)."""
    path = warm_copy(base, "busy")
    events: list[float] = []
    mark = lambda *_a: events.append(time.perf_counter())  # noqa: E731 (list.append is atomic)
    for name in HOOKS:
        hooks.register(name, mark)
    prof = Profile()
    timed: list[tuple[float, float]] = []
    stats0 = (foreground.STATS.waits, foreground.STATS.waited_s, foreground.STATS.grants)
    try:
        with blockstore.open(path, block_size=block_size,
                             compaction={"policy": policy, "interval_s": 0.01, "background": False}) as s:
            comp = s.compactor
            if profile:
                prof.install(s, comp)
            comp.start()
            went_idle = read_until_quiet(s, reqs, lambda: events[-1] if events else None, timed)
            comp.stop()
            prof.undo()
            status = comp.status()
            bpr = blocks_per_request(s, reqs)
    finally:
        for name in HOOKS:
            hooks.unregister(name, mark)
        prof.undo()
        shutil.rmtree(path, ignore_errors=True)
    spans = merged_spans(events, GAP_S)
    during = [any(overlap(a, b, s0, s1) > 0 or s0 <= a <= s1 for s0, s1 in spans) for a, b in timed]
    busy_s = sum(b - a for a, b in spans)
    moved = status["gc_bytes_total"] + status["relocated_bytes_total"]
    out = {"during_ms": [(b - a) * 1e3 for (a, b), on in zip(timed, during) if on],
           "not_during_ms": [(b - a) * 1e3 for (a, b), on in zip(timed, during) if not on],
           "busy_s": busy_s, "moved_mb": moved / 1e6, "mb_s": moved / 1e6 / busy_s if busy_s else None,
           "went_idle": went_idle, "passes": status["passes"], "blocks_per_request": bpr, "reads": len(timed),
           # the background thread's pauses for reads in flight (blockstore.foreground): how many, seconds, and
           # how many ended at the starvation bound with a read still in flight
           "stepped_aside": {"waits": foreground.STATS.waits - stats0[0],
                             "s": round(foreground.STATS.waited_s - stats0[1], 3),
                             "grants": foreground.STATS.grants - stats0[2]}}
    if profile:
        out["profile"] = prof.attribute(timed, during, idle_p99_ms)
    return out


def unpaced(base: str, block_size: int, reqs: Sequence[Request], policy: str, reads: int) -> dict[str, Any]:
    """The same backlog compacted in the caller's thread with no pacing, after the same `reads` requests as
    the busy phase made (relocation's budget refills with what is read): blocks/request after, MB/s."""
    path = warm_copy(base, "unpaced")
    try:
        with blockstore.open(path, block_size=block_size,
                             compaction={"policy": policy, "background": False}) as s:
            for j in range(reads):
                op = reqs[j % len(reqs)]
                s.get_many(op.keys, ns=op.ns)
            t0 = time.perf_counter()
            rep = s.compactor.run_until_idle()
            dt = time.perf_counter() - t0
            moved = rep.gc_bytes + rep.relocated_bytes
            return {"blocks_per_request": blocks_per_request(s, reqs), "moved_mb": moved / 1e6,
                    "s": dt, "mb_s": moved / 1e6 / dt if dt else None}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def measure(trace: Trace, *, root: str, payloads: Payloads, n_requests: int, policy: str,
            profile: bool, hog: bool) -> dict[str, Any]:
    """One trace, one repeat: idle, busy, idle again, and the unpaced reference."""
    bs = TRACE_BLOCK_SIZE[trace.name]
    base = replay(trace, "full", block_size=bs, root=root, payloads=payloads, passes=0, cold_samples=0,
                  keep=True)["path"]
    half = len(trace.ops) // 2
    picked = evenly([i for i, o in enumerate(trace.ops) if isinstance(o, Request) and i >= half], n_requests)
    reqs = [op for op in (trace.ops[i] for i in picked) if isinstance(op, Request)]
    try:
        before = idle_phase(base, bs, reqs, profile)
        busy = busy_phase(base, bs, reqs, policy, profile, pct(before["lat_ms"], 99))
        after = idle_phase(base, bs, reqs, profile)
        ref = unpaced(base, bs, reqs, policy, busy["reads"])
        hogs = {h: idle_phase(base, bs, reqs, False, h)["lat_ms"] for h in (("normal", "sched_idle") if hog else ())}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    idle = before["lat_ms"] + after["lat_ms"]
    n = len(busy["during_ms"])
    idle_p99, during_p99 = pct(idle, 99), pct(busy["during_ms"], 99)
    return {
        "idle_p99_ms": idle_p99, "idle_p50_ms": pct(idle, 50),
        "idle_before_p99_ms": pct(before["lat_ms"], 99), "idle_after_p99_ms": pct(after["lat_ms"], 99),
        "during_p99_ms": during_p99, "during_p50_ms": pct(busy["during_ms"], 50), "during_n": n,
        "not_during_p99_ms": pct(busy["not_during_ms"], 99),
        "ratio": during_p99 / idle_p99 if idle_p99 else None,
        "noise": pct(after["lat_ms"], 99) / pct(before["lat_ms"], 99),
        "moved_mb": busy["moved_mb"], "busy_s": busy["busy_s"], "gc_mb_s": busy["mb_s"],
        "went_idle": busy["went_idle"], "passes": busy["passes"], "stepped_aside": busy["stepped_aside"],
        "blocks_per_request": {"before": before["blocks_per_request"], "paced": busy["blocks_per_request"],
                               "unpaced": ref["blocks_per_request"]},
        "unpaced": ref,
        "probe_idle_ms": before["probe_late_ms"],
        # idle reads beside a GIL-free CPU hog thread, p99 / idle p99: the machine's floor for background work
        "hog_ratio": {h: pct(lat, 99) / idle_p99 for h, lat in hogs.items()},
        "profile": busy.get("profile"),
    }


# ---------------------------------------------------------------------------------------------- report


def summary(values: list[float | None]) -> dict[str, Any]:
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)}


def fmt(s: dict[str, Any], digits: int = 2) -> str:
    if s["median"] is None:
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def report(per_trace: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    rows = ["| trace | p99 during ÷ idle | idle ÷ idle (noise) | idle p99 ms | during p99 ms "
            "| MB/s paced (unpaced) | went idle | blocks/request before → paced (unpaced) |",
            "|---|---|---|---|---|---|---|---|"]
    doc: dict[str, Any] = {}
    for tr, runs in per_trace.items():
        s = {k: summary([r[k] for r in runs]) for k in ("ratio", "noise", "idle_p99_ms",
                                                         "during_p99_ms", "gc_mb_s")}
        s["unpaced_mb_s"] = summary([r["unpaced"]["mb_s"] for r in runs])
        bpr = {k: statistics.median(r["blocks_per_request"][k] for r in runs) for k in ("before", "paced", "unpaced")}
        idle_runs = sum(bool(r["went_idle"]) for r in runs)
        for h in ("normal", "sched_idle"):
            s[f"hog_{h}"] = summary([r["hog_ratio"].get(h) for r in runs])
        doc[tr] = s | {"blocks_per_request": bpr, "went_idle": f"{idle_runs}/{len(runs)}"}
        rows.append(f"| {tr} | {fmt(s['ratio'])} | {fmt(s['noise'])} "
                    f"| {fmt(s['idle_p99_ms'])} | {fmt(s['during_p99_ms'])} | {fmt(s['gc_mb_s'], 1)} "
                    f"({fmt(s['unpaced_mb_s'], 1)}) | {idle_runs}/{len(runs)} | {bpr['before']:.2f} → "
                    f"{bpr['paced']:.2f} ({bpr['unpaced']:.2f}) |")
    if any(s["hog_normal"]["n"] for s in doc.values()):
        rows += ["", "Idle reads beside a GIL-free CPU hog thread, p99 ÷ idle p99 (the machine's floor for any "
                 "background work):", "", "| trace | hog at normal priority | hog under SCHED_IDLE |", "|---|---|---|"]
        rows += [f"| {tr} | {fmt(s['hog_normal'])} | {fmt(s['hog_sched_idle'])} |" for tr, s in doc.items()]
    return "\n".join(rows), doc


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compaction_p99", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "compaction_p99", default_mode="quick", quick="quick traces, 100 requests, 3 repeats",
                  full="traces 4x bigger, 400 requests, 2 repeats", dir_default=DEFAULT_DIR,
                  dir_help="(default bench/.scratch)")
    ap.add_argument("--traces", nargs="+", choices=list(GENERATORS), help="traces (default: quick adds heldout)")
    ap.add_argument("--repeats", type=int, help="repeats, each with new traces (seed + r)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, help="timed requests per phase")
    ap.add_argument("--policy", default="full", help="the background compactor's policy (default full)")
    ap.add_argument("--profile", action="store_true", help="GIL probe and timed compactor calls (changes timings)")
    ap.add_argument("--hog", action="store_true", help="also time the idle requests beside a GIL-free CPU hog "
                    "thread, at normal priority and under SCHED_IDLE (Linux)")
    ap.add_argument("--no-step-aside", action="store_true", help="the compactor's thread never steps aside for "
                    "reads (blockstore.foreground.background made a no-op: the behaviour before 904bc36, same code)")
    args = ap.parse_args(argv)
    args.mode = bench_mode(args)
    args.json = results_path(args, "compaction_p99")
    m = MODES[args.mode]
    args.traces = args.traces or m["traces"]
    args.repeats = args.repeats or m["repeats"]
    args.requests = args.requests or m["requests"]
    args.scale = m["scale"]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.no_step_aside:
        foreground.background = lambda stop=None: None  # type: ignore[assignment]  # pacing marks nothing
    os.makedirs(args.dir, exist_ok=True)
    t_all = time.perf_counter()
    root = tempfile.mkdtemp(prefix="compaction-p99-", dir=args.dir)
    per_trace: dict[str, list[dict[str, Any]]] = {t: [] for t in args.traces}
    load = []
    try:
        for r in range(args.repeats):
            traces = [generate(name, args.seed + r, args.scale) for name in args.traces]
            for t in traces:
                check(t)
            payloads = Payloads(args.seed + r, max(t.summary()["max_record_bytes"] for t in traces))
            for t in traces:
                load.append(os.getloadavg()[0])
                res = measure(t, root=root, payloads=payloads, n_requests=args.requests, policy=args.policy,
                              profile=args.profile, hog=args.hog)
                per_trace[t.name].append(res)
                print(f"seed {args.seed + r} {t.name}: p99 during {res['during_p99_ms']:.2f} ms (n={res['during_n']})"
                      f" / idle {res['idle_p99_ms']:.2f} = {res['ratio']:.2f}; idle/idle {res['noise']:.2f}; "
                      f"{res['moved_mb']:.1f} MB in {res['busy_s']:.2f} s; load {load[-1]:.1f} "
                      f"({time.perf_counter() - t_all:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table, summ = report(per_trace)
    doc = finite({"benchmark": "compaction_p99", "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
                  "config": {"mode": args.mode, "scale": args.scale, "seeds": [args.seed + r for r in range(args.repeats)],
                             "requests": args.requests, "policy": args.policy, "profile": args.profile,
                             "step_aside": not args.no_step_aside,
                             "target": pacing.FG_P99_TARGET},
                  "machine": machine_info(args.dir), "engine": engine_state(),
                  "load_avg_1m": {"min": min(load), "max": max(load)}, "wall_s": round(time.perf_counter() - t_all, 1),
                  "summary": summ, "runs": per_trace})
    write_json_compact(args.json, doc)
    print(table)
    print(f"(medians [min-max] over {args.repeats} repeat(s); load average {min(load):.1f}-{max(load):.1f}; "
          f"command: {doc['command']}; results: {os.path.relpath(args.json)})")
    print(json.dumps(finite({"traces": {tr: {"ratio": s["ratio"]["median"], "noise": s["noise"]["median"],
                                             "gc_mb_s": s["gc_mb_s"]["median"]} for tr, s in summ.items()}})))


if __name__ == "__main__":
    main()
