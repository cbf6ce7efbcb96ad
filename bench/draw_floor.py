"""A floor for requests that draw records at random (issue 16, H77): the fewest blocks/request any online
placement could give the `sessions`-family traces (`sessions`, `heldout`, `heldout_ns`), tighter than
`bench.compaction`'s per-request floor (ceil(live bytes / usable block bytes)), which re-lays every request's
records into one extent and so assumes a placement that knows each request before it comes.

A request of these traces (bench/traces.py, `sessions`) is the requesting session's newest records plus
records of its tenant drawn uniformly at random (a noise request: all drawn). The draw does not depend on
where records sit, so whatever a placement did before the request (any relocation, any GC; no copies), the
drawn records, k distinct of the N records of the tenant the session did not write, touch in expectation

    sum over blocks b of  1 - C(N - n_b, k) / C(N, k)        (n_b: those N records that block b holds)

blocks. That sum is concave in each n_b, and a block holds at most what its usable bytes fit, so it is
smallest when the tenant's smallest records fill the fewest blocks (Karamata: the key counts of that packing,
splitting records across blocks, majorize every real layout's). The floor of a request is the larger of that
expectation and the per-request floor; the figure is its mean over the requests of the trace's second half,
the ones `bench.compaction` measures.

    python -m bench.draw_floor --quick                       # scale 1, seeds 0-2
    python -m bench.draw_floor --full --traces heldout_ns    # scale 4, seeds 0-1

Results: bench/results/draw_floor_quick.json (--quick, the default) or draw_floor.json (--full). Figures
from it: docs/compaction.md, "What the held-out families can gain".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from blockstore.records import BLOCK_HEADER_SIZE

from .common import bench_mode, results_path, standard_args
from .compaction import block_size_of
from .traces import Delete, Put, Request, generate

DRAWN_TRACES = ("sessions", "heldout", "heldout_ns")  # traces of the `sessions` generator


def expected_blocks(counts: Sequence[float], n: int, k: int) -> float:
    """Blocks a uniform k-subset of `n` records touches in expectation, block b holding counts[b] of them
    (a fractional count: the straight line between its two whole neighbours, which keeps the sum concave)."""
    if k <= 0 or n <= 0:
        return 0.0

    def hit(c: int) -> float:  # 1 - C(n - c, k) / C(n, k)
        if n - c < k:
            return 1.0
        return 1.0 - math.exp(math.lgamma(n - c + 1) - math.lgamma(n - c - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1))

    total = 0.0
    for c in counts:
        low = min(n, math.floor(c))
        total += hit(low) + (c - low) * (hit(low + 1) - hit(low)) if c > low else hit(low)
    return total


def densest_counts(sizes: Sequence[int], usable: int) -> list[float]:
    """Records per block when the smallest records fill blocks of `usable` bytes first, a record split where
    a block ends (its share counted in each): no real layout puts more records in its fullest j blocks."""
    out: list[float] = []
    room, count = float(usable), 0.0
    for size in sorted(sizes):
        left = float(size)
        while left > 1e-9:
            take = min(left, room)
            count += take / size
            left -= take
            room -= take
            if room <= 1e-9:
                out.append(count)
                room, count = float(usable), 0.0
    if count > 0:
        out.append(count)
    return out


def _who(put: Put) -> tuple[tuple[str, str], bytes]:
    """A put's tenant (namespace and tenant name) and session: "tenant/session" in one namespace, or the
    session as partition in a namespace per tenant (heldout_ns)."""
    if "/" in put.partition:
        tenant, session = put.partition.split("/", 1)
        return (put.ns, tenant), session.encode()
    return (put.ns, put.ns), put.partition.encode()


def draw_floor(name: str, seed: int, scale: float) -> dict[str, Any]:
    """The per-request floor and the draw floor of one trace, means over its second half's requests."""
    if name not in DRAWN_TRACES:
        raise ValueError(f"{name}: the draw floor knows the requests of {', '.join(DRAWN_TRACES)} only")
    trace = generate(name, seed, scale)
    usable = block_size_of(trace, None) - BLOCK_HEADER_SIZE - 8192
    owner: dict[tuple[str, bytes], tuple[str, str]] = {}
    live: dict[tuple[str, str], dict[bytes, int]] = {}
    ops = trace.ops
    per_request: list[int] = []
    floors: list[float] = []
    drawn_keys: list[int] = []
    for i, op in enumerate(ops):
        if isinstance(op, Put):
            tenant, _session = _who(op)
            for k, n in zip(op.keys, op.sizes):
                live.setdefault(owner.setdefault((op.ns, k), tenant), {})[k] = n
        elif isinstance(op, Delete):
            for k in op.keys:
                if (op.ns, k) in owner:
                    live[owner[(op.ns, k)]].pop(k, None)
        elif isinstance(op, Request) and i >= len(ops) // 2:
            # the requesting session: a step's request is followed by its own puts (bench/traces.py, sessions)
            tenant, session = _who(next(o for o in ops[i + 1:] if isinstance(o, Put) and o.ns == op.ns))
            pool = live.get(tenant, {})
            keys = [k for k in op.keys if k in pool]
            if not keys:
                continue
            drawn = [k for k in keys if k.split(b"/", 1)[0] != session]  # keys are "s<session>/..."
            others = [n for k, n in pool.items() if k.split(b"/", 1)[0] != session]
            one = max(1, -(-sum(pool[k] for k in keys) // usable))
            per_request.append(one)
            floors.append(max(one, expected_blocks(densest_counts(others, usable), len(others), len(drawn))))
            drawn_keys.append(len(drawn))
    return {"requests": len(floors), "floor_per_request": statistics.fmean(per_request),
            "draw_floor": statistics.fmean(floors), "drawn_keys_per_request": statistics.fmean(drawn_keys)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.draw_floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="+", choices=DRAWN_TRACES, default=list(DRAWN_TRACES))
    ap.add_argument("--seeds", nargs="+", type=int, help="default: quick 0 1 2, full 0 1 (bench.compaction's repeats)")
    ap.add_argument("--scale", type=float, help="trace size multiplier (default: quick 1, full 4)")
    standard_args(ap, "draw_floor", default_mode="quick", quick="the quick traces (scale 1)",
                  full="the full-mode traces (scale 4)")
    args = ap.parse_args(argv)
    full = bench_mode(args) == "full"
    scale = args.scale or (4.0 if full else 1.0)
    seeds = args.seeds or ([0, 1] if full else [0, 1, 2])
    cmd = sys.argv[1:] if argv is None else list(argv)
    doc: dict[str, Any] = {"command": " ".join(["python -m bench.draw_floor", *cmd]), "scale": scale,
                           "seeds": seeds, "traces": {}}
    for name in args.traces:
        doc["traces"][name] = {str(s): draw_floor(name, s, scale) for s in seeds}
        for s, r in doc["traces"][name].items():
            print(f"{name} seed {s} scale {scale:g}: {r['requests']} requests, floor per request "
                  f"{r['floor_per_request']:.3f}, draw floor {r['draw_floor']:.3f} blocks "
                  f"({r['drawn_keys_per_request']:.2f} keys drawn a request)")
    with open(results_path(args, "draw_floor"), "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({"traces": {n: {s: round(r["draw_floor"], 3) for s, r in v.items()} for n, v in doc["traces"].items()}}))


if __name__ == "__main__":
    main()
