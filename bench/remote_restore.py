"""Restoring a lost node from the bucket (blockstore/remote/restoring.py) against the raw download of the
same objects, on a real SeaweedFS cluster started for the run (tests/seaweed_cluster.py).

A node's store (`--mib` MiB of 1 MiB KV records in 16 MiB blocks, and 2,000 chunk records) is uploaded once
(`Uploader.run_once`); then, `--repeats` times, alternating which goes first:
- restore: `restore_node` into an empty folder (list, GET and verify every object 4 at a time, write and
  sync the block files, the repair's rebuild of the directory, the remote flags, fsck);
- raw: GET the same block objects with the same 4 in flight and write and sync them as files (no
  verification, no rebuild): what any restore has to pay.
Median and spread; the ratio is the median of per-repeat ratios (restore MB/s / raw MB/s).

    python -m bench.remote_restore            # 256 MiB, 5 repeats
    python -m bench.remote_restore --quick    # 64 MiB, 3 repeats

Last stdout line: {"restore_vs_raw_download": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blockstore
from bench.common import engine_state, keys_for, machine_info, results_path, spread, standard_args, write_json
from blockstore.chunks import ChunkWrite
from blockstore.remote import ObjectStore, S3Settings, Uploader, make_object_store, restore_node
from blockstore.remote.layout import BLOCKS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed_cluster import SeaweedCluster  # type: ignore[import-not-found]  # noqa: E402

MIB = 1 << 20
NODE = "node-r"


def build_node(path: str, objects: ObjectStore, mib: int) -> int:
    """The node's store, uploaded; returns the bytes in its block objects."""
    with blockstore.open(path, block_size=16 * MIB) as s:
        s.put_many([(k, os.urandom(MIB)) for k in keys_for(mib)])
        s.put_chunks([ChunkWrite(f"u{i % 10}", f"s{i % 50}", f"c{i}", f"memory {i} " * 20, ts_ns=i)
                      for i in range(2_000)], ns="agents")
        s.seal_open_blocks()
        up = Uploader(s, objects, NODE)
        st = up.run_once()
        up.close()
        assert st.pending_blocks == [], st.last_error
    return sum(objects.size(k) or 0 for k in objects.list_after(f"{BLOCKS}{NODE}/", None))


def raw_download(objects: ObjectStore, folder: str) -> float:
    os.makedirs(folder)
    keys = objects.list_after(f"{BLOCKS}{NODE}/", None)
    t0 = time.perf_counter()

    def one(k: str) -> None:
        data = objects.get(k)
        with open(os.path.join(folder, k.rsplit("/", 1)[1]), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, keys))
    return time.perf_counter() - t0


def one_repeat(objects: ObjectStore, scratch: str, total: int, raw_first: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    tag = uuid.uuid4().hex[:8]
    for side in (("raw", "restore") if raw_first else ("restore", "raw")):
        target = os.path.join(scratch, f"{side}-{tag}")
        if side == "raw":
            out["raw_s"] = raw_download(objects, target)
        else:
            t0 = time.perf_counter()
            res = restore_node(objects, NODE, target)
            out["restore_s"] = time.perf_counter() - t0
            assert res.fsck_findings == [] and res.corrupt == {}, res
        shutil.rmtree(target)
    out["restore_MBps"] = total / out["restore_s"] / 1e6
    out["raw_MBps"] = total / out["raw_s"] / 1e6
    out["restore_vs_raw_download"] = out["restore_MBps"] / out["raw_MBps"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote_restore", description=__doc__.split("\n\n")[0])
    standard_args(ap, "remote_restore", quick="64 MiB, 3 repeats", full="256 MiB, 5 repeats",
                  dir_help="(the stores and the SeaweedFS cluster; default: the system temp dir)")
    ap.add_argument("--mib", type=int, default=None, help="MiB of 1 MiB records on the node (default 256, quick 64)")
    ap.add_argument("--repeats", type=int, default=None)
    a = ap.parse_args(argv)
    mib = a.mib or (64 if a.quick else 256)
    repeats = a.repeats or (3 if a.quick else 5)
    out = results_path(a, "remote_restore")
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-restore-", dir=a.dir)
    cluster = SeaweedCluster(Path(scratch) / "seaweed")
    try:
        cluster.start()
        name = f"b-{uuid.uuid4().hex[:12]}"
        cluster.client().create_bucket(Bucket=name)
        s = cluster.s3_settings()
        objects = make_object_store(S3Settings(s["endpoint"], name, s["access_key"], s["secret_key"], s["region"]))
        total = build_node(os.path.join(scratch, "node"), objects, mib)
        runs = []
        for r in range(repeats):
            runs.append(one_repeat(objects, scratch, total, raw_first=r % 2 == 1))
            print(r, json.dumps({k: round(v, 3) for k, v in runs[-1].items()}), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    figures = {k: spread([x[k] for x in runs]) for k in runs[0]}
    cmd = "python -m bench.remote_restore" + (" --quick" if a.quick else "") + (f" --mib {a.mib}" if a.mib else "") + \
        (f" --repeats {a.repeats}" if a.repeats else "")
    doc = {"restore_vs_raw_download": round(figures["restore_vs_raw_download"]["median"], 3), "bytes": total,
           "repeats": repeats, "figures": figures, "cluster_startup_s": cluster.startup_s, "command": cmd,
           "argv": shlex.join(sys.argv), "machine": machine_info(a.dir or tempfile.gettempdir()),
           "engine": engine_state()}
    write_json(out, doc)
    print(f"results in {out}; reproduce with: {cmd}")
    summary: dict[str, Any] = {"restore_vs_raw_download": doc["restore_vs_raw_download"], "bytes": total,
                               "restore_MBps": round(figures["restore_MBps"]["median"], 1),
                               "raw_MBps": round(figures["raw_MBps"]["median"], 1), "results": os.path.relpath(out)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
