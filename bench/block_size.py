"""How big should a block be? Put throughput of 1 MiB KV records (cache and sync mode) and the
per-block overhead, for several block sizes, in the same run.

Smaller blocks make GC finer-grained (a block is the unit reclaimed) but cost a file creation, a
header, a footer and, in sync mode, a directory fsync each; larger ones amortize that.

    python -m bench.block_size            # 512 records, 3 repeats: bench/results/block_size.json
    python -m bench.block_size --quick    # 64 records, 3 repeats: bench/results/block_size_quick.json
    python -m bench.block_size [--records N] [--repeats R] [--sizes 4,16,64,256] [--dir PATH] [--json PATH]

Prints one line per figure and its one-line JSON summary last.
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
from collections.abc import Sequence

import blockstore
from bench.common import bench_mode, engine_state, machine_info, results_path, spread, standard_args, write_json


def put_rate(block_mib: int, durability: str, records: int, payload: bytes, scratch: str | None) -> float:
    path = tempfile.mkdtemp(prefix="bs-blocksize-", dir=scratch)
    try:
        with blockstore.open(path, durability=durability, block_size=block_mib << 20) as s:
            t = time.perf_counter()
            for i in range(0, records, 32):
                s.put_many([(b"k%d" % j, payload) for j in range(i, min(i + 32, records))])
            elapsed = time.perf_counter() - t
        return records * len(payload) / elapsed / 1e9
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.block_size", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "block_size", quick="64 records per figure", full="512 records per figure",
                  dir_help="(default: the system temp dir)")
    ap.add_argument("--records", type=int, help="1 MiB records per figure (default 512, --quick 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="4,16,64,256", help="block sizes in MiB, comma-separated")
    args = ap.parse_args(argv)
    args.records = args.records or (64 if args.quick else 512)
    if args.records < 1 or args.repeats < 1:
        ap.error("--records and --repeats must be positive")
    out = results_path(args, "block_size")
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    payload = os.urandom(1 << 20)
    sizes = [int(x) for x in args.sizes.split(",")]
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for mode in ("cache", "sync"):
            for mib in sizes:
                runs.setdefault(f"{mode}/{mib}MiB", []).append(put_rate(mib, mode, args.records, payload, args.dir))
    summary = {k: {"median_gbps": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()}
    for k, v in summary.items():
        print(f"{k:<14} put {v['median_gbps']:.2f} GB/s  [{v['min']:.2f} .. {v['max']:.2f}]")
    cmd = "python -m bench.block_size " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_json(out, {"command": cmd, "mode": bench_mode(args), "records": args.records, "repeats": args.repeats,
                     "sizes_mib": sizes, "put_gbps": {k: spread(v) for k, v in runs.items()},
                     "machine": machine_info(args.dir or tempfile.gettempdir()), "engine": engine_state()})
    print(f"reproduce: {cmd}")
    print(json.dumps({"records": args.records, "repeats": args.repeats, "results": summary,
                      "json": os.path.relpath(out)}))


if __name__ == "__main__":
    main()
