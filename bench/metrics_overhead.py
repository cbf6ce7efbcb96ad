"""What the metrics cost the hot path (issue 17): small puts and gets through a Store whose put/get/delete
are plain (the baseline), instrumented by `metrics.instrument` with metrics off (what every store pays),
and with metrics on (a process serving /metrics), in the same run, rounds alternating the order;
plus the time one scrape of a store takes. Small records (128 B) make the per-call cost as visible as it
can be; a 1 MiB KV record costs hundreds of microseconds, next to which none of this shows.

    python -m bench.metrics_overhead --quick          # 3 rounds of 3000 ops per kind (metrics_overhead_quick.json)
    python -m bench.metrics_overhead                  # full: 7 rounds of 20000 ops per kind (metrics_overhead.json)
    python -m bench.metrics_overhead --rounds 11 --ops 50000 --json PATH   # longer, elsewhere

Prints ns per operation (median and spread over rounds) and the ratios to the baseline of the same round;
its one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

from prometheus_client import generate_latest

from blockstore import metrics
from blockstore.store import Store

from .common import engine_state, machine_info, results_path, spread, standard_args, write_json

VALUE = b"v" * 128
BATCH = 32


metrics.instrument(Store)  # as tracking a store does: Store itself is the "off" and "on" variant


class PlainStore(Store):
    """The baseline: Store's put/get/delete as they are without metrics."""

    put_many = metrics.plain_method(Store, "put_many")
    get_many = metrics.plain_method(Store, "get_many")
    delete_many = metrics.plain_method(Store, "delete_many")


VARIANTS: dict[str, tuple[type[Store], bool]] = {"baseline": (PlainStore, False), "off": (Store, False),
                                                 "on": (Store, True)}


def one_round(scratch: str, variant: str, n: int) -> dict[str, float]:
    """ns per operation of each kind for one variant on a fresh store."""
    cls, on = VARIANTS[variant]
    (metrics.enable if on else metrics.disable)()
    path = os.path.join(scratch, variant)
    keys = [b"k%09d" % i for i in range(n)]
    out: dict[str, float] = {}
    with cls(path, durability="cache") as s:
        t = time.perf_counter()
        for k in keys:
            s.put(k, VALUE)
        out["put"] = (time.perf_counter() - t) / n * 1e9
        t = time.perf_counter()
        for k in keys:
            s.get(k)
        out["get"] = (time.perf_counter() - t) / n * 1e9
        t = time.perf_counter()
        for i in range(0, n, BATCH):
            s.get_many(keys[i:i + BATCH])
        out["get_many_32"] = (time.perf_counter() - t) / (n // BATCH) * 1e9
    metrics.disable()
    shutil.rmtree(path)
    return out


class _Probe:
    """A method that does nothing, plain (bare) and instrumented as Store's are (the cost of that alone)."""

    def bare(self, items: Any) -> Any:
        return [VALUE]

    put_many = bare
    get_many = bare


metrics.instrument(_Probe, {"put_many": "put", "get_many": "get"})


def added_cost(calls: int = 200_000, repeats: int = 7) -> dict[str, Any]:
    """ns instrumentation adds to one call, measured on a method that does nothing (so the noise is not that
    of a store operation): disabled (put), enabled for a put of one key and for a get of one key (a hit).
    The minimum over repeats is the cost itself; the rest is other processes on the cores."""
    probe, one = _Probe(), [b"x"]
    best: dict[str, float] = {}

    def measure(names: list[str]) -> None:  # interleaved, so a busy spell of the machine hits all alike
        for _ in range(repeats):
            for name in names:
                call = operator.methodcaller(name, one)
                t = time.perf_counter()
                for _ in range(calls):
                    call(probe)
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t) / calls * 1e9)

    metrics.disable()
    measure(["bare", "put_many"])
    off = best.pop("put_many") - best["bare"]
    metrics.enable()
    measure(["bare", "put_many", "get_many"])
    metrics.disable()
    return {"off": off, "on_put": best["put_many"] - best["bare"], "on_get": best["get_many"] - best["bare"],
            "bare_call": best["bare"]}


def scrape_cost(scratch: str, n: int, repeats: int) -> dict[str, Any]:
    """Seconds one scrape of REGISTRY takes with one tracked store of n records in 64 KiB blocks."""
    with Store(os.path.join(scratch, "scraped"), block_size=64 << 10) as s:
        for i in range(0, n, BATCH):
            s.put_many([(b"k%09d" % j, VALUE * 8) for j in range(i, min(n, i + BATCH))])
        metrics.track(s)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            generate_latest(metrics.REGISTRY)
            times.append(time.perf_counter() - t)
        blocks = s.stats().blocks
        metrics.untrack(s)
    return {"blocks": blocks, "records": n, "seconds": spread(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.metrics_overhead",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    standard_args(ap, "metrics_overhead", quick="3 rounds of 3000 ops per kind", full="7 rounds of 20000 ops per kind",
                  dir_help="(default: a new folder under the system temp dir)")
    ap.add_argument("--rounds", type=int, help="rounds (default 7, --quick 3)")
    ap.add_argument("--ops", type=int, help="operations per kind and round (default 20000, --quick 3000)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    n = args.ops or (3000 if args.quick else 20000)
    if rounds < 1 or n < 1:
        ap.error("--rounds and --ops must be positive")
    out = results_path(args, "metrics_overhead")
    scratch = tempfile.mkdtemp(prefix="bs-metrics-", dir=args.dir)
    command = "python -m bench.metrics_overhead " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        per: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
        ratios: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS if v != "baseline"}
        names = list(VARIANTS)
        for r in range(rounds):
            order = names[r % 3:] + names[:r % 3]  # each variant goes first, second and third in turn
            got = {v: one_round(scratch, v, n) for v in order}
            for v, ops in got.items():
                for op, ns in ops.items():
                    per[v].setdefault(op, []).append(ns)
                    if v != "baseline":
                        ratios[v].setdefault(op, []).append(ns / got["baseline"][op])
        scraped = scrape_cost(scratch, n, 10)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    doc: dict[str, Any] = {"command": command, "rounds": rounds, "ops_per_kind": n, "value_bytes": len(VALUE),
           "ns_per_op": {v: {op: spread(xs) for op, xs in ops.items()} for v, ops in per.items()},
           "ratio_to_baseline": {v: {op: spread(xs) for op, xs in ops.items()} for v, ops in ratios.items()},
           "scrape": scraped, "added_ns_per_call": added_cost(), "loadavg_after": os.getloadavg(), "machine": machine_info(tempfile.gettempdir()), "engine": engine_state()}
    print(f"# {command}")
    print(f"{'op':<12} {'baseline ns':>12} {'off ns':>10} {'on ns':>10} {'off/base':>22} {'on/base':>22}")
    for op in per["baseline"]:
        def med(v: str, op: str = op) -> float:
            return float(doc["ns_per_op"][v][op]["median"])

        def rat(v: str, op: str = op) -> str:
            s = doc["ratio_to_baseline"][v][op]
            return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"

        print(f"{op:<12} {med('baseline'):>12,.0f} {med('off'):>10,.0f} {med('on'):>10,.0f} {rat('off'):>22} "
              f"{rat('on'):>22}")
    added = doc["added_ns_per_call"]
    print(f"added per call (min of 7 x 200k calls of a no-op): off {added['off']:.0f} ns, on {added['on_put']:.0f} ns "
          f"(put), {added['on_get']:.0f} ns (get of one key)")
    sc = scraped["seconds"]
    print(f"scrape of one store ({scraped['blocks']} blocks): median {sc['median'] * 1e3:.2f} ms "
          f"[{sc['min'] * 1e3:.2f}-{sc['max'] * 1e3:.2f}]")
    write_json(out, doc)
    print(f"load average after: {doc['loadavg_after'][0]:.1f} (cores: {os.cpu_count()}): the end-to-end ratios "
          "of 'off' compare the same code, so their spread is this machine's noise")
    summary = {"bench": "metrics_overhead", "rounds": rounds, "ops_per_kind": n, "scrape_ms": sc["median"] * 1e3,
               **{f"added_ns_{k}": round(v) for k, v in added.items()},
               **{f"{v}/{op}": round(s["median"], 4) for v, ops in doc["ratio_to_baseline"].items()
                  for op, s in ops.items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
