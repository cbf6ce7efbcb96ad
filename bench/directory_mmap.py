"""Should the directory open RocksDB with memory-mapped reads? Measures random point lookups and
batched multi-gets of location-sized values with and without `allow_mmap_reads`, after a flush
(so reads hit SST files, not the memtable), in the same run.

    python -m bench.directory_mmap [--keys 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

from rocksdict import Options, Rdict, WriteBatch


def measure(keys: int, mmap: bool, seed: int) -> dict[str, float]:
    path = tempfile.mkdtemp(prefix="bs-dirbench-")
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
    sample: list[str | int | float | bytes | bool] = list(rng.sample(names, 50_000))  # rocksdict's key type
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out: dict[str, dict[str, list[float]]] = {"mmap": {}, "pread": {}}
    for r in range(args.repeats):
        for mode in ("pread", "mmap"):  # interleaved, so drift on a noisy machine hits both
            for k, v in measure(args.keys, mode == "mmap", r).items():
                out[mode].setdefault(k, []).append(v)
    summary = {
        mode: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in m.items()}
        for mode, m in out.items()
    }
    for mode, m in summary.items():
        for k, s in m.items():
            print(f"{mode:<6} {k:<24} median {s['median']:>10,.0f}  [{s['min']:,.0f} .. {s['max']:,.0f}]")
    print(json.dumps({"keys": args.keys, "repeats": args.repeats, "results": summary}))


if __name__ == "__main__":
    main()
