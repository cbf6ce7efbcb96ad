"""How big should a block be? Put throughput of 1 MiB KV records (cache and sync mode) and the
per-block overhead, for several block sizes, in the same run.

Smaller blocks make GC finer-grained (a block is the unit reclaimed) but cost a file creation, a
header, a footer and, in sync mode, a directory fsync each; larger ones amortize that.

    python -m bench.block_size [--records 512] [--repeats 3] [--sizes 4,16,64,256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import blockstore


def put_rate(block_mib: int, durability: str, records: int, payload: bytes) -> float:
    path = tempfile.mkdtemp(prefix="bs-blocksize-", dir=os.environ.get("BENCH_DIR"))
    try:
        with blockstore.open(path, durability=durability, block_size=block_mib << 20) as s:
            t = time.perf_counter()
            for i in range(0, records, 32):
                s.put_many([(b"k%d" % j, payload) for j in range(i, min(i + 32, records))])
            elapsed = time.perf_counter() - t
        return records * len(payload) / elapsed / 1e9
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="4,16,64,256", help="block sizes in MiB, comma-separated")
    args = ap.parse_args()
    payload = os.urandom(1 << 20)
    sizes = [int(x) for x in args.sizes.split(",")]
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for mode in ("cache", "sync"):
            for mib in sizes:
                runs.setdefault(f"{mode}/{mib}MiB", []).append(put_rate(mib, mode, args.records, payload))
    summary = {k: {"median_gbps": statistics.median(v), "min": min(v), "max": max(v)} for k, v in runs.items()}
    for k, v in summary.items():
        print(f"{k:<14} put {v['median_gbps']:.2f} GB/s  [{v['min']:.2f} .. {v['max']:.2f}]")
    print(json.dumps({"records": args.records, "repeats": args.repeats, "results": summary}))


if __name__ == "__main__":
    main()
