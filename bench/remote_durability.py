"""Remote durability: what a put costs when it returns only once its block is confirmed in the object
store (`durability="remote"`, blockstore/tiering.py), against `sync` (local fsync only) in the same run.

It starts its own SeaweedFS cluster (tests/seaweed_cluster.py). Each repeat runs both modes on fresh
stores, alternating which goes first: T writer threads each put N records of S bytes (one put each, the
way an application acknowledges one write at a time); `remote` runs with a RemoteTier attached
(obstore). Reported per mode: puts/s over the whole run and each put's latency (median, p99); the ratios
are remote ÷ sync, medians of per-repeat ratios with their spread.

What it shows: a remote put waits for its block to be sealed (at most `remote_seal_seconds` after the
wait starts, or sooner when the block fills) and for the block's data and index PUTs; writers that wait
together share one seal and one upload, so throughput grows with the number of writers."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import blockstore
from bench.common import engine_state, machine_info, results_path, spread, standard_args, write_json
from blockstore import hooks
from blockstore.remote import S3Settings, make_object_store
from blockstore.remote.tier import RemoteTier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed_cluster import SeaweedCluster  # type: ignore[import-not-found]  # noqa: E402

BLOCK_SIZE = 4 << 20


def new_settings(cluster: Any) -> S3Settings:
    name = f"b-{uuid.uuid4().hex[:12]}"
    cluster.client().create_bucket(Bucket=name)
    s = cluster.s3_settings()
    return S3Settings(s["endpoint"], name, s["access_key"], s["secret_key"], s["region"])


def run_mode(mode: str, cluster: Any, scratch: str, threads: int, puts: int, size: int,
             seal_s: float) -> dict[str, float]:
    """One mode on a fresh store: puts/s and per-put latency (seconds) across `threads` writers."""
    path = os.path.join(scratch, f"{mode}-{uuid.uuid4().hex[:8]}")
    store = blockstore.open(path, durability=mode, block_size=BLOCK_SIZE, remote_seal_seconds=seal_s)
    tier = RemoteTier(store, make_object_store(new_settings(cluster)), "bench") if mode == "remote" else None
    value = os.urandom(size)
    lat: list[float] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        mine = []
        for i in range(puts):
            t0 = time.perf_counter()
            store.put(b"t%03d-%06d" % (t, i), value)
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    if tier is not None:
        tier.close()
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    lat.sort()
    return {"puts_per_s": threads * puts / elapsed, "latency_median_s": lat[len(lat) // 2],
            "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def breakdown(cluster: Any, scratch: str, puts: int, size: int, seal_s: float) -> dict[str, Any]:
    """One writer, one put at a time: the median milliseconds from a put's call to each step of its way
    (its block sealed, the data PUT done, the index PUT done, the block flagged, the put returned)."""
    marks: dict[str, float] = {}
    steps = ("remote.data_put", "remote.index_put", "remote.flagged")
    callbacks = {step: (lambda _bid, step=step: marks.setdefault(step, time.perf_counter())) for step in steps}
    for step, cb in callbacks.items():
        hooks.register(step, cb)
    path = os.path.join(scratch, f"breakdown-{uuid.uuid4().hex[:8]}")
    store = blockstore.open(path, durability="remote", block_size=BLOCK_SIZE, remote_seal_seconds=seal_s)
    sealed: list[float] = []
    store.add_seal_observer(lambda _bid: sealed.append(time.perf_counter()))
    tier = RemoteTier(store, make_object_store(new_settings(cluster)), "bench")
    value = os.urandom(size)
    rows = []
    try:
        for i in range(puts):
            marks.clear()
            sealed.clear()
            t0 = time.perf_counter()
            store.put(b"b%06d" % i, value)
            t1 = time.perf_counter()
            rows.append([1000 * (x - t0) for x in (sealed[0] if sealed else t1, *(marks.get(s, t1) for s in steps), t1)])
    finally:
        for step, cb in callbacks.items():
            hooks.unregister(step, cb)
        tier.close()
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    rows = rows[min(3, len(rows) - 1):]  # the first puts also open the connections
    names = ("sealed", "data_put_done", "index_put_done", "flagged", "returned")
    return {n: round(spread([r[j] for r in rows])["median"], 2) for j, n in enumerate(names)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote_durability", description=__doc__.split("\n\n")[0])
    standard_args(ap, "remote_durability", quick="4 writers x 20 puts, 3 repeats",
                  full="8 writers x 40 puts, 5 repeats",
                  dir_help="(the stores and the SeaweedFS cluster; default: the system temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="writer threads (default 8, quick 4)")
    ap.add_argument("--puts", type=int, default=None, help="puts per writer (default 40, quick 20)")
    ap.add_argument("--size", type=int, default=64 << 10, help="bytes per record (default 64 KiB)")
    ap.add_argument("--seal-seconds", type=float, default=0.05, help="remote_seal_seconds (default 0.05)")
    ap.add_argument("--repeats", type=int, default=None)
    a = ap.parse_args(argv)
    threads = a.threads or (4 if a.quick else 8)
    puts = a.puts or (20 if a.quick else 40)
    repeats = a.repeats or (3 if a.quick else 5)
    out = results_path(a, "remote_durability")
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-remote-durability-", dir=a.dir)
    cluster = SeaweedCluster(Path(scratch) / "seaweed")
    runs: dict[str, list[dict[str, float]]] = {"sync": [], "remote": []}
    try:
        cluster.start()
        print(f"cluster up in {cluster.startup_s:.1f} s", flush=True)
        steps_ms = breakdown(cluster, scratch, 10 if a.quick else 30, a.size, a.seal_seconds)
        print("one writer, ms after the call:", json.dumps(steps_ms), flush=True)
        for r in range(repeats):
            for mode in (("sync", "remote") if r % 2 == 0 else ("remote", "sync")):
                runs[mode].append(run_mode(mode, cluster, scratch, threads, puts, a.size, a.seal_seconds))
                print(r, mode, json.dumps({k: round(v, 4) for k, v in runs[mode][-1].items()}), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    per_mode = {m: {k: spread([x[k] for x in rs]) for k in rs[0]} for m, rs in runs.items()}
    ratio_runs = {
        "remote_vs_sync_puts_per_s": [rm["puts_per_s"] / sy["puts_per_s"] for rm, sy in zip(runs["remote"], runs["sync"])],
        "remote_vs_sync_latency_median": [rm["latency_median_s"] / sy["latency_median_s"]
                                          for rm, sy in zip(runs["remote"], runs["sync"])],
    }
    ratios = {k: round(spread(v)["median"], 3) for k, v in ratio_runs.items()}
    cmd = "python -m bench.remote_durability" + (" --quick" if a.quick else "")
    for flag, v, default in (("--threads", a.threads, None), ("--puts", a.puts, None), ("--size", a.size, 64 << 10),
                             ("--seal-seconds", a.seal_seconds, 0.05), ("--repeats", a.repeats, None)):
        cmd += "" if v == default else f" {flag} {v}"
    doc = {"ratios": ratios, "one_writer_steps_ms": steps_ms, "ratio_spread": {k: spread(v) for k, v in ratio_runs.items()}, "per_mode": per_mode,
           "threads": threads, "puts_per_thread": puts, "record_bytes": a.size, "block_size": BLOCK_SIZE,
           "remote_seal_seconds": a.seal_seconds, "repeats": repeats, "cluster_startup_s": cluster.startup_s,
           "command": cmd, "argv": shlex.join(sys.argv), "machine": machine_info(a.dir or tempfile.gettempdir()),
           "engine": engine_state()}
    write_json(out, doc)
    print(f"results in {out}; reproduce with: {cmd}")
    print(json.dumps({"ratios": ratios, "remote_put_latency_median_ms":
                      round(1000 * per_mode["remote"]["latency_median_s"]["median"], 1),
                      "results": os.path.relpath(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
