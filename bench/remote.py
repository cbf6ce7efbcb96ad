"""The object-store tier against the raw S3 ceiling, on a real SeaweedFS cluster started for the run
(tests/seaweed_cluster.py: master, 3 volume servers with replication 001, filer, S3 gateway).

For each client (boto3, obstore), on fresh buckets, `--repeats` times:
- upload: `Uploader.run_once()` of a store of 1 MiB KV records (sealed blocks: block file PUT after a HEAD,
  then the key index, then the ledger) vs plain PutObject of the same block files' bytes, same client;
- ranged read: `RemotePool.get_many` of every record in batches of `--batch` (coalesced ranged GETs,
  verified record by record) vs plain GetObject of the same payloads stored as objects of their own,
  with the same parallelism (8 requests in flight), same client; and vs plain ranged GETs of the same
  record spans in the block objects (what the store itself charges for a range);
- cross-node hit: node A seals one record and uploads it; node B's first read of it (poll + read).
Median and spread per figure; the ratios are medians of per-repeat ratios.

    python -m bench.remote            # 128 x 1 MiB records, 5 repeats
    python -m bench.remote --quick    # 32 x 1 MiB records, 3 repeats
    python -m bench.remote --repeats 7 --filer-max-mb 2   # the filer's chunks at 2 MiB (docs/remote-scale.md)

Last stdout line: {"ratios": {"upload_vs_raw_put": ..., "ranged_read_vs_raw_get": ...}, ...}
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
from blockstore.remote import ObjectStore, RemotePool, S3Settings, Uploader, make_object_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed_cluster import SeaweedCluster  # type: ignore[import-not-found]  # noqa: E402

MIB = 1 << 20
BLOCK_SIZE = 16 * MIB
CLIENTS = ("boto3", "obstore")


def new_settings(cluster: Any) -> S3Settings:
    name = f"b-{uuid.uuid4().hex[:12]}"
    cluster.client().create_bucket(Bucket=name)
    s = cluster.s3_settings()
    return S3Settings(s["endpoint"], name, s["access_key"], s["secret_key"], s["region"])


def build_store(path: str, n: int) -> dict[bytes, bytes]:
    kv = {k: os.urandom(MIB) for k in keys_for(n)}
    with blockstore.open(path, block_size=BLOCK_SIZE) as s:
        items = list(kv.items())
        for i in range(0, len(items), 16):
            s.put_many(items[i:i + 16])
    return kv


def time_raw_put(objects: ObjectStore, files: list[bytes]) -> float:
    t = time.perf_counter()
    for i, data in enumerate(files):  # the ceiling: the same bytes, plain PutObject, same client
        objects.put(f"raw/block-{i}", data)
    return time.perf_counter() - t


def drop_bucket(cluster: Any, bucket: str) -> None:
    """Empty and delete a repeat's bucket: each bucket is a SeaweedFS collection with volumes of its own, and
    a run of 7+ repeats per client otherwise fills every volume slot (PUTs then fail with 500)."""
    c = cluster.client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            c.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    c.delete_bucket(Bucket=bucket)


def one_repeat(cluster: Any, client: str, scratch: str, n: int, batch: int, raw_first: bool) -> dict[str, float]:
    settings = new_settings(cluster)
    try:
        return measure_repeat(make_object_store(settings, client), scratch, n, batch, raw_first)
    finally:
        drop_bucket(cluster, settings.bucket)


def measure_repeat(objects: ObjectStore, scratch: str, n: int, batch: int,
                   raw_first: bool) -> dict[str, float]:
    for i in range(4):  # a new bucket grows its volumes on its first writes: not part of either figure
        objects.put(f"warm/{i}", os.urandom(MIB))
    path = os.path.join(scratch, f"store-{uuid.uuid4().hex[:8]}")
    kv = build_store(path, n)
    with blockstore.open(path) as s:
        files = [Path(s.blocks.path(e.block_id)).read_bytes() for e in s.block_table() if e.state == 2]
        raw_put_s = time_raw_put(objects, files) if raw_first else 0.0  # alternate who goes first
        up = Uploader(s, objects, f"node-{uuid.uuid4().hex[:6]}")
        t = time.perf_counter()
        st = up.run_once()
        upload_s = time.perf_counter() - t
        up.close()
        assert not st.pending_blocks, st.last_error
    if not raw_first:
        raw_put_s = time_raw_put(objects, files)
    block_bytes = sum(len(d) for d in files)

    pool = RemotePool(objects, os.path.join(scratch, f"pool-{uuid.uuid4().hex[:8]}"))
    pool.poll()
    keys = sorted(kv)
    for i, k in enumerate(keys):
        objects.put(f"raw/record-{i}", kv[k])
    spans = [(e.data_key, e.offset, e.offset + e.record_len)
             for e in pool.locate_many(keys, ns="default") if e is not None]
    read_s = raw_get_s = raw_range_s = 0.0
    # batch by batch, rotating which goes first: on a shared machine the load drifts within seconds,
    # and interleaving puts every side under the same drift
    with ThreadPoolExecutor(max_workers=8) as ex:  # the reader's parallelism
        for b, i in enumerate(range(0, len(keys), batch)):
            for side in [(0, 1, 2), (1, 2, 0), (2, 0, 1)][b % 3]:
                t = time.perf_counter()
                if side == 0:  # the tier: lookup, coalesced ranged GETs, verified records
                    got = pool.get_many(keys[i:i + batch], ns="default")
                    read_s += time.perf_counter() - t
                    assert got == [kv[k] for k in keys[i:i + batch]]
                elif side == 1:  # the ceiling: plain GetObject of the same payloads
                    raw = list(ex.map(objects.get, [f"raw/record-{j}" for j in range(i, min(i + batch, len(keys)))]))
                    raw_get_s += time.perf_counter() - t
                    assert all(len(r) == MIB for r in raw)
                else:  # what the object store charges for ranges: the same spans, no lookup, no checks
                    got_spans = list(ex.map(lambda sp: objects.get_ranges(sp[0], [(sp[1], sp[2])])[0],
                                            spans[i:i + batch]))
                    raw_range_s += time.perf_counter() - t
                    assert all(len(g) == sp[2] - sp[1] for g, sp in zip(got_spans, spans[i:i + batch]))
    pool.close()
    shutil.rmtree(path)
    payload = n * MIB
    return {
        "upload_MBps": block_bytes / upload_s / 1e6, "raw_put_MBps": block_bytes / raw_put_s / 1e6,
        "ranged_read_MBps": payload / read_s / 1e6, "raw_get_MBps": payload / raw_get_s / 1e6,
        "raw_ranged_get_MBps": payload / raw_range_s / 1e6,
        "upload_vs_raw_put": raw_put_s / upload_s, "ranged_read_vs_raw_get": raw_get_s / read_s,
        "ranged_read_vs_raw_ranged_get": raw_range_s / read_s,
    }


def cross_node_hit(cluster: Any, objects: ObjectStore, scratch: str, tries: int) -> list[float]:
    """Seconds from node A's upload finishing to node B holding the bytes (B polls, then reads)."""
    pool = RemotePool(objects, os.path.join(scratch, f"pool-x-{uuid.uuid4().hex[:8]}"))
    pool.poll()
    out = []
    for i in range(tries):
        path = os.path.join(scratch, f"node-x-{i}")
        value = os.urandom(MIB)
        with blockstore.open(path, block_size=BLOCK_SIZE) as s:
            s.put(b"hit-%d" % i, value)
        with blockstore.open(path) as s:
            up = Uploader(s, objects, f"node-x{i}")
            up.run_once()
            up.close()
        t = time.perf_counter()
        pool.poll()
        got = pool.get_many([b"hit-%d" % i], ns="default")
        out.append(time.perf_counter() - t)
        assert got == [value]
        shutil.rmtree(path)
    pool.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__.split("\n\n")[0])
    standard_args(ap, "remote", quick="32 records, 3 repeats", full="128 records, 5 repeats",
                  dir_help="(the local stores and the SeaweedFS cluster; default: the system temp dir)")
    ap.add_argument("--records", type=int, default=None, help="1 MiB records per repeat (default 128, quick 32)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16, help="records per read batch")
    ap.add_argument("--clients", default=",".join(CLIENTS), help="S3 clients to measure, comma-separated")
    ap.add_argument("--filer-max-mb", type=int, default=None,
                    help="SeaweedFS filer chunk size for large objects (weed filer -maxMB; its default 4)")
    ap.add_argument("--s3-cache-mb", type=int, default=None,
                    help="SeaweedFS S3 gateway in-memory chunk cache (weed s3 -cacheCapacityMB; default: its own)")
    a = ap.parse_args(argv)
    clients = [c for c in a.clients.split(",") if c]
    if not clients or set(clients) - set(CLIENTS):
        ap.error(f"--clients: a comma-separated subset of {','.join(CLIENTS)}")
    n = a.records or (32 if a.quick else 128)
    repeats = a.repeats or (3 if a.quick else 5)
    out = results_path(a, "remote")
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-remote-", dir=a.dir)
    cluster = SeaweedCluster(Path(scratch) / "seaweed", filer_max_mb=a.filer_max_mb, s3_cache_mb=a.s3_cache_mb)
    try:
        cluster.start()
        print(f"cluster up in {cluster.startup_s:.1f} s", flush=True)
        per_client: dict[str, Any] = {}
        for client in clients:
            runs = []
            for r in range(repeats):
                runs.append(one_repeat(cluster, client, scratch, n, a.batch, raw_first=r % 2 == 1))
                print(client, r, json.dumps({k: round(v, 3) for k, v in runs[-1].items()}), flush=True)
            per_client[client] = {k: spread([x[k] for x in runs]) for k in runs[0]}
        hit = cross_node_hit(cluster, make_object_store(new_settings(cluster)), scratch, 3 if a.quick else 5)
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    best = max(clients, key=lambda c: per_client[c]["ranged_read_MBps"]["median"] + per_client[c]["upload_MBps"]["median"])
    ratios = {k: round(per_client[best][k]["median"], 3)
              for k in ("upload_vs_raw_put", "ranged_read_vs_raw_get", "ranged_read_vs_raw_ranged_get")}
    cmd = "python -m bench.remote" + (" --quick" if a.quick else "") + (f" --records {a.records}" if a.records else "")
    for flag, v in (("--repeats", a.repeats), ("--clients", None if clients == list(CLIENTS) else a.clients),
                    ("--filer-max-mb", a.filer_max_mb), ("--s3-cache-mb", a.s3_cache_mb)):
        cmd += "" if v is None else f" {flag} {v}"
    doc = {
        "ratios": ratios, "client": best, "filer_max_mb": a.filer_max_mb, "s3_cache_mb": a.s3_cache_mb, "records": n, "record_bytes": MIB, "batch": a.batch, "repeats": repeats,
        "per_client": per_client, "cross_node_hit_s": spread(hit),
        # try i runs with i + 1 publishing nodes in the bucket (each try adds a node): one more LIST per poll
        "cross_node_hit_s_by_nodes": [[i + 1, h] for i, h in enumerate(hit)], "cluster_startup_s": cluster.startup_s,
        "command": cmd, "argv": shlex.join(sys.argv), "machine": machine_info(a.dir or tempfile.gettempdir()),
        "engine": engine_state(),
    }
    write_json(out, doc)
    print(f"results in {out}; reproduce with: {cmd}")
    print(json.dumps({"ratios": ratios, "client": best, "cross_node_hit_ms": round(1000 * spread(hit)["median"], 1),
                      "results": os.path.relpath(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
