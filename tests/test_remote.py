"""The object-store tier on a real SeaweedFS cluster (tests/seaweed_cluster.py: master, 3 volume servers
with replication 001, filer, S3 gateway, each on its own 127.0.0.x): upload once, cross-node reads,
namespaces, coalesced ranged reads, and the failures issue 18 names (a volume server killed mid-read,
the store unreachable, a wiped disk, a corrupt object, kill -9 during an upload)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# no importorskip: without requirements/remote.txt installed these tests fail, they never skip silently
import blockstore
from bench import remote as bench_remote
from blockstore.errors import ChecksumMismatch, CorruptionError
from blockstore.remote import (
    IndexEntry,
    RemoteError,
    RemotePool,
    Uploader,
    make_object_store,
)
from blockstore.remote.layout import BLOCKS, INDEX, BlockIndex, check_node_id
from blockstore.remote.reader import plan_runs

sys.path.insert(0, str(Path(__file__).parent))
from seaweed_cluster import SeaweedCluster, new_bucket, running_cluster, value  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BLOCK = 256 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with running_cluster(tmp_path_factory.mktemp("seaweed")) as c:
        yield c


def sealed_store(path: Path, items: dict[str, dict[bytes, bytes]]) -> None:
    """A store whose records are all in sealed blocks (close seals the open ones)."""
    with blockstore.open(path, block_size=BLOCK) as s:
        for ns, kv in items.items():
            s.put_many(list(kv.items()), ns=ns)


def keys_of(objects: object, prefix: str) -> list[str]:
    return objects.list_after(prefix, None)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_sealed_blocks_upload_once_and_are_read_on_another_node(cluster: SeaweedCluster, tmp_path: Path,
                                                                client: str) -> None:
    settings = new_bucket(cluster)
    objects = make_object_store(settings, client)
    a = {f"k{i}".encode(): value(i) for i in range(30)}
    b = {f"k{i}".encode(): value(1000 + i) for i in range(5)}  # same keys, another tenant, other bytes
    sealed_store(tmp_path / "a", {"tenant-a": a, "tenant-b": b})
    with blockstore.open(tmp_path / "a", block_size=BLOCK) as s:
        s.put(b"k0", b"overwritten", ns="tenant-a")  # a newer record in a later block
        s.delete(b"k1", ns="tenant-a")  # a KV tombstone
    with blockstore.open(tmp_path / "a", block_size=BLOCK) as s:
        up = Uploader(s, objects, "node-a")
        st = up.run_once()
        sealed = [e.block_id for e in s.block_table() if e.state == 2]
        assert st.pending_blocks == [] and st.last_error is None and len(st.published) == len(sealed) > 3
        assert len(keys_of(objects, BLOCKS)) == len(keys_of(objects, INDEX)) == len(sealed)
        again = up.run_once()  # every block is in the ledger: nothing is sent twice
        assert again.published == [] and again.uploaded_bytes_this_pass == 0
        assert up.status().uploaded_blocks == len(sealed)
        up.close()

    pool = RemotePool(objects, str(tmp_path / "node-b-pool"))
    try:
        assert pool.poll() == len(sealed)
        assert pool.poll() == 0  # the cursor: nothing new, nothing read again
        want_a = {**a, b"k0": b"overwritten"}
        del want_a[b"k1"]
        keys = sorted(a)
        got = pool.get_many(keys, ns="tenant-a")
        assert dict(zip(keys, got)) == {k: want_a.get(k) for k in keys}
        assert pool.get_many(sorted(b), ns="tenant-b") == [b[k] for k in sorted(b)]
        assert pool.get_many([b"k7"], ns="tenant-b") == [None]  # tenant-a's k7 is not tenant-b's
        assert pool.get_many([b"k7"], ns="nobody") == [None]
        # neighbours in one block are one ranged GET of exactly their span
        located = [e for e in pool.locate_many(keys, ns="tenant-a") if e is not None]
        one_block = [e for e in located if e.data_key == located[-1].data_key]
        before = pool.reader.requests
        assert len(pool.reader.read(one_block)) == len(one_block) > 1
        assert pool.reader.requests - before == 1
    finally:
        pool.close()


def test_corrupt_object_is_a_checksum_miss_never_wrong_bytes(cluster: SeaweedCluster, tmp_path: Path) -> None:
    objects = make_object_store(new_bucket(cluster))
    kv = {f"c{i}".encode(): value(i) for i in range(8)}
    sealed_store(tmp_path / "s", {"default": kv})
    with blockstore.open(tmp_path / "s") as s:
        up = Uploader(s, objects, "node-c")
        up.run_once()
        up.close()
    pool = RemotePool(objects, str(tmp_path / "pool"))
    try:
        pool.poll()
        e = pool.locate_many([b"c3"], ns="default")[0]
        assert e is not None
        good = objects.get(e.data_key)
        for where, error in ((e.offset + e.payload_off + 100, ChecksumMismatch), (e.offset + 20, CorruptionError)):
            bad = bytearray(good)
            bad[where] ^= 0x40
            objects.put(e.data_key, bytes(bad))  # the bucket's copy rots in place
            with pytest.raises(error):
                pool.get_many([b"c3"], ns="default")
        objects.put(e.data_key, good)
        assert pool.get_many([b"c3"], ns="default") == [kv[b"c3"]]
    finally:
        pool.close()


def test_store_unreachable_uploads_queue_and_resume(cluster: SeaweedCluster, tmp_path: Path) -> None:
    settings = new_bucket(cluster, timeout_s=1.0, retries=1)
    objects = make_object_store(settings)
    kv = {f"u{i}".encode(): value(i) for i in range(20)}
    sealed_store(tmp_path / "s", {"default": kv})
    with blockstore.open(tmp_path / "s") as s:
        up = Uploader(s, objects, "node-u")
        cluster.pause_s3()
        try:
            st = up.run_once()
            assert st.last_error is not None and st.published == []
            sealed = [e.block_id for e in s.block_table() if e.state == 2]
            assert st.pending_blocks == sealed and st.pending_bytes > 0
            assert s.get(b"u5") == kv[b"u5"]  # local reads do not wait for the object store
        finally:
            cluster.resume_s3()
        published: list[str] = []
        for _ in range(5):  # the uploader's next passes: the first may still meet the gateway's backlog
            st = up.run_once()
            published += st.published
            if not st.pending_blocks:
                break
        assert st.pending_blocks == [] and st.last_error is None, st.last_error
        assert len(published) == len(sealed)
        up.close()
    pool = RemotePool(objects, str(tmp_path / "pool"))
    try:
        pool.poll()
        assert pool.get_many(sorted(kv), ns="default") == [kv[k] for k in sorted(kv)]
    finally:
        pool.close()


def test_wiped_disk_records_come_back_from_the_bucket(cluster: SeaweedCluster, tmp_path: Path) -> None:
    objects = make_object_store(new_bucket(cluster))
    kv = {f"w{i}".encode(): value(i) for i in range(16)}
    sealed_store(tmp_path / "node", {"default": kv})
    with blockstore.open(tmp_path / "node") as s:
        up = Uploader(s, objects, "node-w")
        first = up.run_once().published
        up.close()
    shutil.rmtree(tmp_path / "node")  # the disk is gone, ledger and all
    pool = RemotePool(objects, str(tmp_path / "new-pool"))
    try:
        pool.poll()
        got = pool.get_many(sorted(kv), ns="default")
        assert got == [kv[k] for k in sorted(kv)]
        with blockstore.open(tmp_path / "node") as s:  # the node starts over under its old name
            s.put_many([(k, v) for k, v in zip(sorted(kv), got) if v is not None])
        with blockstore.open(tmp_path / "node") as s:
            assert s.get(b"w9") == kv[b"w9"]
            up = Uploader(s, objects, "node-w")
            again = up.run_once().published
            up.close()
        # a fresh ledger continues the node's publication numbers: readers' cursors skip nothing
        assert again and min(again) > max(first)
        assert pool.poll() == len(again)
    finally:
        pool.close()


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import blockstore
    from blockstore import hooks
    from blockstore.remote import S3Settings, Uploader, make_object_store
    path, point, settings = sys.argv[1], sys.argv[2], S3Settings(*sys.argv[3:8])
    seen = []
    def die(block_id):
        seen.append(block_id)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    hooks.register(point, die)
    with blockstore.open(path) as s:
        Uploader(s, make_object_store(settings), "node-k").run_once()
    sys.exit(3)
""")


@pytest.mark.parametrize("point", ["remote.data_put", "remote.index_put"])
def test_kill9_during_upload_leaves_nothing_a_retry_does_not_finish(cluster: SeaweedCluster, tmp_path: Path,
                                                                     point: str) -> None:
    settings = new_bucket(cluster)
    objects = make_object_store(settings)
    kv = {f"x{i}".encode(): value(i) for i in range(20)}
    sealed_store(tmp_path / "s", {"default": kv})
    args = [str(tmp_path / "s"), point, settings.endpoint, settings.bucket, settings.access_key,
            settings.secret_key, settings.region]
    proc = subprocess.run([sys.executable, "-c", _KILLER, *args], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    data_before, index_before = keys_of(objects, BLOCKS), keys_of(objects, INDEX)
    # killed after the 2nd block's data PUT: its index is not there (the 1st's may still have been in
    # flight on the index worker); after the 2nd index PUT: both are (and maybe the 3rd block's data)
    if point == "remote.data_put":
        assert len(data_before) == 2 and len(index_before) <= 1
    else:
        assert len(index_before) == 2 and len(data_before) in (2, 3)
    with blockstore.open(tmp_path / "s") as s:
        up = Uploader(s, objects, "node-k")
        st = up.run_once()
        sealed = [e.block_id for e in s.block_table() if e.state == 2]
        up.close()
    assert st.pending_blocks == []
    data_after, index_after = keys_of(objects, BLOCKS), keys_of(objects, INDEX)
    # exactly one data object and one index per sealed block: the retry reused the names it reserved
    assert len(data_after) == len(index_after) == len(sealed)
    assert set(data_before) <= set(data_after)
    pool = RemotePool(objects, str(tmp_path / "pool"))
    try:
        assert pool.poll() == len(sealed)
        assert pool.get_many(sorted(kv), ns="default") == [kv[k] for k in sorted(kv)]
    finally:
        pool.close()


def test_volume_server_killed_mid_read_reads_come_from_the_replica(cluster: SeaweedCluster, tmp_path: Path) -> None:
    settings = new_bucket(cluster, timeout_s=10.0, retries=3)
    objects = make_object_store(settings)
    kv = {f"v{i}".encode(): value(i, 100_000) for i in range(60)}
    sealed_store(tmp_path / "s", {"default": kv})
    with blockstore.open(tmp_path / "s") as s:
        up = Uploader(s, objects, "node-v")
        assert up.run_once().pending_blocks == []
        up.close()
    pool = RemotePool(objects, str(tmp_path / "pool"))
    keys = sorted(kv)
    rounds: list[int] = []
    errors: list[BaseException] = []
    killed = threading.Event()

    def read_loop() -> None:
        try:
            for r in range(12):
                for i in range(0, len(keys), 6):  # small batches: many requests straddle the kill
                    got = pool.get_many(keys[i:i + 6], ns="default")
                    assert got == [kv[k] for k in keys[i:i + 6]]
                rounds.append(r)
                if r == 1:
                    killed.wait(30)
        except BaseException as e:  # reported below, with the cluster's logs
            errors.append(e)

    victim = cluster.volume_servers[0]
    try:
        pool.poll()
        t = threading.Thread(target=read_loop)
        t.start()
        while not rounds and t.is_alive():
            t.join(0.05)
        victim.kill(signal.SIGKILL)
        killed.set()
        t.join(120)
        assert not errors, f"{errors[0]!r}\n{cluster.tail(cluster.gateway)}"  # type: ignore[arg-type]
        assert len(rounds) == 12 and not victim.alive()
        # the victim held copies of this bucket's volumes (a collection's files are <bucket>_<id>.dat)
        vdir = Path(next(a for a in victim.args if a.startswith("-dir=")).split("=", 1)[1])
        held = [f for f in vdir.iterdir()
                if f.name.startswith(settings.bucket + "_") and f.suffix == ".dat" and f.stat().st_size > 8]
        assert held, "the killed server held none of the data: the test proved nothing"
    finally:
        pool.close()
        if not victim.alive():
            victim.start()  # later tests get the full cluster back


# ---------------------------------------------------------------- pure parts (no cluster)


def _entry(key: str, off: int, rlen: int, data_key: str = "blocks/n/1-2") -> IndexEntry:
    return IndexEntry("default", key.encode(), 1, off, 64, rlen, rlen - 64, 1, 0, data_key, "n")


def test_plan_runs_coalesces_neighbours_within_gap_and_run_bounds() -> None:
    es = [_entry("c", 20_000, 1000), _entry("a", 4096, 1000), _entry("b", 5096, 1000), _entry("d", 9_000_000, 100),
          _entry("e", 4096, 1000, data_key="blocks/n/2-3")]
    runs = plan_runs(es, max_gap=64 << 10, max_run=2 << 20)
    assert sorted((k, s, e, sorted(m)) for k, s, e, m in runs) == [
        ("blocks/n/1-2", 4096, 21_000, [0, 1, 2]),  # a, b adjacent, c 13.9 KB further: one GET
        ("blocks/n/1-2", 9_000_000, 9_000_100, [3]),  # far away: its own GET
        ("blocks/n/2-3", 4096, 5096, [4]),  # another object: its own GET
    ]
    assert len(plan_runs(es[1:3], max_gap=0, max_run=1500)) == 2  # the run bound splits even neighbours


def test_bad_index_objects_and_node_ids_are_clear_errors() -> None:
    for raw in (b"", b"{}", b'{"v": 99}', b"\xff\x00", b'{"v": 1, "node": "n", "data_key": "k", "block_id": 1, '
                b'"file_xxh3": 0, "size": 1, "entries": [["ns", "zz", 1, 0, 0, 0, 0, 0, 0]]}'):
        with pytest.raises(RemoteError):
            BlockIndex.decode(raw)
    for bad in ("", "a/b", "x" * 64, "-lead"):
        with pytest.raises(RemoteError):
            check_node_id(bad)
    one = BlockIndex("n", 7, "blocks/n/7-0", 5, 100, [_entry("k", 4096, 200, "blocks/n/7-0")])
    assert BlockIndex.decode(one.encode()) == one


def test_bench_remote_measures_both_sides_on_the_shared_cluster(cluster: SeaweedCluster, tmp_path: Path) -> None:
    """bench/remote.py's pieces on this module's cluster (one cluster at a time): every figure is
    measured and positive, the reads were checked byte for byte inside (asserts), the hit is timed."""
    got = bench_remote.one_repeat(cluster, "obstore", str(tmp_path), 4, 2, raw_first=True)
    assert set(got) >= {"upload_vs_raw_put", "ranged_read_vs_raw_get", "ranged_read_vs_raw_ranged_get"}
    assert all(v > 0 for v in got.values())
    hits = bench_remote.cross_node_hit(cluster, make_object_store(new_bucket(cluster)), str(tmp_path), 2)
    assert len(hits) == 2 and all(h > 0 for h in hits)
