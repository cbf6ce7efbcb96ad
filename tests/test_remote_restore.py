"""Restoring a wiped node from the bucket (blockstore/remote/restore.py) on a real SeaweedFS cluster
(tests/seaweed_cluster.py, one for the module): KV and chunk records in two namespaces, overwrites and
deletes, written in `durability="remote"` through a RemoteTier, come back after the node's folder is wiped,
through the command; a corrupt object is refused; after remote GC moved records, the newest values come
back and a dropped tombstone's key stays deleted."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore
from blockstore.chunks import ChunkWrite
from blockstore.compaction.gc import MinSeqs, collect
from blockstore.directory import BLOCK_SEALED
from blockstore.remote import RemotePool, S3Settings, Uploader, make_object_store, restoring
from blockstore.remote.layout import BLOCKS, GC
from blockstore.remote.reclaim import Reclaimer
from blockstore.remote.restoring import RestoreError, restore_node
from blockstore.remote.tier import RemoteTier
from blockstore.tools.fsck import check

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seaweed_cluster import SeaweedCluster, new_bucket, running_cluster, value  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BLOCK = 256 << 10
TIMEOUT_S, POLL_S, GRACE_S = 1.0, 0.2, 1.5  # as tests/test_remote_gc.py: a grace the rule allows


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with running_cluster(tmp_path_factory.mktemp("seaweed")) as c:
        yield c


def bucket(cluster: SeaweedCluster) -> S3Settings:
    return new_bucket(cluster, prefix="r", timeout_s=TIMEOUT_S, retries=0)


def chunk_state(s: blockstore.Store, ns: str, user: str, session: str) -> list[tuple[str, str, int, dict[str, object]]]:
    return [(c.chunk_id, c.text, c.ts_ns, c.meta) for c in s.list_chunks(user, session, ns=ns)]


SESSIONS = [("mem", "u1", "s1"), ("mem", "u1", "s2"), ("default", "u2", "s1")]


def write_node(path: Path, objects: object) -> tuple[dict[tuple[str, bytes], bytes | None], dict[tuple[str, str, str], list[
        tuple[str, str, int, dict[str, object]]]]]:
    """A node in remote mode: KV records in two namespaces and chunk records in three sessions, with
    overwrites and deletes, each acknowledged (confirmed in the bucket) when its call returns. Returns what
    reads must give: KV (None: deleted) and each session's listing."""
    kv: dict[tuple[str, bytes], bytes | None] = {}
    with blockstore.open(path, durability="remote", block_size=BLOCK, remote_seal_seconds=0.02) as s:
        tier = RemoteTier(s, objects, "node-a", poll_s=0.5, retry_min_s=0.1, retry_max_s=0.5)  # type: ignore[arg-type]
        try:
            for ns in ("default", "alpha"):
                items = [(f"k{i:02d}".encode(), value(i + (100 if ns == "alpha" else 0))) for i in range(24)]
                s.put_many(items, ns=ns)
                kv.update({(ns, k): v for k, v in items})
            for ns, user, session in SESSIONS:
                s.put_chunks([ChunkWrite(user, session, f"c{c}", f"{ns}/{user}/{session} memory {c}",
                                         meta={"turn": c}, ts_ns=1_000 + (c * 7) % 5) for c in range(6)], ns=ns)
            for ns in ("beta", "gamma"):  # a partition of their own: no block hash names them, the index does
                items = [(f"p{i}".encode(), f"{ns} {i}".encode()) for i in range(3)]
                s.put_many(items, ns=ns, partition="shared")
                kv.update({(ns, k): v for k, v in items})
            s.put(b"k03", b"overwritten", ns="default")
            kv[("default", b"k03")] = b"overwritten"
            s.delete(b"k04", ns="alpha")
            kv[("alpha", b"k04")] = None
            s.put_chunk("u1", "s1", "c2", "rewritten memory", meta={"turn": 9}, ts_ns=5_000, ns="mem")
            s.delete_chunk("u1", "s2", "c0", ns="mem")
            s.delete_chunk("u2", "s1", "c5")
            chunks = {sess: chunk_state(s, *sess) for sess in SESSIONS}
            assert tier.status().pending_blocks == []
        finally:
            tier.close()
    return kv, chunks


def restored_reads(path: Path, kv: dict[tuple[str, bytes], bytes | None],
                   chunks: dict[tuple[str, str, str], list[tuple[str, str, int, dict[str, object]]]]) -> None:
    with blockstore.open(path) as s:
        for (ns, k), v in kv.items():
            got = s.get(k, ns=ns)
            assert (None if got is None else bytes(got)) == v, (ns, k)
        for sess, listing in chunks.items():
            assert chunk_state(s, *sess) == listing, sess
        assert s.get_chunk("u1", "s2", "c0", ns="mem") is None and s.get_chunk("u2", "s1", "c5") is None
        assert s.get(b"k05", ns="mem") is None and s.get_chunk("u1", "s1", "c1") is None  # namespaces hold


def test_a_wiped_node_comes_back_kv_and_chunk_records(cluster: SeaweedCluster, tmp_path: Path) -> None:
    settings = bucket(cluster)
    objects = make_object_store(settings)
    node = tmp_path / "node"
    kv, chunks = write_node(node, objects)
    assert len(chunks[("mem", "u1", "s1")]) == 6 and len(chunks[("mem", "u1", "s2")]) == 5
    shutil.rmtree(node)  # the disk is lost: store, directory, ledger
    env = {"BLOCKSTORE_S3_ACCESS_KEY": settings.access_key, "BLOCKSTORE_S3_SECRET_KEY": settings.secret_key,
           "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "blockstore.remote.restore", "--endpoint", settings.endpoint, "--bucket",
           settings.bucket, "--node", "node-a", "--target", str(node)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified" in out.stdout and "fsck: clean" in out.stdout and "restored" in out.stdout
    assert check(node, log=False).findings == []
    restored_reads(node, kv, chunks)
    # the restored blocks are flagged remote under their objects: a tier on the restored store sends nothing
    # again, and the node goes on writing under its id (block ids continue: no object name repeats)
    before = set(objects.list_after(BLOCKS, None))
    with blockstore.open(node, durability="remote", block_size=BLOCK, remote_seal_seconds=0.02) as s:
        up = Uploader(s, objects, "node-a")
        assert up.pending() == []
        up.close()
        tier = RemoteTier(s, objects, "node-a", poll_s=0.5)
        try:
            s.put(b"after", b"restore")
            s.put_chunk("u1", "s1", "c7", "after restore", ns="mem", ts_ns=9_000)
        finally:
            tier.close()
    new = set(objects.list_after(BLOCKS, None)) - before
    assert new and all(k.startswith(f"{BLOCKS}node-a/") for k in new)
    pool = RemotePool(objects, str(tmp_path / "pool"))
    try:
        pool.poll()
        assert pool.get_many([b"after", b"k03"], ns="default") == [b"restore", b"overwritten"]
    finally:
        pool.close()
    # a second restore of the same node gets the new records too, and refuses a folder that is not empty
    with pytest.raises(RestoreError, match="empty"):
        restore_node(objects, "node-a", node)
    res = restore_node(objects, "node-a", tmp_path / "again")
    assert res.fsck_findings == [] and res.corrupt == {} and res.unnamed_namespaces == []
    assert res.namespaces == ["alpha", "beta", "default", "gamma", "mem"] and res.flagged == len(res.blocks) and res.unindexed == []
    with blockstore.open(tmp_path / "again") as s:
        assert bytes(s.get(b"after")) == b"restore"  # type: ignore[arg-type]
        assert [c.chunk_id for c in s.list_chunks("u1", "s1", ns="mem")][-1] == "c7"


def test_a_corrupt_object_is_refused(cluster: SeaweedCluster, tmp_path: Path) -> None:
    settings = bucket(cluster)
    objects = make_object_store(settings)
    with blockstore.open(tmp_path / "node", block_size=BLOCK) as s:
        s.put_many([(f"k{i:02d}".encode(), value(i)) for i in range(30)])
        s.put_chunk("u", "s", "c", "a memory")
        s.seal_open_blocks()
        up = Uploader(s, objects, "node-c")
        assert up.run_once().pending_blocks == []
        up.close()
    names = sorted(objects.list_after(BLOCKS, None))
    victim = names[1]
    data = bytearray(objects.get(victim))
    data[len(data) // 2] ^= 0x40
    objects.put(victim, bytes(data))
    target = tmp_path / "restored"
    with pytest.raises(RestoreError, match="corrupt") as err:
        restore_node(objects, "node-c", target)
    assert victim in str(err.value) and "xxh3" in str(err.value)
    assert not target.exists() or list(target.iterdir()) == []  # nothing written
    # the command names the object too, exits 8 (an operational error, as the blockstore command) and writes nothing; so does a node id with no objects
    env = {"BLOCKSTORE_S3_ACCESS_KEY": settings.access_key, "BLOCKSTORE_S3_SECRET_KEY": settings.secret_key,
           "PATH": "/usr/bin:/bin"}
    for node, says in (("node-c", victim), ("node-x", "no live block objects of node 'node-x'")):
        out = subprocess.run([sys.executable, "-m", "blockstore.remote.restore", "--endpoint", settings.endpoint,
                              "--bucket", settings.bucket, "--node", node, "--target", str(target), "-q"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 8 and "restore failed" in out.stderr and says in out.stderr, out.stderr
        assert not target.exists() or list(target.iterdir()) == []
    res = restore_node(objects, "node-c", tmp_path / "skipping", skip_corrupt=True)
    assert list(res.corrupt) == [victim] and len(res.blocks) == len(names) - 1 and res.fsck_findings == []
    with blockstore.open(tmp_path / "skipping") as s:
        assert s.get_chunk("u", "s", "c") is not None
        got = sum(1 for i in range(30) if s.get(f"k{i:02d}".encode()) is not None)
        assert 0 < got < 30  # the corrupt block's records are missing, every other one is there


class Hiding:
    """The bucket as it is once one object is deleted, the others unchanged."""

    def __init__(self, objects: object, hidden: str) -> None:
        self.objects, self.hidden, self.settings = objects, hidden, objects.settings  # type: ignore[attr-defined]

    def list_after(self, prefix: str, after: str | None) -> list[str]:
        return [k for k in self.objects.list_after(prefix, after) if k != self.hidden]  # type: ignore[attr-defined]

    def get(self, key: str) -> bytes:
        return self.objects.get(key)  # type: ignore[attr-defined,no-any-return]


def collect_block(s: blockstore.Store, block_id: int) -> tuple[int, int]:
    floor = MinSeqs(s)
    floor.snapshot()
    entry = next(e for e in s.block_table() if e.block_id == block_id)
    res = collect(s, entry, floor)
    s.reclaim_empty_blocks()
    assert not s.has_block(block_id)
    return res.moved, res.tombstones_dropped


def test_restore_after_remote_gc_gives_the_newest_values(cluster: SeaweedCluster, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 1 holds k00 and k01; block 2 deletes k01, overwrites k00 and adds k02..k09, which empties block 1
    (the engine deletes it); GC then collects block 2 (its records move; k01's tombstone is dropped: nothing older is left
    locally), and both markers are published. Their objects stay for the grace: a restore that used them
    would give k01's old value back; the restore skips them and gives the newest values, before and after
    their deletion, which the restored node's remote GC makes once the grace has passed again."""
    settings = bucket(cluster)
    objects = make_object_store(settings)
    path = tmp_path / "node"
    kv: dict[bytes, bytes | None] = {f"k{i:02d}".encode(): value(i, 10_000) for i in range(2)}
    with blockstore.open(path, block_size=BLOCK) as s:
        up = Uploader(s, objects, "node-g")
        rec = Reclaimer(up, grace_s=GRACE_S, max_poll_interval_s=POLL_S)
        s.put_many(list(kv.items()))
        s.seal_open_blocks()
        first = max(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
        assert up.run_once().pending_blocks == []
        s.delete(b"k01")
        kv[b"k01"] = None
        later = [(b"k00", b"newest")] + [(f"k{i:02d}".encode(), value(i, 10_000)) for i in range(2, 10)]
        s.put_many(later)
        kv.update(later)
        s.seal_open_blocks()
        second = max(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
        assert up.run_once().pending_blocks == []
        assert not s.has_block(first)  # nothing live: the engine deleted it at once
        assert up.run_once().pending_blocks == [] and rec.run_once().published == [first]
        assert collect_block(s, second) == (9, 1)  # its live records moved, k01's tombstone dropped
        s.seal_open_blocks()
        assert up.run_once().pending_blocks == [] and rec.run_once().published == [first, second]
        superseded = sorted(k for k in objects.list_after(BLOCKS, None)
                            if int(k.rsplit("/", 1)[1].split("-")[0], 16) in (first, second))
        assert len(superseded) == 2 and len(objects.list_after(GC, None)) == 2
        res = restore_node(objects, "node-g", tmp_path / "during-grace")
        assert res.skipped_superseded == superseded and res.fsck_findings == []
        # why they are skipped: once the tombstone's object is deleted (its grace ended first), a restore
        # blind to the markers would bring k01's old value back from block 1's superseded object
        second_key = next(k for k in superseded if int(k.rsplit("/", 1)[1].split("-")[0], 16) == second)
        with monkeypatch.context() as m:
            m.setattr(restoring, "GC", "no-markers/")
            blind = restore_node(Hiding(objects, second_key), "node-g", tmp_path / "blind")  # type: ignore[arg-type]
            assert blind.skipped_superseded == []
        with blockstore.open(tmp_path / "blind") as b:
            assert bytes(b.get(b"k01")) == value(1, 10_000)  # type: ignore[arg-type]
        assert restore_node(Hiding(objects, second_key), "node-g",  # type: ignore[arg-type]
                            tmp_path / "seeing").skipped_superseded == [k for k in superseded if k != second_key]
        with blockstore.open(tmp_path / "seeing") as b:
            assert b.get(b"k01") is None
        rec.close()
        up.close()
    shutil.rmtree(path)  # the node is lost inside the grace, and its reclaim list with it
    # the restored node's remote GC adopted the superseded objects: deleted a grace after the restore
    assert res.superseded_adopted == 2
    with blockstore.open(tmp_path / "during-grace") as s:
        up = Uploader(s, objects, "node-g")
        rec = Reclaimer(up, grace_s=GRACE_S, max_poll_interval_s=POLL_S)
        assert rec.run_once().deleted == [] and set(superseded) <= set(objects.list_after(BLOCKS, None))
        time.sleep(GRACE_S + 0.1)
        assert sorted(k for k in rec.run_once().deleted if k.startswith(BLOCKS)) == superseded
        rec.close()
        up.close()
    assert not set(superseded) & set(objects.list_after(BLOCKS, None))
    res_after = restore_node(objects, "node-g", tmp_path / "after-grace")
    assert res_after.skipped_superseded == [] and res_after.fsck_findings == []
    for target in ("during-grace", "after-grace"):
        with blockstore.open(tmp_path / target) as s:
            for k, v in kv.items():
                got = s.get(k)
                assert (None if got is None else bytes(got)) == v, (target, k)
