"""GC throughput, unpaced: MB of live records GC copies per second of a compaction pass (issue 16: >= 50 MB/s).

A store is filled through the public API the way the issue's independent workload did: `--partitions`
partitions written at once (round-robin, one put_many each), chunk-sized records of 2-64 KiB and
KV-sized records of 256 KiB-1 MiB, then `--overwrite` of the keys rewritten and `--delete` deleted (tombstones), so most sealed blocks
pass the GC threshold. Then `Compactor.run_until_idle()` (GC only, no budget, no pacing) is timed;
the figure is GC bytes copied / seconds. Repeated `--repeats` times on fresh stores: median and spread.

    python -m bench.gc_speed                      # 120 MB, 380 partitions, 4 MiB blocks, 3 repeats
    python -m bench.gc_speed --quick              # 30 MB, 3 repeats (bench/results/gc_speed_quick.json)
    python -m bench.gc_speed --profile            # plus the top of a cProfile of one pass
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import blockstore
from blockstore.compaction import Compactor, resolve

from .common import REPO, engine_state, machine_info, results_path, spread, standard_args, write_json

MiB = 1 << 20
KiB = 1 << 10


def fill(path: str, *, total: int, partitions: int, block_size: int, overwrite: float, delete: float,
         seed: int) -> blockstore.Store:
    rng = random.Random(seed)
    s = blockstore.open(path, block_size=block_size, durability="cache")
    sizes: dict[bytes, tuple[str, int]] = {}
    written = 0
    i = 0
    payload = os.urandom(MiB)
    while written < total:
        part = f"p{i % partitions}"
        size = rng.randint(2 * KiB, 64 * KiB) if rng.random() < 0.7 else rng.randint(256 * KiB, MiB)
        key = b"k%09d" % i
        s.put_many([(key, memoryview(payload)[:size])], partition=part)
        sizes[key] = (part, size)
        written += size
        i += 1
    for key in rng.sample(sorted(sizes), int(len(sizes) * overwrite)):
        part, size = sizes[key]
        s.put_many([(key, memoryview(payload)[:size])], partition=part)
    doomed = rng.sample(sorted(sizes), int(len(sizes) * delete))
    for at in range(0, len(doomed), 4):  # tombstones: GC carries or drops them (the min-seq check)
        s.delete_many(doomed[at:at + 4])
    return s


def measure(args: argparse.Namespace, root: str, rep: int, profile: bool) -> dict[str, Any]:
    path = os.path.join(root, f"gc{rep}")
    shutil.rmtree(path, ignore_errors=True)
    s = fill(path, total=args.mb * MiB, partitions=args.partitions, block_size=args.block_size,
             overwrite=args.overwrite, delete=args.delete, seed=args.seed + rep)
    try:
        blocks_before = len(s.block_table())
        policy = resolve({"policy": "full", "relocation": False, "gc_budget": float("inf")})
        c = Compactor(s, policy)
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        done = c.run_until_idle()
        if prof is not None:
            prof.disable()
        dt = time.perf_counter() - t0
        c.stop()
        if prof is not None:
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        return {"gc_mb": done.gc_bytes / 1e6, "seconds": dt, "gc_mb_s": done.gc_bytes / 1e6 / dt,
                "victims": done.gc_blocks, "reclaimed": done.reclaimed_blocks, "blocks_before": blocks_before,
                "blocks_after": len(s.block_table())}
    finally:
        s.close()
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gc_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "gc_speed", quick="30 MB per repeat", full="120 MB per repeat")
    ap.add_argument("--mb", type=int, help="MB put before the overwrites (default 120, --quick 30)")
    ap.add_argument("--partitions", type=int, default=380)
    ap.add_argument("--block-size", type=int, default=4 * MiB)
    ap.add_argument("--overwrite", type=float, default=0.6, help="share of the keys rewritten")
    ap.add_argument("--delete", type=float, default=0.1, help="share of the keys deleted")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="cProfile the first repeat's GC (stderr)")
    args = ap.parse_args(argv)
    args.mb = args.mb or (30 if args.quick else 120)
    out = results_path(args, "gc_speed")
    root = args.dir or tempfile.mkdtemp(prefix="gc_speed")
    os.makedirs(root, exist_ok=True)
    runs = [measure(args, root, r, args.profile and r == 0) for r in range(args.repeats)]
    for r in runs:
        print(f"GC {r['gc_mb']:.1f} MB in {r['seconds']:.2f} s = {r['gc_mb_s']:.1f} MB/s "
              f"({r['victims']} victims, {r['blocks_before']} -> {r['blocks_after']} blocks)")
    rates = spread([r["gc_mb_s"] for r in runs])
    print(f"GC MB/s median {rates['median']:.1f} (min {rates['min']:.1f}, max {rates['max']:.1f})")
    cmd = "python -m bench.gc_speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"reproduce: {cmd}")
    doc = {"runs": runs, "gc_mb_s": rates, "args": vars(args), "machine": machine_info(root), "engine": engine_state(),
           "command": cmd}
    write_json(out, doc)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"gc_mb_s": rates["median"], "results": os.path.relpath(out, REPO)}))


if __name__ == "__main__":
    main()
