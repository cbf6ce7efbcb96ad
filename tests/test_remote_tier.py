"""The automatic remote tier (blockstore/remote/tier.py) and `durability="remote"` on a real SeaweedFS
cluster (tests/seaweed_cluster.py, one per module): the object store unreachable, a node's disk wiped,
a dropped local copy read back through the fallback, a corrupt object, and kill -9 during uploads.
Every case checks that nothing acknowledged is lost."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore import RemoteNotConfirmed
from blockstore.errors import ChecksumMismatch
from blockstore.remote import RemotePool, make_object_store
from blockstore.remote.layout import INDEX, BlockIndex
from blockstore.remote.tier import RemoteTier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seaweed_cluster import SeaweedCluster, new_bucket, running_cluster, value  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BLOCK = 256 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with running_cluster(tmp_path_factory.mktemp("seaweed")) as c:
        yield c


def from_bucket(objects: Any, folder: Path, keys: list[bytes]) -> list[Any]:
    """What a fresh node reads of `keys` from the bucket alone."""
    pool = RemotePool(objects, str(folder))
    try:
        pool.poll()
        return [None if v is None else bytes(v) for v in pool.get_many(keys, ns="default")]
    finally:
        pool.close()


def no_dangling_pointer(objects: Any) -> int:
    """Every published index names a data object of exactly the size it says; returns how many."""
    names = objects.list_after(INDEX, None)
    for name in names:
        idx = BlockIndex.decode(objects.get(name))
        assert objects.size(idx.data_key) == idx.size, f"{name} names {idx.data_key}, which is not there"
    return len(names)


def test_remote_mode_while_the_object_store_is_unreachable(cluster: SeaweedCluster, tmp_path: Path) -> None:
    objects = make_object_store(new_bucket(cluster, timeout_s=1.0, retries=0))
    acked: dict[bytes, bytes] = {}
    # remote_timeout long enough for the outage below and the gateway's recovery on a loaded machine
    with blockstore.open(tmp_path / "s", durability="remote", block_size=BLOCK, remote_seal_seconds=0.05,
                         remote_timeout=30.0) as s:
        tier = RemoteTier(s, objects, "node-r", retry_min_s=0.1, retry_max_s=0.5)
        for i in range(4):
            s.put(f"a{i}".encode(), value(i))
            acked[f"a{i}".encode()] = value(i)
        assert tier.status().pending_blocks == []
        cluster.pause_s3()
        try:
            done: list[BaseException | None] = []
            waiter = threading.Thread(target=lambda: done.append(_put(s, b"w", value(50))))
            t0 = time.monotonic()
            waiter.start()
            wait_until("the tier sees the outage", lambda: tier.status().last_error is not None)
            assert not done  # the put waits: its block is not confirmed
            assert s.get(b"a1") == value(1) and s.get(b"w") == value(50)  # local reads keep working
            st = tier.status()
            assert st.pending_blocks and st.pending_bytes > 0 and st.failures_in_a_row >= 1, st
        finally:
            cluster.resume_s3()
        waiter.join()
        assert done == [None], done  # confirmed once the store came back, within remote_timeout
        acked[b"w"] = value(50)
        print(f"put waited {time.monotonic() - t0:.1f} s across the outage")
        tier.close()
    with blockstore.open(tmp_path / "s", durability="remote", remote_seal_seconds=0.05, remote_timeout=3.0) as s:
        tier = RemoteTier(s, objects, "node-r", retry_min_s=0.1, retry_max_s=0.5)
        cluster.pause_s3()
        try:
            with pytest.raises(RemoteNotConfirmed, match="durable locally"):
                s.put(b"late", value(60))  # not acknowledged as remote: a clear error, not a hang
            assert s.get(b"late") == value(60)
            assert tier.status().pending_blocks
        finally:
            cluster.resume_s3()
        assert tier.close(timeout=60.0)  # uploads resume and drain
    keys = sorted(acked) + [b"late"]
    assert from_bucket(objects, tmp_path / "pool", keys) == [acked.get(k, value(60)) for k in keys]
    assert no_dangling_pointer(objects)


def wait_until(what: str, ok: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _put(s: blockstore.Store, key: bytes, val: bytes) -> BaseException | None:
    try:
        s.put(key, val)
    except BaseException as exc:
        return exc
    return None


def test_remote_mode_disk_wiped_every_acknowledged_record_comes_back(cluster: SeaweedCluster, tmp_path: Path) -> None:
    objects = make_object_store(new_bucket(cluster))
    acked: dict[bytes, bytes] = {}
    s = blockstore.open(tmp_path / "node", durability="remote", block_size=BLOCK, remote_seal_seconds=0.05)
    tier = RemoteTier(s, objects, "node-w")
    for i in range(0, 24, 3):  # several puts per group, several blocks
        batch = [(f"k{j}".encode(), value(j)) for j in range(i, i + 3)]
        s.put_many(batch)
        acked.update(batch)
    s.put(b"k5", value(99))  # an overwrite, acknowledged
    acked[b"k5"] = value(99)
    tier.close(drain=False)  # the node dies: nothing more is uploaded
    s.abandon()
    shutil.rmtree(tmp_path / "node")
    keys = sorted(acked)
    assert from_bucket(objects, tmp_path / "pool", keys) == [acked[k] for k in keys]


def test_dropped_local_copies_read_through_the_fallback_and_a_corrupt_object(cluster: SeaweedCluster,
                                                                            tmp_path: Path) -> None:
    objects = make_object_store(new_bucket(cluster))
    counted = CountingObjects(objects)
    kv = {f"d{i:02d}".encode(): value(i) for i in range(30)}
    with blockstore.open(tmp_path / "s", block_size=BLOCK) as s:
        s.put_many(list(kv.items()))
        tier = RemoteTier(s, counted, "node-d", local_capacity_bytes=0)  # keep nothing confirmed locally
        assert tier.drain()
        deadline = time.monotonic() + 20
        while tier.status().dropped_blocks < len(s.block_table()) and time.monotonic() < deadline:
            time.sleep(0.05)
        st = tier.status()
        assert st.dropped_blocks == len(s.block_table()) and st.local_bytes == 0, st
        assert not any(s.has_local_copy(e.block_id) for e in s.block_table())
        keys = sorted(kv)
        counted.ranged = 0
        assert [bytes(v) for v in s.get_many(keys[:3])] == [kv[k] for k in keys[:3]]
        assert counted.ranged == 1  # three neighbours in one block: one coalesced ranged GET
        assert [bytes(v) for v in s.get_many(keys)] == [kv[k] for k in keys]
        # a byte flipped in the bucket's copy of one payload: a checksum error, never wrong bytes
        loc = s.locate_many([b"d07"])[0]
        assert loc is not None
        name = next(e.remote_name for e in s.block_table() if e.block_id == loc.block_id).decode()
        good = objects.get(name)
        bad = bytearray(good)
        bad[loc.payload_offset + 100] ^= 0x01
        objects.put(name, bytes(bad))
        with pytest.raises(ChecksumMismatch):
            s.get(b"d07")
        objects.put(name, good)
        assert s.get(b"d07") == kv[b"d07"]
        tier.close()
    with blockstore.open(tmp_path / "s") as s:  # reopened: the dropped blocks are not damage
        assert s.recovery_report is None or not s.recovery_report["missing_blocks"]
        with RemoteTier(s, objects, "node-d", restore_after_reads=2) as tier:
            loc = s.locate_many([b"d29"])[0]
            assert loc is not None and not s.has_local_copy(loc.block_id)
            assert s.get(b"d29") == kv[b"d29"] and s.get(b"d29") == kv[b"d29"]  # read twice: hot
            deadline = time.monotonic() + 20
            while not s.has_local_copy(loc.block_id) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.has_local_copy(loc.block_id)  # kept locally again (no capacity bound here)
            assert s.get(b"d29") == kv[b"d29"]
            assert tier.status().dropped_blocks == len(s.block_table()) - 1


class CountingObjects:
    """The object store, counting ranged GETs (the fallback's coalescing is checked with it)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.ranged = inner, 0
        self.settings = inner.settings

    def get_ranges(self, key: str, ranges: Any) -> Any:
        self.ranged += len(ranges)
        return self.inner.get_ranges(key, ranges)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import blockstore
    from blockstore import hooks
    from blockstore.remote import S3Settings, make_object_store
    from blockstore.remote.tier import RemoteTier
    path, point, settings = sys.argv[1], sys.argv[2], S3Settings(*sys.argv[3:8])
    seen = []
    def die(block_id):
        seen.append(block_id)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    hooks.register(point, die)
    s = blockstore.open(path, durability="remote", block_size=256 << 10, remote_seal_seconds=0.02)
    tier = RemoteTier(s, make_object_store(settings), "node-k")
    for i in range(200):
        key = f"k{i:03d}".encode()
        s.put(key, (i.to_bytes(4, "little") * 10_000))
        print(key.decode(), flush=True)  # acknowledged
    sys.exit(3)
""")


@pytest.mark.parametrize("point", ["remote.data_put", "remote.flagged"])
def test_kill9_during_upload_in_remote_mode(cluster: SeaweedCluster, tmp_path: Path, point: str) -> None:
    settings = new_bucket(cluster)
    objects = make_object_store(settings)
    args = [str(tmp_path / "s"), point, settings.endpoint, settings.bucket, settings.access_key,
            settings.secret_key, settings.region]
    proc = subprocess.run([sys.executable, "-c", _KILLER, *args], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    acked = [line.encode() for line in proc.stdout.decode().split()]
    assert acked, "the writer was killed before any put was acknowledged"
    def val(k: bytes) -> bytes:
        return int(k[1:]).to_bytes(4, "little") * 10_000
    no_dangling_pointer(objects)  # what the killed process left
    # every acknowledged record is in the bucket already, before any retry
    assert from_bucket(objects, tmp_path / "pool-before", acked) == [val(k) for k in acked]
    with blockstore.open(tmp_path / "s", durability="remote") as s:
        assert [s.get(k) for k in acked] == [val(k) for k in acked]
        with RemoteTier(s, objects, "node-k") as tier:
            assert tier.drain()
            flagged = {e.remote_name.decode() for e in s.block_table() if e.remote_name}
            assert tier.status().pending_blocks == []
            # the ledger is whole again: a flag whose ledger mark the kill cut off got its mark back
            marks = tier.uploader.ledger.uploaded_blocks()
            assert {str(marks[e.block_id]["data_key"]) for e in s.block_table() if e.remote_name} == flagged
    n = no_dangling_pointer(objects)
    assert all(objects.size(name) is not None for name in flagged)
    assert n == len(objects.list_after("blocks/", None))  # one index per data object: no object sent twice
    assert from_bucket(objects, tmp_path / "pool-after", acked) == [val(k) for k in acked]
