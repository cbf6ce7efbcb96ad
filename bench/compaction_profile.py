"""Where a trace's blocks/request comes from, request by request (issue 16, H75): what separates a policy's
figure from the floor (the offline lower bound of `bench.compaction`).

Replays one trace under one policy as `bench.compaction.replay` does (same store options, same passes) and,
for every request of the measured (second) half, splits the blocks its live records sit in:

- blocks holding only records no earlier request read (placement alone put them there: relocation cannot
  have seen them), and the blocks of records read before, beside those records' own floor;
- the relocation clusters (`clusters.py`, as the last pass built them) those records belong to, the blocks
  beyond one per cluster (a cluster spread: not due, not worth it to the shadow, or over budget), and the
  records in no cluster;
- how often the request's exact key set was seen before (recurrence: what the tracker's groups count);
- for partitions named as paths ("tenant/session"), blocks/request by the live bytes the request's parent
  (its first key's writer's parent) held at the time, in blocks: a request drawing at random from a pool
  bigger than a block has a floor the per-request one does not show.

    python -m bench.compaction_profile --traces swe sessions webarena            # quick, seed 0, full
    python -m bench.compaction_profile --full --traces sessions --policy semantic-only --seed 1

Results: bench/results/compaction_profile_quick.json (--quick, the default) or compaction_profile.json (--full).

Figures from it: docs/compaction.md, "Placement by a partition's parent".
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import blockstore
from blockstore.compaction import attach, resolve
from blockstore.keys import SPACE_KV, key_suffix
from blockstore.reader import choose_places
from blockstore.records import BLOCK_HEADER_SIZE

from .common import bench_mode, results_path, standard_args
from .compaction import Payloads, Verifier, block_size_of, open_options, policy_spec
from .traces import GENERATORS, Delete, Put, generate

POOL_BINS = ((0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, float("inf")))  # a parent's live bytes, in blocks


def _parent(partition: str | None) -> str | None:
    if not partition or "/" not in partition:
        return None
    return partition.rsplit("/", 1)[0] or None


def profile(name: str, seed: int, scale: float, policy_name: str, passes: int = 40, root_dir: str | None = None) -> dict[str, Any]:
    """One replay's per-request split (means over the measured requests) and the compactor's totals; the
    store lives in a new folder under `root_dir` (default: the system's temporary folder)."""
    trace = generate(name, seed, scale)
    bs = block_size_of(trace, None)
    usable = bs - BLOCK_HEADER_SIZE - 8192
    policy = resolve(policy_spec(policy_name))
    verify = Verifier(Payloads(seed, trace.summary()["max_record_bytes"]))
    root = tempfile.mkdtemp(prefix=f"profile-{name}-", dir=root_dir)
    ops = trace.ops
    half, every = len(ops) // 2, max(1, len(ops) // passes)
    readers: Counter[tuple[str, bytes]] = Counter()  # requests that read each record so far
    seen_sets: Counter[frozenset[bytes]] = Counter()
    parent_of: dict[tuple[str, bytes], str] = {}
    size: dict[tuple[str, bytes], int] = {}
    pool: Counter[str] = Counter()  # live bytes per parent
    sums: Counter[str] = Counter()
    by_pool: dict[int, list[int]] = defaultdict(list)
    recur: dict[int, list[int]] = defaultdict(list)
    try:
        store = blockstore.open(root, block_size=bs, durability="cache", **open_options(None))
        comp = attach(store, policy, background=False)
        for i, op in enumerate(ops):
            if i and i % every == 0:
                comp.run_pass()
            if isinstance(op, Put):
                par = _parent(op.partition)
                for k, n in zip(op.keys, op.sizes):
                    key = (op.ns, k)
                    if key in parent_of:
                        pool[parent_of[key]] -= size[key]
                    if par is not None:
                        parent_of.setdefault(key, par)
                    size[key] = n
                    if key in parent_of:
                        pool[parent_of[key]] += n
                store.put_many(verify.items(op), ns=op.ns, partition=op.partition if policy.partitioned else None)
                continue
            if isinstance(op, Delete):
                for k in op.keys:
                    if (op.ns, k) in parent_of:
                        pool[parent_of[(op.ns, k)]] -= size[(op.ns, k)]
                store.delete_many(op.keys, ns=op.ns)
                verify.delete(op)
                continue
            locs = store.locate_many(op.keys, ns=op.ns)
            live = [(k, loc) for k, loc in zip(op.keys, choose_places(locs)) if loc is not None]
            sig = frozenset(k for k, _loc in live)
            if i >= half and live:
                _split(store, comp, op.ns, live, readers, usable, sums)
                nb = len({loc.block_id for _k, loc in live})
                recur[min(seen_sets[sig], 3)].append(nb)
                first = parent_of.get((op.ns, live[0][0]))
                if first is not None:
                    blocks = pool[first] / usable
                    by_pool[next(j for j, (lo, hi) in enumerate(POOL_BINS) if lo <= blocks < hi)].append(nb)
            seen_sets[sig] += 1
            for k, _loc in live:
                readers[(op.ns, k)] += 1
            verify.check(op, store.get_many(op.keys, ns=op.ns), f"{name}/{policy_name} op {i}")
        comp.run_pass()
        totals = comp.totals.as_dict()
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = max(1, sums["requests"])
    out: dict[str, Any] = {k: v / n for k, v in sums.items() if k != "requests"}
    out["requests"] = sums["requests"]
    out["key_set_seen_before"] = {f"{j}{'+' if j == 3 else ''}": (len(v), statistics.fmean(v)) for j, v in sorted(recur.items())}
    out["by_parent_pool_blocks"] = {f"{POOL_BINS[j][0]:g}-{POOL_BINS[j][1]:g}": (len(v), statistics.fmean(v))
                                    for j, v in sorted(by_pool.items())}
    out["compaction"] = {k: totals[k] for k in ("relocated_groups", "relocated_bytes", "gc_bytes", "skipped_budget",
                                                "skipped_shadow")}
    return out


def _split(store: blockstore.Store, comp: Any, ns: str, live: Sequence[tuple[bytes, Any]],
           readers: Counter[tuple[str, bytes]], usable: int, sums: Counter[str]) -> None:
    """One measured request's blocks, split as the module docstring says, added to `sums`."""
    nid = store.namespace_id(ns)
    cluster_of = {k: c for c, (_gid, keys) in enumerate(comp._clusters) for k in keys}  # noqa: SLF001  (a bench reads the last build)
    before = [(k, loc) for k, loc in live if readers[(ns, k)]]
    b_before = {loc.block_id for _k, loc in before}
    per: dict[int, set[int]] = defaultdict(set)
    loose = 0
    for k, loc in before:
        c = cluster_of.get(key_suffix(nid, SPACE_KV, k)) if nid is not None else None
        if c is None:
            loose += 1
        else:
            per[c].add(loc.block_id)
    sums["requests"] += 1
    sums["blocks"] += len({loc.block_id for _k, loc in live})
    sums["floor"] += max(1, -(-sum(loc.record_len for _k, loc in live) // usable))
    sums["blocks_only_never_read"] += len({loc.block_id for _k, loc in live} - b_before)
    sums["blocks_read_before"] += len(b_before)
    sums["floor_read_before"] += -(-sum(loc.record_len for _k, loc in before) // usable) if before else 0
    sums["records_read_before"] += len(before)
    sums["records_in_no_cluster"] += loose
    sums["clusters"] += len(per)
    sums["blocks_beyond_one_per_cluster"] += sum(len(b) - 1 for b in per.values())


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.compaction_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="+", choices=list(GENERATORS), default=["swe", "sessions", "webarena"])
    ap.add_argument("--policy", default="full", help="a policy of bench.compaction (NAME or NAME:KNOB=VALUE,...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, help="trace size multiplier (default: quick 1, full 4)")
    standard_args(ap, "compaction_profile", default_mode="quick", quick="the quick traces (scale 1)",
                  full="the full-mode traces (scale 4)")
    args = ap.parse_args(argv)
    scale = args.scale or (4.0 if bench_mode(args) == "full" else 1.0)
    doc: dict[str, Any] = {"seed": args.seed, "scale": scale, "policy": args.policy, "traces": {}}
    for name in args.traces:
        out = doc["traces"][name] = profile(name, args.seed, scale, args.policy, root_dir=args.dir)
        print(f"{name} (seed {args.seed}, scale {scale:g}, {args.policy}): {out['requests']} requests measured")
        for k, v in out.items():
            if k != "requests":
                print(f"  {k:32} {v if isinstance(v, dict) else round(v, 3)}")
    with open(results_path(args, "compaction_profile"), "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({"traces": {n: {k: round(v[k], 3) for k in ("blocks", "floor", "blocks_only_never_read", "clusters",
                                                                  "blocks_beyond_one_per_cluster")}
                                 for n, v in doc["traces"].items()}}))


if __name__ == "__main__":
    main()
