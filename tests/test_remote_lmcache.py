"""LMCache across nodes (blockstore/connector/remote_tier.py) on a real SeaweedFS cluster: two RemoteTierL2Adapters,
each on its own store, share one bucket; what one stores is a lookup and load hit through the other,
bit-exact, within the tenant that stored it, and a buffer of another layout is a miss. Driven the way
`lmcache server` drives an L2 adapter (LMCache's ObjectKeys and memory objects, event fds). The slow test
runs the whole thing with two real `lmcache server` processes and vLLM (jobs/remote_pool_job.py).

Skipped as a whole when lmcache is not installed (the engine's own suite runs without it)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.memory_allocators.tensor_memory_allocator import TensorMemoryAllocator  # noqa: E402

from blockstore.connector.remote_tier import RemoteTierL2Adapter, RemoteTierL2AdapterConfig  # noqa: E402
from blockstore.errors import InvalidArgument  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from seaweed_cluster import SeaweedCluster, running_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANK = ObjectKey.ComputeKVRank(world_size=1, global_rank=0, local_world_size=1, local_rank=0)
SHAPE = torch.Size([2, 2, 64, 32])  # float32: 32 KiB
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with running_cluster(tmp_path_factory.mktemp("seaweed")) as c:
        yield c


def remote_params(cluster: SeaweedCluster, bucket: str, node: str) -> dict[str, Any]:
    s = cluster.s3_settings()
    return {"endpoint": s["endpoint"], "bucket": bucket, "access_key": s["access_key"], "secret_key": s["secret_key"],
            "node_id": node, "upload_interval_s": 0.2, "poll_interval_s": 0.2, "seal_after_s": 0.3, "timeout_s": 5.0}


def okey(i: int, salt: str = "") -> ObjectKey:
    return ObjectKey(chunk_hash=i.to_bytes(4, "big") * 8, model_name="org/llama-test", kv_rank=RANK,
                     object_group_id=0, cache_salt=salt)


def drain(fd: int) -> None:
    r, _, _ = select.select([fd], [], [], TIMEOUT)
    assert r, "event fd was never signalled"
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def run(a: RemoteTierL2Adapter, kind: str, keys: list[ObjectKey], objs: list[Any] | None = None) -> Any:
    """One store / lookup / load task, waited for on its event fd as the server does."""
    deadline = time.monotonic() + TIMEOUT
    if kind == "store":
        tid = a.submit_store_task(keys, objs or [])
        done: dict[int, Any] = {}
        while tid not in done:
            assert time.monotonic() < deadline
            drain(a.get_store_event_fd())
            done.update(a.pop_completed_store_tasks())
        return done[tid]
    if kind == "lookup":
        tid, fd, query = a.submit_lookup_and_lock_task(keys, {}), a.get_lookup_and_lock_event_fd(), \
            a.query_lookup_and_lock_result
    else:
        tid, fd, query = a.submit_load_task(keys, objs or []), a.get_load_event_fd(), a.query_load_result
    while True:
        drain(fd)
        got = query(tid)
        if got is not None:
            return [got.test(i) for i in range(len(keys))]
        assert time.monotonic() < deadline


def wait_for(what: str, check: Any) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return got


def test_a_record_stored_through_one_node_is_a_hit_through_the_other(cluster: SeaweedCluster, tmp_path: Path) -> None:
    bucket = f"lm-{uuid.uuid4().hex[:10]}"
    cluster.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    alloc = TensorMemoryAllocator(torch.empty(16 << 20, dtype=torch.uint8))
    made: list[Any] = []

    def new(shape: torch.Size = SHAPE, fill: int | None = None) -> Any:
        o = alloc.allocate(shape, torch.float32)
        assert o is not None
        o.tensor.zero_() if fill is None else o.tensor.copy_(torch.randn(tuple(shape),
                                                                         generator=torch.Generator().manual_seed(fill)))
        made.append(o)
        return o

    a = RemoteTierL2Adapter({"path": str(tmp_path / "a"), "compaction": None,
                             "remote": remote_params(cluster, bucket, "node-a")})
    b = RemoteTierL2Adapter({"path": str(tmp_path / "b"), "compaction": None,
                             "remote": remote_params(cluster, bucket, "node-b")})
    try:
        keys = [okey(i) for i in range(3)]
        data = [new(fill=i) for i in range(3)]
        assert run(a, "store", keys, data).is_successful()
        # A seals its idle block and uploads it; B's pool ingests its index
        wait_for("A's upload", lambda: a.report_status()["remote"]["uploaded_blocks"] >= 1
                 and a.report_status()["remote"]["pending_blocks"] == 0)
        wait_for("B's poll", lambda: b.report_status()["remote"]["pool_objects_ingested"] >= 1)
        assert b.store.stats().records == 0  # B's own store holds none of it
        other_tenant = okey(0, salt="tenant-b")
        assert run(b, "lookup", [*keys, okey(99), other_tenant]) == [True, True, True, False, False]
        out = [new() for _ in range(3)]
        assert run(b, "load", keys, out) == [True, True, True]
        assert all(bytes(o.byte_array) == bytes(d.byte_array) for o, d in zip(out, data))
        wrong_layout = new(torch.Size([2, 2, 32, 64]))  # same size, another shape: never filled
        assert run(b, "load", [keys[0]], [wrong_layout]) == [False]
        st = b.report_status()
        r = st["remote"]
        assert (r["lookup_hits"], r["load_hits"], r["load_miss_layout"], r["load_errors"]) == (3, 3, 1, 0)
        assert r["load_bytes"] == 3 * SHAPE.numel() * 4 and st["counters"]["load_hits"] == 0
        assert r["last_error"] == {"upload": None, "pool": None}
    finally:
        a.close()
        b.close()
        for o in made:
            o.ref_count_down()


def test_remote_config_is_checked(tmp_path: Path) -> None:
    base = {"path": str(tmp_path / "kv"), "compaction": None}
    good = {"endpoint": "http://127.0.0.1:1", "bucket": "b", "access_key": "a", "secret_key": "s", "node_id": "n-1"}
    with pytest.raises(InvalidArgument, match="'remote'.*required"):
        RemoteTierL2AdapterConfig.from_dict(base)
    with pytest.raises(InvalidArgument, match="unknown key"):
        RemoteTierL2AdapterConfig.from_dict({**base, "remote": {**good, "polling": 1}})
    with pytest.raises(InvalidArgument, match="missing"):
        RemoteTierL2AdapterConfig.from_dict({**base, "remote": {k: v for k, v in good.items() if k != "bucket"}})
    with pytest.raises(InvalidArgument, match="node id"):
        RemoteTierL2AdapterConfig.from_dict({**base, "remote": {**good, "node_id": "a/b"}})
    with pytest.raises(InvalidArgument, match="poll_interval_s"):
        RemoteTierL2AdapterConfig.from_dict({**base, "remote": {**good, "poll_interval_s": 0}})
    assert "RemoteTierL2Adapter" in RemoteTierL2AdapterConfig.help()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_lmcache_servers_share_one_bucket_through_vllm(tmp_path: Path) -> None:
    """jobs/remote_pool_job.py: vLLM through server A stores a prompt; vLLM through server B, whose store is
    empty, is served it from the bucket, with the same output; another tenant's prompt is not a hit."""
    env = dict(os.environ, DO_NOT_TRACK="1", VLLM_NO_USAGE_STATS="1", LMCACHE_TRACK_USAGE="false", PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-m", "jobs.remote_pool_job", "--work", str(tmp_path / "work")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checks"] and all(result["checks"].values()), result
    assert result["b_remote"]["load_hits"] >= result["chunks"] and result["b_cached_tokens"] >= 3 * 256, result
