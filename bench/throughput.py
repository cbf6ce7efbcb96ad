"""Throughput of blockstore for 1 MiB KV records, as ratios to raw ceilings of the same disk.

Every repeat measures, on a fresh directory and with the same payload bytes:

  raw ceilings    (a) pwritev of N x 1 MiB into one file, no sync
                  (b) the same in 32 MiB batches, each followed by fdatasync
                  (c) warm sequential preadv into page-aligned buffers, with and without xxh3 per MiB
                  (d) cold sequential preadv after posix_fadvise(DONTNEED)
                  and, as a diagnostic, the store's own block files read cold the same way
  blockstore      put_many (cache mode, then sync mode), warm and cold get_many into page-aligned
                  buffers, 64 records per call; the same put and warm get on the pure-Python backend

Each store figure is paired with its ceiling from the same repeat (put/cache vs a, put/sync vs b,
warm get vs c with xxh3, cold get vs d), measured in the order ceiling, store, store, ceiling;
medians and spreads are taken over the per-repeat ratios. The ceilings and Settle are bench/ceilings.py's
(lmcache_peer and gpu_path measure theirs with the same functions).
Writes the full results to bench/results/throughput.json (--quick: throughput_quick.json); the last
line of stdout is a one-line JSON summary of the ratios.

    python -m bench.throughput            # 1000 records (~1 GiB), 5 repeats
    python -m bench.throughput --quick    # 256 records, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import blockstore
from bench.ceilings import (
    BATCH,
    DURABLE_BATCH,
    POOL,
    RECORD,
    Payloads,
    Settle,
    raw_read,
    raw_write,
    read_files_cold,
    time_batches,
)
from bench.common import (
    REPO,
    cpu_busy_s,
    engine_state,
    keys_for,
    machine_info,
    results_path,
    spread,
    standard_args,
    write_json,
)
from blockstore.reader import aligned_buffer

TARGET = 0.85
DEFAULT_DIR = os.path.join(REPO, "bench", ".scratch")

# (store figure, ceiling figure) whose per-repeat quotient is a target ratio
RATIOS = {
    "put_cache_vs_write": ("store_put_cache", "raw_write"),
    "put_sync_vs_durable_write": ("store_put_sync", "raw_durable_write"),
    "warm_get_vs_read_xxh3": ("store_get_warm", "raw_read_warm_xxh3"),
    "cold_get_vs_cold_read": ("store_get_cold", "raw_read_cold"),
}
# no target: how much of the cold-read gap is the layout (block files) rather than the read path
DIAGNOSTICS = {
    "store_files_cold_read_vs_cold_read": ("raw_read_cold_store_files", "raw_read_cold"),
    "cold_get_vs_store_files_cold_read": ("store_get_cold", "raw_read_cold_store_files"),
}
# what the C core buys: native figure / pure-Python figure
SPEEDUPS = {
    "put_cache_native_vs_python": ("store_put_cache", "python_put_cache"),
    "warm_get_native_vs_python": ("store_get_warm", "python_get_warm"),
}


# ---------------------------------------------------------------------------- blockstore


def store_put(path: str, payloads: Payloads, keys: list[bytes], durability: str, backend: str) -> dict[str, Any]:
    """Time the put_many calls only; close() (seal blocks, flush the directory) is timed apart."""
    store = blockstore.open(path, durability=durability, backend=backend)
    try:
        put = time_batches(len(keys), BATCH, lambda r: store.put_many([(keys[i], payloads[i]) for i in r]))
        stats = store.stats().as_dict()
    finally:
        t0 = time.perf_counter()
        store.close()
        close = time.perf_counter() - t0
    return {"put_s": put, "close_s": close, "stats": stats}


def store_get(path: str, keys: list[bytes], dst: list[memoryview], backend: str, *, cold: bool) -> float:
    """Batched get_many into caller-owned page-aligned buffers (the zero-copy path), warm or cold."""
    with blockstore.open(path, backend=backend) as store:
        if cold:
            store.drop_page_cache()
        else:
            first = keys[:BATCH]  # first call: directory and descriptor caches
            store.get_many(first, out=dst[: len(first)])

        def get(r: range) -> None:
            got = store.get_many(keys[r.start : r.stop], out=dst[: len(r)])
            if got.count(RECORD) != len(r):
                raise RuntimeError(f"get_many of records {r.start}..{r.stop - 1} returned {got}")

        return time_batches(len(keys), BATCH, get)


def warm_up(read: Callable[[], float]) -> float:
    """Read once untimed (the data was just written, but make sure it is all cached), then time."""
    read()
    return read()


def check_contents(path: str, payloads: Payloads, keys: list[bytes], backend: str) -> None:
    """Untimed: a few records read back equal what was put (a fast wrong answer is no result)."""
    with blockstore.open(path, backend=backend, read_only=True) as store:
        sample = sorted({0, len(keys) // 2, len(keys) - 1})
        for i, view in zip(sample, store.get_many([keys[i] for i in sample])):
            if view is None or view != payloads[i]:
                raise RuntimeError(f"record {i} read back wrong from {path}")


# ---------------------------------------------------------------------------- one repeat


def one_repeat(root: str, payloads: Payloads, n: int, rep: int, skip_python: bool,
               recycle: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """All figures of one repeat in seconds, plus the stores' stats, on a fresh directory that is
    deleted afterwards.

    Each store figure is measured next to its ceiling in the order ceiling, store, store, ceiling
    (ABBA), and each figure is the mean of its two runs: whichever side runs first gains nothing,
    and a linear drift of the shared disk cancels out. (With plain alternation the order showed
    through: the cold read that ran first was up to 1.7x faster, raw or store alike.)"""
    work = tempfile.mkdtemp(prefix=f"rep{rep}-", dir=root)
    raw, raw_durable = os.path.join(work, "raw.bin"), os.path.join(work, "raw-durable.bin")
    native, native_sync, python = (os.path.join(work, d) for d in ("native", "native-sync", "python"))
    keys = keys_for(n)
    dst = [aligned_buffer(RECORD) for _ in range(BATCH)]  # reused by every read: caller-owned memory
    settle = Settle(work, payloads, n, recycle)
    seconds: dict[str, list[float]] = {}
    stats: dict[str, Any] = {}

    def record(name: str, secs: float) -> None:
        seconds.setdefault(name, []).append(secs)

    def abba(ceiling: Callable[[], None], store: Callable[[], None], *, writes: bool) -> None:
        for phase in (ceiling, store, store, ceiling):
            settle(writes)
            phase()

    def put(name: str, path: str, durability: str, backend: str) -> Callable[[], None]:
        def phase() -> None:
            shutil.rmtree(path, ignore_errors=True)  # the second run of a pair starts fresh too
            r = store_put(path, payloads, keys, durability, backend)
            record(name, r["put_s"])
            record(name + "_close", r["close_s"])
            stats[name] = r["stats"]
        return phase

    def raw_plain_write() -> None:
        record("raw_write", raw_write(raw, payloads, n, durable=False))

    def raw_durable_write() -> None:
        record("raw_durable_write", raw_write(raw_durable, payloads, n, durable=True))

    def raw_warm_reads() -> None:
        record("raw_read_warm", warm_up(lambda: raw_read(raw, n, dst, cold=False, verify=False)))
        record("raw_read_warm_xxh3", raw_read(raw, n, dst, cold=False, verify=True))

    def raw_cold_reads() -> None:
        record("raw_read_cold", raw_read(raw, n, dst, cold=True, verify=False))
        blocks = os.path.join(native, "blocks")
        files = sorted(os.path.join(blocks, f) for f in os.listdir(blocks))  # in block-id (= write) order
        record("raw_read_cold_store_files", read_files_cold(files, dst))

    def get_warm(name: str, path: str, backend: str) -> Callable[[], None]:
        def phase() -> None:
            record(name, warm_up(lambda: store_get(path, keys, dst, backend, cold=False)))
        return phase

    def get_cold() -> None:
        record("store_get_cold", store_get(native, keys, dst, "native", cold=True))

    try:
        abba(raw_plain_write, put("store_put_cache", native, "cache", "native"), writes=True)
        abba(raw_warm_reads, get_warm("store_get_warm", native, "native"), writes=False)
        abba(raw_cold_reads, get_cold, writes=False)
        check_contents(native, payloads, keys, "native")
        os.unlink(raw)  # keep at most ~2 N MiB on the disk at once
        shutil.rmtree(native)
        abba(raw_durable_write, put("store_put_sync", native_sync, "sync", "native"), writes=True)
        os.unlink(raw_durable)
        shutil.rmtree(native_sync)
        if not skip_python:  # no ceiling to pair with: compared with the native figures above
            settle(writes=True)
            put("python_put_cache", python, "cache", "python")()
            settle(writes=False)
            get_warm("python_get_warm", python, "python")()
            check_contents(python, payloads, keys, "python")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {name: statistics.fmean(v) for name, v in seconds.items()}, stats


# ---------------------------------------------------------------------------- statistics and report


def summarize(runs: list[dict[str, float]], n: int) -> dict[str, Any]:
    nbytes = n * RECORD
    figures: dict[str, Any] = {}
    for name in runs[0]:
        secs = [r[name] for r in runs]
        if name.endswith("_close"):
            figures[name] = {"seconds": spread(secs)}
        else:
            figures[name] = {
                "gb_per_s": spread([nbytes / s / 1e9 for s in secs]),
                "records_per_s": spread([n / s for s in secs]),
                "seconds": spread(secs),
            }
    # a ratio of throughputs is the inverse ratio of times, per repeat
    ratios = {k: spread([r[ceil] / r[fig] for r in runs]) for k, (fig, ceil) in RATIOS.items()}
    for r in ratios.values():
        r["target"] = TARGET
        r["met"] = r["median"] >= TARGET
    speedups = {k: spread([r[slow] / r[fast] for r in runs]) for k, (fast, slow) in SPEEDUPS.items()
                if slow in runs[0]}
    diagnostics = {k: spread([r[ceil] / r[fig] for r in runs]) for k, (fig, ceil) in DIAGNOSTICS.items()}
    return {"figures": figures, "ratios": ratios, "diagnostics": diagnostics, "speedups": speedups}


def table(summary: dict[str, Any]) -> str:
    w = 36  # name column
    lines = [f"{'figure':<{w}}{'median':>8}{'min':>8}{'max':>8}{'IQR':>8}{'rec/s':>8}   (GB/s)"]
    for name, f in summary["figures"].items():
        if "gb_per_s" in f:
            g = f["gb_per_s"]
            lines.append(f"{name:<{w}}{g['median']:>8.2f}{g['min']:>8.2f}{g['max']:>8.2f}{g['iqr']:>8.2f}"
                         f"{f['records_per_s']['median']:>8.0f}")
    for name, f in summary["figures"].items():
        if "gb_per_s" not in f:
            s = {k: v * 1e3 for k, v in f["seconds"].items() if k != "values"}
            lines.append(f"{name:<{w}}{s['median']:>8.1f}{s['min']:>8.1f}{s['max']:>8.1f}{s['iqr']:>8.1f}"
                         f"{'':>8}   (ms)")
    lines.append("")
    lines.append(f"{'ratio':<{w}}{'median':>8}{'min':>8}{'max':>8}{'IQR':>8}   target")
    for name, r in summary["ratios"].items():
        verdict = "met" if r["met"] else "NOT met"
        lines.append(f"{name:<{w}}{r['median']:>8.3f}{r['min']:>8.3f}{r['max']:>8.3f}{r['iqr']:>8.3f}"
                     f"   >= {TARGET} {verdict}")
    for name, r in {**summary["diagnostics"], **summary["speedups"]}.items():
        lines.append(f"{name:<{w}}{r['median']:>8.3f}{r['min']:>8.3f}{r['max']:>8.3f}{r['iqr']:>8.3f}"
                     f"   {'(diagnostic)' if name in summary['diagnostics'] else '(speedup)'}")
    return "\n".join(lines)


# (label, store figure, ceiling figure, ratio) of the plot and the summary table
PAIRS = [
    ("put, cache mode", "store_put_cache", "raw_write (a)", "raw_write", "put_cache_vs_write"),
    ("put, sync mode", "store_put_sync", "raw_durable_write (b)", "raw_durable_write", "put_sync_vs_durable_write"),
    ("warm get", "store_get_warm", "raw_read_warm_xxh3 (c)", "raw_read_warm_xxh3", "warm_get_vs_read_xxh3"),
    ("cold get", "store_get_cold", "raw_read_cold (d)", "raw_read_cold", "cold_get_vs_cold_read"),
]


def plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """throughput[_quick]_vs_ceiling.png: each store figure next to its ceiling (median GB/s, min-max bars),
    and the per-repeat ratios against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import png_path

    figs = doc["figures"]
    pairs = [p for p in PAIRS if p[1] in figs and p[3] in figs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    w = 0.38
    for k, (side, color, dx) in enumerate((("ceiling", "#9e9e9e", -w / 2), ("blockstore", "#1f77b4", w / 2))):
        names = [p[3] if side == "ceiling" else p[1] for p in pairs]
        g = [figs[n]["gb_per_s"] for n in names]
        med = [x["median"] for x in g]
        err = [[m - x["min"] for m, x in zip(med, g)], [x["max"] - m for m, x in zip(med, g)]]
        bars = ax.bar([i + dx for i in range(len(pairs))], med, w, yerr=err, capsize=4, color=color,
                      label="raw-disk ceiling (same run)" if k == 0 else "blockstore")
        ax.bar_label(bars, labels=[f"{m:.2f}" for m in med], fontsize=7, label_type="center", color="white")
    ax.set_xticks(range(len(pairs)), [f"{p[0]}\nvs {p[2]}" for p in pairs], fontsize=8)
    ax.set_ylabel("GB/s (median; bars: min-max over repeats)")
    ax.set_title("Throughput vs ceiling, 1 MiB records")
    ax.legend(fontsize=8)
    ax.margins(y=0.12)
    ratios = doc["ratios"]
    keys = [p[4] for p in pairs if p[4] in ratios]
    med = [ratios[k]["median"] for k in keys]
    err = [[m - ratios[k]["min"] for m, k in zip(med, keys)], [ratios[k]["max"] - m for m, k in zip(med, keys)]]
    colors = ["#2ca02c" if ratios[k].get("met") else "#d62728" for k in keys]
    bars = ax2.bar(range(len(keys)), med, 0.6, yerr=err, capsize=4, color=colors)
    ax2.bar_label(bars, labels=[f"{m:.2f}" for m in med], fontsize=7, label_type="center", color="white")
    target = ratios[keys[0]].get("target", TARGET) if keys else TARGET
    ax2.axhline(target, color="black", ls="--", lw=0.8, label=f"target {target}")
    ax2.set_xticks(range(len(keys)), [k.replace("_vs_", "\nvs ") for k in keys], fontsize=8)
    ax2.set_ylabel("store / ceiling (median, min-max)")
    ax2.set_title("Ratio per repeat (green: target met)")
    ax2.legend(fontsize=8)
    ax2.margins(y=0.12)
    cfg = doc.get("config", {})
    fig.suptitle(f"bench.throughput: {cfg.get('records')} records x {cfg.get('repeats')} repeats", fontsize=9)
    path = png_path(doc, out_dir, "vs_ceiling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def summary_markdown(doc: dict[str, Any]) -> str:
    """Store figures next to their ceilings and the target ratios; then the machine and the command."""
    from bench.report import fmt, machine_line, md_table, reproduce_line

    figs, ratios = doc["figures"], doc["ratios"]

    def gb(name: str) -> str:
        g = figs.get(name, {}).get("gb_per_s")
        return f"{g['median']:.2f} ({g['min']:.2f} – {g['max']:.2f})" if g else "–"

    rows = []
    for label, store, _ceil_label, ceil, ratio in PAIRS:
        r = ratios.get(ratio)
        if r is None:
            continue
        verdict = "met" if r.get("met") else "**not met**"
        rows.append([f"{label}: `{store}`", gb(store), f"`{ceil}`", gb(ceil),
                     f"**{r['median']:.3f}** ({r['min']:.3f} – {r['max']:.3f})", f"≥ {r.get('target', TARGET)}: {verdict}"])
    out = [md_table(["figure", "GB/s median (min – max)", "ceiling", "GB/s median (min – max)",
                     "ratio median (min – max)", "target"], rows)]
    extra = [f"`{k}` {fmt(v['median'], 3)}" for k, v in doc.get("diagnostics", {}).items()]
    extra += [f"`{k}` {fmt(v['median'], 2)}×" for k, v in doc.get("speedups", {}).items()]
    close = [f"`{k}` {v['seconds']['median'] * 1e3:.0f} ms" for k, v in figs.items() if k.endswith("_close")]
    cfg = doc.get("config", {})
    out.append(f"{cfg.get('records')} records × 1 MiB, {cfg.get('repeats')} repeats, ratios per repeat (GB/s: 10^9 "
               f"bytes of payload per second). Diagnostics and speedups: {', '.join(extra) or 'none'}. "
               f"close(): {', '.join(close) or '–'}.")
    out.append(machine_line(doc))
    out.append(reproduce_line(doc))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "throughput", quick="256 records and 3 repeats (explicit flags still win)",
                  full="1000 records and 5 repeats", dir_default=DEFAULT_DIR, dir_help="(default bench/.scratch)")
    ap.add_argument("--records", type=int, help="number of 1 MiB records (default 1000, --quick 256)")
    ap.add_argument("--repeats", type=int, help="repeats, each on a fresh directory (default 5, --quick 3)")
    ap.add_argument("--skip-python", action="store_true", help="leave out the pure-Python backend figures")
    ap.add_argument("--no-recycle", action="store_true",
                    help="no ballast file before write phases (figures then depend on the VM's memory backing)")
    args = ap.parse_args(argv)
    args.json = results_path(args, "throughput")
    args.records = args.records or (256 if args.quick else 1000)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.records < 1 or args.repeats < 1:
        ap.error("--records and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    need = 4 * args.records * RECORD  # at most two copies of the data and a ballast at once, plus slack
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(f"{args.dir}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f} GiB")
    load = os.getloadavg()[0]
    if load > 0.5:  # on 2 cores another busy process moves every figure: say so where it is seen
        print(f"warning: load average {load:.2f} at start; figures will be noisy", file=sys.stderr)
    engine = engine_state()  # now: the code measured is what was imported at start
    machine = machine_info(args.dir)
    busy0, own0 = cpu_busy_s()
    root = tempfile.mkdtemp(prefix="throughput-", dir=args.dir)
    payloads = Payloads()
    runs: list[dict[str, float]] = []
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        for rep in range(args.repeats):
            times, stats = one_repeat(root, payloads, args.records, rep, args.skip_python, not args.no_recycle)
            runs.append(times)
            print(f"repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    busy1, own1 = cpu_busy_s()
    summary = summarize(runs, args.records)
    doc = {
        "benchmark": "throughput",
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "config": {"mode": "quick" if args.quick else "full",
                   "records": args.records, "record_bytes": RECORD, "repeats": args.repeats,
                   "recycle_memory": not args.no_recycle, "batch_records": BATCH,
                   "durable_batch_records": DURABLE_BATCH, "payload_pool": POOL,
                   "pair_order": "ceiling, store, store, ceiling; each figure the mean time of its two runs",
                   "gb": "1e9 bytes of payload (store files hold 4 KiB more per record: header page)"},
        # CPU others used meanwhile (kernel writeback for this run included): on 2 cores, the noise
        "machine": {**machine, "loadavg_at_start": load,
                    "cpu_s_not_this_process": round((busy1 - busy0) - (own1 - own0), 1)},
        "engine": engine,
        "wall_s": round(time.perf_counter() - t0, 1),
        **summary,
        "store_stats_last_repeat": stats,
        "runs_seconds": runs,
    }
    write_json(args.json, doc)
    print(table(summary))
    print(f"(full results: {os.path.relpath(args.json)})")
    print(json.dumps({
        "benchmark": "throughput", "records": args.records, "repeats": args.repeats,
        "ratios": {k: round(v["median"], 3) for k, v in summary["ratios"].items()},
        "targets_met": {k: v["met"] for k, v in summary["ratios"].items()},
        "speedups": {k: round(v["median"], 2) for k, v in summary["speedups"].items()},
    }))


if __name__ == "__main__":
    main()
