"""Scaling: how each cost of the engine grows with the store.

Two stores are grown in stages; at every stage the store is closed and measured by fresh processes,
then grown further:

    bytes     1 MiB KV records (an LMCache chunk's size), stages in GB of payload:
              quick 0.25, 0.5, 1 ; full 1, 2, 5, 10, 20, 50
    records   chunk records (agent memories: ~256 B of text and their JSON meta, written with
              put_chunks over 10,000 sessions, interleaved), stages in records:
              quick 10k, 30k, 100k ; full 10k, 100k, 1M, 10M

At each stage (every figure comes from a process that did only that work):

    put          records/s and MB/s of the writes that grew the store to this stage (put_many or
                 put_chunks, 64 x 1 MiB or 2,000 chunks per call, durability "cache", close included),
                 and that writer's peak RSS
    size         block-file bytes, directory (RocksDB) bytes and bytes per record, blocks
    open clean   a fresh process opens the store after a clean close: seconds (median of 3) and RSS
    get          in the first of those processes: single-key gets of uniformly random keys, first
                 with the block files dropped from the page cache (cold), then the same keys again
                 (warm): p50/p99 in microseconds; every value checked against what was written; peak
                 RSS after the gets
    open crash   a process opens the store, writes one more batch (acknowledged, cache durability) and
                 is killed with SIGKILL, leaving blocks open and the store unclean; the next open's
                 seconds (the recovery) and what it scanned
    compaction   the newest records are overwritten (every other record of a window of the same size at
                 every stage: 512 MiB of 1 MiB records, 20,000 chunks; quick: less), then one process
                 runs compaction passes (policy "full", unpaced, GC budget unlimited) in a thread until
                 idle while the main thread does random single-key gets: MB/s moved, and get p50/p99
                 during compaction vs the same number of gets just before it (idle). The get latencies
                 over time at the largest stage are kept for the timeline plot.

    python -m bench.scaling --quick             # about 2 minutes here
    python -m bench.scaling --full              # 50 GB and 10 million records: 16-20 minutes here
    python -m bench.scaling --series records --stages 10000,100000

The store grows by its own writes, so the disk under --dir needs room for the largest stage (the full
bytes series needs about 52 GB); the run refuses to start without it. Results go to
bench/results/scaling[_quick].json; the last line of stdout is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import xxhash

from bench.common import bench_mode, engine_state, machine_info, results_path, standard_args, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, "bench", ".scratch")
MiB = 1 << 20
KV_RECORD = MiB
CHUNK_TEXT = 256
POOL = 64
USERS, SESSIONS = 1000, 10  # 10,000 sessions written round-robin: more partitions than open blocks

MODES: dict[str, dict[str, Any]] = {
    "quick": {"bytes": [0.25, 0.5, 1.0], "records": [10_000, 30_000, 100_000],
              "gets": 300, "opens": 3, "window": {"bytes": 128 * MiB, "records": 5_000}},
    "full": {"bytes": [1, 2, 5, 10, 20, 50], "records": [10_000, 100_000, 1_000_000, 10_000_000],
             "gets": 1000, "opens": 3, "window": {"bytes": 512 * MiB, "records": 20_000}},
}


# ------------------------------------------------------------------ what is written (both sides agree)


class Series:
    """Keys and contents of one series: record i, written for the v-th time, is pool[(7 i + v) % POOL]."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.kind = kind
        rng = random.Random(seed)
        if kind == "bytes":
            self.pool: list[bytes] = [rng.randbytes(KV_RECORD) for _ in range(POOL)]
        else:
            alphabet = "abcdefghijklmnopqrstuvwxyz     "
            self.pool = [("".join(rng.choice(alphabet) for _ in range(CHUNK_TEXT))).encode() for _ in range(POOL)]
        self.digests = [xxhash.xxh3_64_intdigest(p) for p in self.pool]
        self.out: memoryview | None = None

    def record_bytes(self) -> int:
        return KV_RECORD if self.kind == "bytes" else CHUNK_TEXT

    def value(self, i: int, v: int) -> bytes:
        return self.pool[(7 * i + v) % POOL]

    def digest(self, i: int, v: int) -> int:
        return self.digests[(7 * i + v) % POOL]

    @staticmethod
    def kv_key(i: int) -> bytes:
        return b"kv%012d" % i

    @staticmethod
    def chunk_id(i: int) -> tuple[str, str, str]:
        return f"u{i % USERS}", f"s{(i // USERS) % SESSIONS}", f"c{i}"

    def write(self, store: Any, idx: Sequence[int], versions: Sequence[int]) -> None:
        if self.kind == "bytes":
            store.put_many([(self.kv_key(i), self.value(i, v)) for i, v in zip(idx, versions)])
        else:
            from blockstore import ChunkWrite

            store.put_chunks([ChunkWrite(*self.chunk_id(i), self.value(i, v).decode(), ts_ns=i)
                              for i, v in zip(idx, versions)])

    def read_one(self, store: Any, i: int) -> Any:
        """The record's value as a buffer. KV records are read into one caller-owned page-aligned
        buffer, as LMCache's adapter reads into its memory objects."""
        if self.kind == "bytes":
            if self.out is None:
                from blockstore.reader import aligned_buffer

                self.out = aligned_buffer(KV_RECORD)
            n = store.get_many([self.kv_key(i)], out=[self.out])[0]
            return None if n is None else self.out[:n]
        c = store.get_chunks([self.chunk_id(i)])[0]
        return None if c is None else c.text.encode()

    def drop_values(self) -> None:
        """Keep only the digests: a process that only reads must not count 64 MiB of test data as the
        store's memory."""
        self.pool = []


def version_of(i: int, windows: Sequence[Sequence[int]]) -> int:
    """How many overwrite windows rewrote record i (every other record, even offsets, of each window)."""
    return sum(1 for lo, hi in windows if lo <= i < hi and (i - lo) % 2 == 0)


def batch_size(kind: str) -> int:
    return 64 if kind == "bytes" else 2000


# ------------------------------------------------------------------ the measuring processes


def rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_rss_mb": out.get("VmHWM", 0.0)}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def timed_gets(series: Series, store: Any, idx: Sequence[int], windows: Sequence[Sequence[int]]) -> list[float]:
    """Microseconds per single-key get; each value checked against what was written."""
    lat = []
    for i in idx:
        t = time.perf_counter()
        got = series.read_one(store, i)
        lat.append((time.perf_counter() - t) * 1e6)
        if got is None or xxhash.xxh3_64_intdigest(got) != series.digest(i, version_of(i, windows)):
            raise SystemExit(f"record {i}: {'missing' if got is None else 'wrong contents'}")
    return lat


def job_grow(a: dict[str, Any]) -> dict[str, Any]:
    from blockstore.store import open_store

    series = Series(a["kind"])
    t0 = time.perf_counter()
    store = open_store(a["path"], create=True, durability="cache")
    n, step = a["hi"] - a["lo"], batch_size(a["kind"])
    for lo in range(a["lo"], a["hi"], step):
        idx = range(lo, min(lo + step, a["hi"]))
        series.write(store, idx, [0] * len(idx))
    store.close()
    secs = time.perf_counter() - t0
    return {"records": n, "seconds": secs, "records_per_s": n / secs,
            "mb_per_s": n * series.record_bytes() / secs / 1e6, **rss_mb()}


def job_probe(a: dict[str, Any]) -> dict[str, Any]:
    from blockstore.store import open_store

    series = Series(a["kind"])
    series.drop_values()
    before = rss_mb()
    t0 = time.perf_counter()
    store = open_store(a["path"], create=False, durability="cache")
    out: dict[str, Any] = {"open_s": time.perf_counter() - t0, "rss_open_mb": rss_mb()["rss_mb"],
                           "rss_before_open_mb": before["rss_mb"], "recovery": store.recovery_report}
    if a.get("gets"):
        rng = random.Random(a["seed"])
        idx = [rng.randrange(a["n"]) for _ in range(a["gets"])]
        store.drop_page_cache()
        cold = timed_gets(series, store, idx, a["windows"])
        warm = timed_gets(series, store, idx, a["windows"])
        out.update({"get_cold_us": summary(cold), "get_warm_us": summary(warm), **rss_mb()})
    store.close()
    return out


def job_crash(a: dict[str, Any]) -> dict[str, Any]:
    """Write one acknowledged batch, then die without closing (SIGKILL: no Python cleanup runs)."""
    from blockstore.store import open_store

    series = Series(a["kind"])
    store = open_store(a["path"], create=False, durability="cache")
    idx = range(a["lo"], a["hi"])
    series.write(store, idx, [0] * len(idx))
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def job_compact(a: dict[str, Any]) -> dict[str, Any]:
    from blockstore.compaction import attach
    from blockstore.store import open_store

    series = Series(a["kind"])
    windows = a["windows"]
    lo, hi = windows[-1]
    store = open_store(a["path"], create=False, durability="cache")
    comp = attach(store, {"policy": "full", "gc_budget": float("inf"), "relocation": False}, background=False)
    step = batch_size(a["kind"])
    for s in range(lo, hi, step * 2):
        idx = list(range(s, min(s + step * 2, hi), 2))
        series.write(store, idx, [version_of(i, windows) for i in idx])
    rng = random.Random(a["seed"])
    n = a["n"]
    idle = timed_gets(series, store, [rng.randrange(n) for _ in range(a["gets"])], windows)
    done = threading.Event()
    result: dict[str, Any] = {}

    def compact() -> None:
        t = time.perf_counter()
        try:
            rep = comp.run_until_idle(max_passes=1000)
            result.update(gc_bytes=rep.gc_bytes, gc_blocks=rep.gc_blocks, reclaimed_blocks=rep.reclaimed_blocks,
                          relocated_bytes=rep.relocated_bytes)
        finally:
            result["busy_s"] = time.perf_counter() - t
            done.set()

    th = threading.Thread(target=compact, name="compaction")
    t0 = time.perf_counter()
    th.start()
    during: list[float] = []
    timeline: list[tuple[float, float, int]] = []
    while not done.is_set():
        i = rng.randrange(n)
        t = time.perf_counter()
        lat = timed_gets(series, store, [i], windows)[0]
        during.append(lat)
        timeline.append((t - t0, lat, 1))
    th.join()
    t_end = time.perf_counter() - t0
    after = []
    for _ in range(len(idle)):  # the tail of the timeline: after compaction went idle
        i = rng.randrange(n)
        t = time.perf_counter()
        after.append(timed_gets(series, store, [i], windows)[0])
        timeline.append((t - t0, after[-1], 0))
    store.close()
    moved = result.get("gc_bytes", 0) + result.get("relocated_bytes", 0)
    keep = max(1, len(timeline) // 2000)
    return {**result, "moved_mb_per_s": moved / result["busy_s"] / 1e6 if result["busy_s"] else 0.0,
            "compaction_wall_s": t_end, "get_idle_us": summary(idle), "get_during_us": summary(during),
            "get_after_us": summary(after), "timeline": [[round(x, 4), round(y, 1), c] for x, y, c in timeline[::keep]],
            **rss_mb()}


JOBS = {"grow": job_grow, "probe": job_probe, "crash": job_crash, "compact": job_compact}


def summary(us: list[float]) -> dict[str, float]:
    return {"n": len(us), "p50": pct(us, 0.5), "p99": pct(us, 0.99), "mean": statistics.fmean(us) if us else 0.0}


def child(job: str, **a: Any) -> dict[str, Any]:
    """Run one job in a fresh interpreter; its result is the last line of its stdout."""
    cmd = [sys.executable, "-m", "bench.scaling", "--job", job, "--job-args", json.dumps(a)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if job == "crash":
        if p.returncode != -signal.SIGKILL:
            raise RuntimeError(f"crash job did not die by SIGKILL (rc {p.returncode}): {p.stderr[-2000:]}")
        return {}
    if p.returncode != 0:
        raise RuntimeError(f"{job} failed (rc {p.returncode}): {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the stages


def du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def stage_counts(kind: str, stages: Sequence[float]) -> list[int]:
    if kind == "bytes":
        return [int(gb * 1e9) // KV_RECORD for gb in stages]
    return [int(n) for n in stages]


def run_series(kind: str, stages: Sequence[float], root: str, mode: dict[str, Any], seed: int,
               log: Any, on_stage: Any) -> list[dict[str, Any]]:
    path = os.path.join(root, f"store-{kind}")
    n = 0
    windows: list[list[int]] = []
    rows: list[dict[str, Any]] = []
    window = mode["window"][kind] // KV_RECORD if kind == "bytes" else mode["window"][kind]
    crash_batch = 16 if kind == "bytes" else 1000
    for stage, target in zip(stages, stage_counts(kind, stages)):
        t_stage = time.perf_counter()
        row: dict[str, Any] = {"stage": stage}
        if target > n:
            row["put"] = child("grow", kind=kind, path=path, lo=n, hi=target)
            n = target
        log(f"{kind} {stage}: grown to {n:,} records ({row.get('put', {}).get('seconds', 0):.0f} s)")
        # open after a crash first (it leaves the store as the crash left it, recovered and closed)
        child("crash", kind=kind, path=path, lo=n, hi=n + crash_batch)
        n += crash_batch
        rec = child("probe", kind=kind, path=path)
        row["open_crash_s"] = rec["open_s"]
        row["recovery"] = {k: (len(v) if isinstance(v, list) else v) for k, v in (rec["recovery"] or {}).items()}
        probes = [child("probe", kind=kind, path=path, n=n, windows=windows, seed=seed + len(rows),
                        gets=mode["gets"] if k == 0 else 0) for k in range(mode["opens"])]
        row["open_clean_s"] = {"median": statistics.median(p["open_s"] for p in probes),
                               "min": min(p["open_s"] for p in probes), "max": max(p["open_s"] for p in probes),
                               "values": [p["open_s"] for p in probes]}
        row["rss_open_mb"] = statistics.median(p["rss_open_mb"] for p in probes)
        row["rss_after_gets_mb"] = probes[0]["rss_mb"]
        row["get_cold_us"], row["get_warm_us"] = probes[0]["get_cold_us"], probes[0]["get_warm_us"]
        log(f"{kind} {stage}: open clean {row['open_clean_s']['median'] * 1e3:.0f} ms, "
            f"after crash {row['open_crash_s'] * 1e3:.0f} ms; get cold p50 {row['get_cold_us']['p50']:.0f} us")
        lo = max(0, n - window)
        windows.append([lo, n])
        comp = child("compact", kind=kind, path=path, n=n, windows=windows, seed=seed + 1000 + len(rows),
                     gets=mode["gets"])
        row["compaction"] = {k: v for k, v in comp.items() if k != "timeline"}
        row["_timeline"] = comp["timeline"]
        log(f"{kind} {stage}: compaction {comp['moved_mb_per_s']:.0f} MB/s, get p99 idle "
            f"{comp['get_idle_us']['p99']:.0f} us, during {comp['get_during_us']['p99']:.0f} us")
        blocks_dir = os.path.join(path, "blocks")
        row.update({
            "records": n, "live_records": n,
            "payload_bytes": n * (KV_RECORD if kind == "bytes" else CHUNK_TEXT),
            "block_bytes": du(blocks_dir), "blocks": len(os.listdir(blocks_dir)),
            "directory_bytes": du(os.path.join(path, "directory")),
        })
        row["directory_bytes_per_record"] = row["directory_bytes"] / n
        row["stage_s"] = time.perf_counter() - t_stage
        rows.append(row)
        on_stage(kind, [{k: v for k, v in r.items() if k != "_timeline"} for r in rows])
    timeline = rows[-1].pop("_timeline") if rows else []
    for r in rows:
        r.pop("_timeline", None)
    if rows:
        rows[-1]["compaction"]["timeline"] = timeline
    shutil.rmtree(path, ignore_errors=True)
    return rows


# ------------------------------------------------------------------ verdicts, plots, tables


def growth(rows: list[dict[str, Any]], field: str) -> float:
    """How the figure grew from the first to the last stage, per unit of record-count growth (1 =
    linear in the records, 0 = flat): log(ratio of figures) / log(ratio of record counts)."""
    import math

    a, b = rows[0], rows[-1]
    fa, fb = get_path(a, field), get_path(b, field)
    if not fa or not fb or b["records"] <= a["records"]:
        return float("nan")
    return math.log(fb / fa) / math.log(b["records"] / a["records"])


def get_path(row: dict[str, Any], field: str) -> float:
    cur: Any = row
    for part in field.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return float(cur) if isinstance(cur, (int, float)) else 0.0


# (field, label, unit, most it may grow with the record count: exponent)
FIGURES = [
    ("open_clean_s.median", "open after clean close", "s", 0.25),
    ("open_crash_s", "open after crash", "s", 1.0),
    ("directory_bytes", "directory size", "bytes", 1.1),
    ("rss_open_mb", "RSS after open", "MB", 0.25),
    ("rss_after_gets_mb", "peak RSS after gets", "MB", 0.25),
    ("get_cold_us.p50", "get cold p50", "us", 0.25),
    ("get_cold_us.p99", "get cold p99", "us", 0.35),
    ("get_warm_us.p50", "get warm p50", "us", 0.25),
    ("put.records_per_s", "put throughput", "records/s", None),
    ("compaction.moved_mb_per_s", "compaction throughput", "MB/s", None),
    ("compaction.get_during_us.p99", "get p99 during compaction", "us", 0.35),
]


def verdicts(series: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Growth exponents (how a figure scales with the record count) against the most each may have:
    open after a clean close, memory and get latency must stay about flat; nothing may grow faster
    than linear. Throughputs must not fall by more than half."""
    out: dict[str, Any] = {}
    for kind, rows in series.items():
        if len(rows) < 2:
            continue
        v: dict[str, Any] = {}
        for field, _label, _unit, limit in FIGURES:
            e = growth(rows, field)
            if limit is None:
                first, last = get_path(rows[0], field), get_path(rows[-1], field)
                ok = bool(first) and last >= 0.5 * first
                v[field] = {"first": first, "last": last, "ratio": last / first if first else None, "ok": ok}
            else:
                v[field] = {"exponent": e, "limit": limit, "ok": not e > limit}
        out[kind] = v
    return out


def plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """scaling[_quick]_curves.png (every figure vs records, log-log, both series) and
    scaling[_quick]_compaction_timeline.png (get latency over time while compaction runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = "" if doc.get("config", {}).get("mode") == "full" else "_quick"
    files = []
    series = doc["series"]
    panels = FIGURES
    cols = 4
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.3 * rows_n), squeeze=False)
    for ax, (field, label, unit, _limit) in zip(axes.flat, panels):
        for kind, rows in series.items():
            xs = [r["records"] for r in rows]
            ys = [get_path(r, field) for r in rows]
            name = "1 MiB KV records" if kind == "bytes" else "chunk records"
            ax.plot(xs, ys, marker="o", label=name)
            if kind == "bytes":
                for x, y, r in zip(xs, ys, rows):
                    ax.annotate(f"{r['payload_bytes'] / 1e9:.0f} GB" if r["payload_bytes"] >= 1e9 else
                                f"{r['payload_bytes'] / 1e6:.0f} MB", (x, y), fontsize=6, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("records in store", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"bench.scaling ({doc['config']['mode']}): every cost vs store size", fontsize=10)
    fig.tight_layout()
    files.append(os.path.join(out_dir, f"scaling{suffix}_curves.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(series), figsize=(7 * len(series), 3.8), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], series.items()):
        tl = rows[-1]["compaction"].get("timeline", []) if rows else []
        if not tl:
            continue
        busy = [p for p in tl if p[2]]
        idle = [p for p in tl if not p[2]]
        if busy:
            ax.axvspan(busy[0][0], busy[-1][0], color="#ffcc80", alpha=0.4, label="compaction running")
        ax.plot([p[0] for p in busy], [p[1] for p in busy], ".", ms=2, label="get during compaction")
        ax.plot([p[0] for p in idle], [p[1] for p in idle], ".", ms=2, label="get after")
        c = rows[-1]["compaction"]
        ax.axhline(c["get_idle_us"]["p99"], color="green", lw=0.8, ls="--", label="idle p99 (before)")
        ax.set_yscale("log")
        ax.set_xlabel("seconds since compaction started")
        ax.set_ylabel("single-key get latency, us")
        ax.set_title(f"{kind}: {rows[-1]['records']:,} records, {c['moved_mb_per_s']:.0f} MB/s moved", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(os.path.join(out_dir, f"scaling{suffix}_compaction_timeline.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def table(doc: dict[str, Any]) -> str:
    lines = []
    head = (f"{'series':<8} {'records':>11} {'payload':>9} {'blocks':>7} {'dir MB':>8} {'dir B/rec':>9} "
            f"{'open ms':>8} {'crash ms':>9} {'RSS MB':>7} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} "
            f"{'put rec/s':>10} {'put MB/s':>9} {'GC MB/s':>8} {'p99 idle':>9} {'p99 GC':>8}")
    lines.append(head)
    for kind, rows in doc["series"].items():
        for r in rows:
            c = r["compaction"]
            lines.append(
                f"{kind:<8} {r['records']:>11,} {human(r['payload_bytes']):>9} {r['blocks']:>7} "
                f"{r['directory_bytes'] / 1e6:>8.1f} {r['directory_bytes_per_record']:>9.1f} "
                f"{r['open_clean_s']['median'] * 1e3:>8.1f} {r['open_crash_s'] * 1e3:>9.1f} "
                f"{r['rss_after_gets_mb']:>7.0f} {r['get_cold_us']['p50']:>9.0f} {r['get_cold_us']['p99']:>9.0f} "
                f"{r['get_warm_us']['p50']:>9.0f} {r.get('put', {}).get('records_per_s', 0):>10,.0f} "
                f"{r.get('put', {}).get('mb_per_s', 0):>9.1f} {c['moved_mb_per_s']:>8.1f} "
                f"{c['get_idle_us']['p99']:>9.0f} {c['get_during_us']['p99']:>8.0f}")
    return "\n".join(lines)


def human(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def summary_markdown(doc: dict[str, Any]) -> str:
    out = ["| series | records | payload | blocks | directory | open (clean) | open (after crash) | RSS | "
           "get cold p50/p99 | get warm p50 | put | compaction | get p99 idle / during GC |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, rows in doc["series"].items():
        for r in rows:
            c, put = r["compaction"], r.get("put", {})
            out.append(
                f"| {kind} | {r['records']:,} | {human(r['payload_bytes'])} | {r['blocks']} | "
                f"{r['directory_bytes'] / 1e6:.1f} MB ({r['directory_bytes_per_record']:.0f} B/rec) | "
                f"{r['open_clean_s']['median'] * 1e3:.0f} ms | {r['open_crash_s'] * 1e3:.0f} ms | "
                f"{r['rss_after_gets_mb']:.0f} MB | {r['get_cold_us']['p50']:.0f} / {r['get_cold_us']['p99']:.0f} us | "
                f"{r['get_warm_us']['p50']:.0f} us | {put.get('records_per_s', 0):,.0f} rec/s "
                f"({put.get('mb_per_s', 0):.0f} MB/s) | {c['moved_mb_per_s']:.0f} MB/s | "
                f"{c['get_idle_us']['p99']:.0f} / {c['get_during_us']['p99']:.0f} us |")
    out.append("")
    out.append("Growth with the record count (exponent of a power law fitted between the first and last stage: "
               "0 = flat, 1 = linear):")
    out.append("")
    out.append("| series | figure | exponent / ratio | limit | ok |")
    out.append("|---|---|---:|---:|---|")
    labels = {f: lab for f, lab, _u, _l in FIGURES}
    for kind, v in doc.get("verdicts", {}).items():
        for field, x in v.items():
            if "exponent" in x:
                out.append(f"| {kind} | {labels[field]} | {x['exponent']:.2f} | {x['limit']} | "
                           f"{'yes' if x['ok'] else '**no**'} |")
            else:
                out.append(f"| {kind} | {labels[field]} | last/first {x['ratio']:.2f} | >= 0.5 | "
                           f"{'yes' if x['ok'] else '**no**'} |")
    from bench.report import machine_line, reproduce_line

    out += ["", machine_line(doc), "", reproduce_line(doc)]
    return "\n".join(out)


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "scaling", default_mode="quick", quick="small stages", full="up to 50 GB and 10 million records",
                  dir_default=DEFAULT_DIR, dir_help="(default bench/.scratch)")
    ap.add_argument("--series", nargs="+", choices=["bytes", "records"], default=["bytes", "records"])
    ap.add_argument("--stages", help="comma-separated stages for the one series given (GB for bytes, records for "
                    "records)")
    ap.add_argument("--gets", type=int, help="timed gets per probe (default: quick 300, full 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--job-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.mode = bench_mode(args)
    if args.stages and len(args.series) != 1:
        ap.error("--stages needs exactly one --series")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.job:
        print(json.dumps(JOBS[args.job](json.loads(args.job_args))))
        return
    mode = dict(MODES[args.mode])
    if args.gets:
        mode["gets"] = args.gets
    stages = {k: ([float(x) for x in args.stages.split(",")] if args.stages else mode[k]) for k in args.series}
    need = sum(max(stage_counts(k, v)) * (KV_RECORD + 4096 if k == "bytes" else 1024) for k, v in stages.items())
    os.makedirs(args.dir, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if need * 1.05 > free:
        sys.exit(f"bench.scaling: the largest stages need about {need / 1e9:.1f} GB under {args.dir}, "
                 f"only {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    machine = machine_info(args.dir)
    out = results_path(args, "scaling")
    series: dict[str, list[dict[str, Any]]] = {}

    def document(partial: bool) -> dict[str, Any]:
        return {
            "benchmark": "scaling",
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
            "config": {"mode": args.mode, "stages": stages, "gets": mode["gets"], "opens": mode["opens"],
                       "overwrite_window": mode["window"], "kv_record_bytes": KV_RECORD,
                       "chunk_text_bytes": CHUNK_TEXT, "sessions": USERS * SESSIONS, "durability": "cache"},
            "machine": machine,
            "engine": engine_state(),
            "wall_s": round(time.perf_counter() - t0, 1),
            "partial": partial,
            "series": series,
        }

    def on_stage(kind: str, rows: list[dict[str, Any]]) -> None:
        write_json(out + ".partial", document(True) | {"series": {**series, kind: rows}})

    root = tempfile.mkdtemp(prefix="scaling-", dir=args.dir)
    try:
        for kind, st in stages.items():
            series[kind] = run_series(kind, st, root, mode, args.seed, log, on_stage)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc = document(False)
    doc["verdicts"] = verdicts(series)
    write_json(out, doc)
    if os.path.exists(out + ".partial"):
        os.unlink(out + ".partial")
    print(table(doc))
    bad = [f"{k}:{f}" for k, v in doc["verdicts"].items() for f, x in v.items() if not x["ok"]]
    print(f"(wall {doc['wall_s']:.0f} s; results {os.path.relpath(out)}; growth limits exceeded: {bad or 'none'})")
    print(json.dumps({"verdicts_failed": bad, "series": {
        k: [{"records": r["records"], "open_clean_ms": round(r["open_clean_s"]["median"] * 1e3, 1),
             "get_cold_p99_us": round(r["get_cold_us"]["p99"]), "rss_mb": round(r["rss_after_gets_mb"])}
            for r in rows] for k, rows in series.items()}}))


if __name__ == "__main__":
    main()
