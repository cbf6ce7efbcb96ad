"""Cold get_many: all of a request's blocks in one read call vs one call per block, interleaved on one store.

A trace of `bench/traces.py` is replayed under a compaction policy (`bench.compaction.replay`, kept on
disk); then requests of its second half are read cold (os.sync, `drop_page_cache`, get_many) in three
ways, in rotating order so that neither gains from going first:

    one call     the engine as it is: one `backend.read_files` over every block; the C core announces
                 every block's runs (POSIX_FADV_WILLNEED, neighbours within read_gap merged) before the
                 first read, so the disk has them all in flight at once
    per block    `read_files` replaced by one `read_many` per block (the read path before: each block's
                 runs announced and read before the next block's are announced)
    no announce  one `read_files` with no announcement at all: what announcing buys

Every read is verified against what the store returns warm. Timings are medians over --repeats
rounds; each round's three figures come from the same requests. Reproduce:

    python -m bench.cold_read --quick --traces swe locomo --policies append-only full
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import blockstore

from .common import engine_state, machine_info, results_path, spread, standard_args, write_json
from .compaction import TRACE_BLOCK_SIZE, Payloads, pct, replay
from .traces import Request, generate

MODES = ("one call", "per block", "no announce")


def _reader(backend: Any, mode: str) -> Callable[..., Any]:
    """The read_files the store calls in `mode` (the backend's own for "one call")."""
    real = backend.read_files
    if mode == "per block":
        return lambda files, gap, verify, willneed=False: [backend.read_many(fd, reqs, gap, verify, willneed)
                                                            for fd, reqs in files]
    if mode == "no announce":
        return lambda files, gap, verify, willneed=False: real(files, gap, verify, False)
    return real


def measure(path: str, block_size: int, requests: Sequence[Request], n: int, seed: int) -> dict[str, list[float]]:
    """Cold milliseconds of `n` random requests, each read once in every mode (rotating order)."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    rng = random.Random(seed)
    with blockstore.open(path, block_size=block_size) as s:
        backend = s.backend
        readers = {m: _reader(backend, m) for m in MODES}
        try:
            for k in range(n):
                r = requests[rng.randrange(len(requests))]
                want = [bytes(v) if v is not None else None for v in s.get_many(r.keys, ns=r.ns)]
                for mode in MODES[k % 3:] + MODES[: k % 3]:
                    backend.read_files = readers[mode]  # type: ignore[method-assign]
                    os.sync()
                    s.drop_page_cache()
                    t0 = time.perf_counter()
                    got = s.get_many(r.keys, ns=r.ns)
                    times[mode].append((time.perf_counter() - t0) * 1e3)
                    if [bytes(v) if v is not None else None for v in got] != want:
                        raise RuntimeError(f"{mode}: a cold read returned other bytes than a warm one")
        finally:
            backend.__dict__.pop("read_files", None)  # the instance attribute set above
    return times


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "cold_read", default_mode="quick", quick="120 requests a round, 3 rounds",
                  full="240 requests a round, 5 rounds, traces at 4x")
    ap.add_argument("--traces", nargs="+", default=["swe", "locomo"])
    ap.add_argument("--policies", nargs="+", default=["append-only", "full"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    full = bool(args.full)
    n, rounds, scale = (240, 5, 4.0) if full else (120, 3, 1.0)
    scratch = args.dir or tempfile.mkdtemp(prefix="cold-read-")
    os.makedirs(scratch, exist_ok=True)
    results: dict[str, Any] = {}
    root = tempfile.mkdtemp(prefix="cold-read-", dir=scratch)
    try:
        for name in args.traces:
            trace = generate(name, args.seed, scale)
            bs = TRACE_BLOCK_SIZE[name]
            payloads = Payloads(args.seed, trace.summary()["max_record_bytes"])
            half = len(trace.ops) // 2
            requests = [o for i, o in enumerate(trace.ops) if isinstance(o, Request) and i >= half]
            for pol in args.policies:
                cell = replay(trace, pol, block_size=bs, root=root, payloads=payloads, passes=40, cold_samples=0,
                              keep=True)
                per_round: dict[str, dict[str, list[float]]] = {m: {"p50": [], "p95": [], "mean": []} for m in MODES}
                for r in range(rounds):
                    times = measure(cell["path"], bs, requests, n, args.seed * 1000 + r)
                    for m, v in times.items():
                        per_round[m]["p50"].append(pct(v, 50))
                        per_round[m]["p95"].append(pct(v, 95))
                        per_round[m]["mean"].append(statistics.fmean(v))
                shutil.rmtree(cell["path"], ignore_errors=True)
                out = {m: {q: spread(vals) for q, vals in d.items()} for m, d in per_round.items()}
                results.setdefault(name, {})[pol] = out
                base = out["per block"]["p50"]["median"]
                print(f"{name}/{pol}: cold get_many ms, median over {rounds} rounds of {n} requests [min-max]", file=sys.stderr)
                for m in MODES:
                    p50, p95 = out[m]["p50"], out[m]["p95"]
                    print(f"  {m:<12} p50 {p50['median']:.3f} [{p50['min']:.3f}-{p50['max']:.3f}]  "
                          f"p95 {p95['median']:.3f} [{p95['min']:.3f}-{p95['max']:.3f}]  "
                          f"p50 / per block {p50['median'] / base:.2f}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    doc = {"benchmark": "cold_read", "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
           "config": {"mode": "full" if full else "quick", "requests": n, "rounds": rounds, "scale": scale,
                      "seed": args.seed, "modes": list(MODES)},
           "machine": machine_info(scratch), "engine": engine_state(), "results": results}
    path = results_path(args, "cold_read")
    write_json(path, doc)
    print(f"results: {os.path.relpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
