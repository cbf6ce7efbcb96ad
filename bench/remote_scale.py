"""How a cross-node hit grows with the number of nodes and of blocks in one pool (issue 18), on a real SeaweedFS
cluster started for the run (tests/seaweed_cluster.py).

For each count N of synthetic nodes (plus the one real node that publishes the hits), on a fresh bucket, the pool is grown to B blocks per node (each node's key-index
objects, 64 entries each as a 64 MiB block of 1 MiB records would have, written in the uploader's format;
their data objects are not needed to poll). At each (N, B):
- catch-up: a fresh pool ingests all N x B index objects (objects/s: what a new node pays);
- idle poll: an up-to-date pool polls and finds nothing new (1 LIST of the nodes + 1 LIST-after per node);
- hit: one more node seals one real 1 MiB record in a real store and uploads it (Uploader.run_once); the
  up-to-date pool's poll + get_many of that record is the hit's latency (the poll interval's wait excluded).

    python -m bench.remote_scale            # N in 1, 8, 32, 64; B in 1, 16, 64; 5 hits each
    python -m bench.remote_scale --quick    # N in 1, 8; B in 1, 16; 3 hits each

Last stdout line: {"hit_ms": {"N=..,B=..": median, ...}, "idle_poll_ms": {...}, "catch_up_objects_per_s": ...}"""

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
from bench.common import engine_state, machine_info, results_path, spread, standard_args, write_json
from blockstore.records import Kind
from blockstore.remote import ObjectStore, RemotePool, S3Settings, Uploader, make_object_store
from blockstore.remote.layout import INDEX, BlockIndex, IndexEntry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed_cluster import SeaweedCluster  # type: ignore[import-not-found]  # noqa: E402

MIB = 1 << 20
ENTRIES = 64  # a 64 MiB block of 1 MiB KV records


def new_settings(cluster: Any) -> S3Settings:
    name = f"s-{uuid.uuid4().hex[:12]}"
    cluster.client().create_bucket(Bucket=name)
    s = cluster.s3_settings()
    return S3Settings(s["endpoint"], name, s["access_key"], s["secret_key"], s["region"])


def publish_synthetic(objects: ObjectStore, nodes: int, first_block: int, last_block: int) -> int:
    """Index objects for blocks [first_block, last_block) of `nodes` nodes, in the uploader's format and
    naming (publication number = block id here); returns how many were written."""
    def one(job: tuple[int, int]) -> None:
        n, b = job
        node = f"synthetic-{n:03d}"
        dkey = f"blocks/{node}/{b:016x}-{0:016x}"
        entries = [IndexEntry("default", f"n{n}-b{b}-k{i}".encode(), int(Kind.KV), 4096 + i * (MIB + 4096), 256,
                              MIB + 256, MIB, b * ENTRIES + i, 0) for i in range(ENTRIES)]
        raw = BlockIndex(node, b, dkey, 0, 64 * MIB, entries).encode()
        objects.put(f"{INDEX}{node}/{b:016x}-{b:016x}", raw)
    jobs = [(n, b) for b in range(first_block, last_block) for n in range(nodes)]
    with ThreadPoolExecutor(max_workers=16) as ex:
        list(ex.map(one, jobs))
    return len(jobs)


def hit_once(objects: ObjectStore, pool: RemotePool, scratch: str, i: int) -> float:
    """The hitting node (one node id per bucket: a fresh store under it continues its publication numbers
    from the bucket) seals and uploads one record; seconds for the pool's poll + read of it."""
    path = os.path.join(scratch, f"hitter-{uuid.uuid4().hex[:8]}")
    value = os.urandom(MIB)
    key = b"hit-%d" % i
    with blockstore.open(path, block_size=16 * MIB) as s:
        s.put(key, value)
    with blockstore.open(path) as s:
        up = Uploader(s, objects, "hitter")
        up.run_once()
        up.close()
    t = time.perf_counter()
    pool.poll()
    got = pool.get_many([key], ns="default")
    elapsed = time.perf_counter() - t
    assert got == [value], "the hit read back other bytes"
    shutil.rmtree(path)
    return elapsed


def one_node_count(cluster: Any, scratch: str, nodes: int, blocks: list[int], hits: int) -> list[dict[str, Any]]:
    objects = make_object_store(new_settings(cluster))
    out = []
    have = 0
    pool = RemotePool(objects, os.path.join(scratch, f"pool-{uuid.uuid4().hex[:8]}"))
    try:
        for b in blocks:
            publish_synthetic(objects, nodes, have, b)
            have = b
            fresh = RemotePool(objects, os.path.join(scratch, f"fresh-{uuid.uuid4().hex[:8]}"))
            t = time.perf_counter()
            ingested = fresh.poll()
            catch_up = time.perf_counter() - t
            fresh.close()
            pool.poll()  # the measuring pool up to date (hitters of earlier rows included)
            idle = []
            for _ in range(hits):
                t = time.perf_counter()
                assert pool.poll() == 0
                idle.append(time.perf_counter() - t)
            hit = [hit_once(objects, pool, scratch, j) for j in range(hits)]
            # the synthetic nodes and the hitting node publish; the hit's latency is what the pool pays for all
            row: dict[str, Any] = {"nodes": nodes + 1, "blocks_per_node": b, "index_objects": ingested,
                   "catch_up_s": catch_up, "catch_up_objects_per_s": ingested / catch_up,
                   "idle_poll_s": spread(idle), "hit_s": spread(hit)}
            print(json.dumps({"nodes": nodes + 1, "blocks_per_node": b, "index_objects": ingested,
                              "catch_up_objects_per_s": round(ingested / catch_up, 1),
                              "idle_poll_ms": round(1000 * row["idle_poll_s"]["median"], 1),
                              "hit_ms": round(1000 * row["hit_s"]["median"], 1)}), flush=True)
            out.append(row)
    finally:
        pool.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote_scale", description=__doc__.split("\n\n")[0])
    standard_args(ap, "remote_scale", quick="N in 1, 8; B in 1, 16; 3 hits", full="N in 1, 8, 32, 64; B in 1, 16, 64; 5 hits",
                  dir_help="(the local stores, pools and the SeaweedFS cluster; default: the system temp dir)")
    a = ap.parse_args(argv)
    node_counts = [1, 8] if a.quick else [1, 8, 32, 64]
    blocks = [1, 16] if a.quick else [1, 16, 64]
    hits = 3 if a.quick else 5
    out = results_path(a, "remote_scale")
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-remote-scale-", dir=a.dir)
    cluster = SeaweedCluster(Path(scratch) / "seaweed")
    rows: list[dict[str, Any]] = []
    try:
        cluster.start()
        print(f"cluster up in {cluster.startup_s:.1f} s", flush=True)
        for n in node_counts:
            rows += one_node_count(cluster, scratch, n, blocks, hits)
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    cmd = "python -m bench.remote_scale" + (" --quick" if a.quick else "")
    label = {id(r): f"N={r['nodes']},B={r['blocks_per_node']}" for r in rows}
    summary = {
        "hit_ms": {label[id(r)]: round(1000 * r["hit_s"]["median"], 1) for r in rows},
        "idle_poll_ms": {label[id(r)]: round(1000 * r["idle_poll_s"]["median"], 1) for r in rows},
        "catch_up_objects_per_s": round(spread([r["catch_up_objects_per_s"] for r in rows])["median"], 1),
    }
    write_json(out, {"rows": rows, "summary": summary, "entries_per_index": ENTRIES, "command": cmd,
                     "argv": shlex.join(sys.argv), "cluster_startup_s": cluster.startup_s,
                     "machine": machine_info(a.dir or tempfile.gettempdir()), "engine": engine_state()})
    print(f"results in {out}; reproduce with: {cmd}")
    print(json.dumps({**summary, "results": os.path.relpath(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
