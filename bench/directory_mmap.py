"""Should the directory open RocksDB with memory-mapped reads? Measures random point lookups and
batched multi-gets of location-sized values with and without `allow_mmap_reads`, after a flush
(so reads hit SST files, not the memtable), in the same run.

    python -m bench.directory_mmap            # 200,000 keys, 5 repeats: bench/results/directory_mmap.json
    python -m bench.directory_mmap --quick    # 20,000 keys, 3 repeats: bench/results/directory_mmap_quick.json
    python -m bench.directory_mmap [--keys N] [--repeats R] [--dir PATH] [--json PATH]

Prints one line per figure and its one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from rocksdict import Options, Rdict, WriteBatch

from bench.common import bench_mode, engine_state, machine_info, results_path, spread, standard_args, write_json


def measure(keys: int, mmap: bool, seed: int, scratch: str | None) -> dict[str, float]:
    path = tempfile.mkdtemp(prefix="bs-dirbench-", dir=scratch)
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_allow_mmap_reads(mmap)
    db = Rdict(path, opts)
    rng = random.Random(seed)
    names = [b"K\x00\x00\x00\x01\x01" + rng.randbytes(24) for _ in range(keys)]
    for i in range(0, keys, 10_000):
        wb = WriteBatch(raw_mode=True)
        for k in names[i : i + 10_000]:
            wb.put(k, rng.randbytes(80))  # a location value with a small meta
        db.write(wb)
    db.flush()
    sample: list[str | int | float | bytes | bool] = list(rng.sample(names, min(50_000, keys)))  # rocksdict's key type
    t = time.perf_counter()
    for key in sample:
        db.get(key)
    single = len(sample) / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, len(sample), 64):
        db.get(sample[i : i + 64])
    multi = len(sample) / (time.perf_counter() - t)
    db.close()
    Rdict.destroy(path)
    return {"get_per_s": single, "multiget64_keys_per_s": multi}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.directory_mmap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "directory_mmap", quick="20,000 keys, 3 repeats", full="200,000 keys, 5 repeats",
                  dir_help="(default: the system temp dir)")
    ap.add_argument("--keys", type=int, help="location-sized values (default 200000, --quick 20000)")
    ap.add_argument("--repeats", type=int, help="repeats (default 5, --quick 3)")
    args = ap.parse_args(argv)
    args.keys = args.keys or (20_000 if args.quick else 200_000)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.keys < 1 or args.repeats < 1:
        ap.error("--keys and --repeats must be positive")
    out_path = results_path(args, "directory_mmap")
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    out: dict[str, dict[str, list[float]]] = {"mmap": {}, "pread": {}}
    for r in range(args.repeats):
        for mode in ("pread", "mmap"):  # interleaved, so drift on a noisy machine hits both
            for k, v in measure(args.keys, mode == "mmap", r, args.dir).items():
                out[mode].setdefault(k, []).append(v)
    summary = {
        mode: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in m.items()}
        for mode, m in out.items()
    }
    for mode, m in summary.items():
        for k, s in m.items():
            print(f"{mode:<6} {k:<24} median {s['median']:>10,.0f}  [{s['min']:,.0f} .. {s['max']:,.0f}]")
    cmd = "python -m bench.directory_mmap " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_json(out_path, {"command": cmd, "mode": bench_mode(args), "keys": args.keys, "repeats": args.repeats,
                          "per_s": {mode: {k: spread(v) for k, v in m.items()} for mode, m in out.items()},
                          "machine": machine_info(args.dir or tempfile.gettempdir()), "engine": engine_state()})
    print(f"reproduce: {cmd}")
    print(json.dumps({"keys": args.keys, "repeats": args.repeats, "results": summary,
                      "json": os.path.relpath(out_path)}))


if __name__ == "__main__":
    main()
