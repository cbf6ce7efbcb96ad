"""Remote GC on a real SeaweedFS cluster (blockstore/remote/reclaim.py): compaction empties an uploaded block,
its "superseded" marker is published only once the moved records' new block is uploaded, every pool
(one that keeps polling, one that sleeps past the grace, one started afterwards) moves its pointers, and
the old object is deleted only after the grace period; kill -9 at each step of a remote GC leaves no
dangling pointer and no object beyond the grace rule."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore
from blockstore.compaction.gc import MinSeqs, collect
from blockstore.directory import BLOCK_SEALED
from blockstore.errors import InvalidArgument
from blockstore.remote import RemotePool, S3Settings, Uploader, make_object_store
from blockstore.remote.layout import BLOCKS, GC, INDEX, Superseded
from blockstore.remote.reclaim import Reclaimer

sys.path.insert(0, str(Path(__file__).parent))
from seaweed_cluster import SeaweedCluster, running_cluster, value  # noqa: E402
from seaweed_cluster import new_bucket as seaweed_new_bucket

REPO = Path(__file__).resolve().parent.parent
BLOCK = 256 << 10
# a short grace the rule allows: reads time out after 1 s with no retry, pools poll every 0.2 s
TIMEOUT_S, POLL_S, GRACE_S = 1.0, 0.2, 1.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    with running_cluster(tmp_path_factory.mktemp("seaweed")) as c:
        yield c


def new_bucket(cluster: SeaweedCluster) -> S3Settings:
    return seaweed_new_bucket(cluster, "gc", timeout_s=TIMEOUT_S, retries=0)


def uploaded_store_with_a_collected_block(path: Path, settings: S3Settings) -> tuple[dict[bytes, bytes], str, int]:
    """30 records over 5 sealed, uploaded blocks; then the first block's live records are moved out by
    GC (2 of its keys deleted first) into an open block, which is not uploaded yet. Returns the live
    records, the collected block's data object and its id."""
    objects = make_object_store(settings)
    kv = {f"k{i:02d}".encode(): value(i) for i in range(30)}
    with blockstore.open(path, block_size=BLOCK) as s:
        s.put_many(list(kv.items()))
    with blockstore.open(path, block_size=BLOCK) as s:
        up = Uploader(s, objects, "node-a")
        assert up.run_once().pending_blocks == []
        first = min(e.block_id for e in s.block_table() if e.state == BLOCK_SEALED)
        old_key = up.ledger.uploaded(first)["data_key"]  # type: ignore[index]
        in_first = [k for k in kv if s.locate_many([k])[0].block_id == first]  # type: ignore[union-attr]
        s.delete_many(in_first[:2])
        for k in in_first[:2]:
            del kv[k]
        floor = MinSeqs(s)
        floor.snapshot()
        entry = next(e for e in s.block_table() if e.block_id == first)
        assert collect(s, entry, floor).moved == 3
        s.reclaim_empty_blocks()  # the compactor deletes a pass's emptied blocks in one batch
        assert not s.has_block(first)
        up.close()
    return kv, old_key, first


def keys_of(objects: object, prefix: str) -> list[str]:
    return objects.list_after(prefix, None)  # type: ignore[attr-defined,no-any-return]


def no_dangling_pointer(pool: RemotePool, kv: dict[bytes, bytes], objects: object) -> None:
    """Every key the pool names is in an object that exists, and reads back exactly."""
    present = set(keys_of(objects, BLOCKS))
    for e in pool.locate_many(sorted(kv), ns="default"):
        assert e is not None and e.data_key in present
    assert pool.get_many(sorted(kv), ns="default") == [kv[k] for k in sorted(kv)]


def test_the_grace_rule_is_checked(cluster: SeaweedCluster, tmp_path: Path) -> None:
    settings = new_bucket(cluster)
    with blockstore.open(tmp_path / "s") as s:
        up = Uploader(s, make_object_store(settings), "node-a")
        with pytest.raises(InvalidArgument, match="longest poll interval"):
            Reclaimer(up, grace_s=TIMEOUT_S + POLL_S, max_poll_interval_s=POLL_S)
        up.close()


def test_collected_block_is_superseded_then_deleted_after_the_grace(cluster: SeaweedCluster,
                                                                   tmp_path: Path) -> None:
    settings = new_bucket(cluster)
    objects = make_object_store(settings)
    store = tmp_path / "s"
    late = RemotePool(objects, str(tmp_path / "late"))  # polls once now, then sleeps past the grace
    kv, old_key, first = uploaded_store_with_a_collected_block(store, settings)
    late.poll()
    keeping = RemotePool(objects, str(tmp_path / "keeping"))
    try:
        with blockstore.open(store, block_size=BLOCK) as s:
            up = Uploader(s, objects, "node-a")
            rec = Reclaimer(up, grace_s=GRACE_S, max_poll_interval_s=POLL_S)
            st = rec.run_once()
            # the moved records sit in an open block: no marker yet, the old object stays
            assert "not uploaded yet" in st.waiting[first] and not keys_of(objects, GC)
            rec.close()
            up.close()
        with blockstore.open(store, block_size=BLOCK) as s:  # the close sealed it: upload, then mark
            up = Uploader(s, objects, "node-a")
            assert up.run_once().pending_blocks == []
            rec = Reclaimer(up, grace_s=GRACE_S, max_poll_interval_s=POLL_S)
            st = rec.run_once()
            assert st.published == [first] and st.deleted == [] and old_key in keys_of(objects, BLOCKS)
            markers = keys_of(objects, GC)
            assert len(markers) == 1
            marker = Superseded.decode(objects.get(markers[0]))
            assert marker.data_key == old_key and marker.after_index in keys_of(objects, INDEX)
            keeping.poll()
            # the keeping pool moved every pointer off the old object before it goes
            assert all(e is not None and e.data_key != old_key
                       for e in keeping.locate_many(sorted(kv), ns="default"))
            assert rec.run_once().deleted == []  # inside the grace: nothing deleted
            time.sleep(GRACE_S + 0.1)
            st = rec.run_once()
            assert old_key in st.deleted and st.done_blocks == 1 and st.published == []
            assert rec.run_once().deleted == []  # done once
            rec.close()
            up.close()
        assert old_key not in keys_of(objects, BLOCKS)
        no_dangling_pointer(keeping, kv, objects)
        # the late pool still named the deleted object: its read re-polls and finds the new places
        assert any(e is not None and e.data_key == old_key for e in late.locate_many(sorted(kv), ns="default"))
        assert late.get_many(sorted(kv), ns="default") == [kv[k] for k in sorted(kv)]
        no_dangling_pointer(late, kv, objects)
        fresh = RemotePool(objects, str(tmp_path / "fresh"))
        try:
            fresh.poll()
            no_dangling_pointer(fresh, kv, objects)
            assert fresh.get_many([b"k00", b"k01"], ns="other") == [None, None]  # namespaces still hold
        finally:
            fresh.close()
    finally:
        late.close()
        keeping.close()


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import blockstore
    from blockstore import hooks
    from blockstore.remote import S3Settings, Uploader, make_object_store
    from blockstore.remote.reclaim import Reclaimer
    path, point, endpoint, bucket, ak, sk, region = sys.argv[1:8]
    settings = S3Settings(endpoint, bucket, ak, sk, region, timeout_s=1.0, retries=0)
    if point != "none":
        hooks.register(point, lambda *a: os.kill(os.getpid(), signal.SIGKILL))
    with blockstore.open(path) as s:
        up = Uploader(s, make_object_store(settings), "node-a")
        up.run_once()
        rec = Reclaimer(up, grace_s=1.5, max_poll_interval_s=0.2)
        st = rec.run_once()
        print(st.published, st.deleted, st.last_error)
""")


def run_gc(store: Path, settings: S3Settings, point: str) -> subprocess.CompletedProcess[bytes]:
    args = [str(store), point, settings.endpoint, settings.bucket, settings.access_key, settings.secret_key,
            settings.region]
    return subprocess.run([sys.executable, "-c", _KILLER, *args], cwd=REPO, capture_output=True, timeout=120)


@pytest.mark.slow
# remote.flagged: the uploader's kill between the store's flag and its ledger mark, for the block the moved
# records went to; the reclaimer must see that block as published from the flag (the ledger never will)
@pytest.mark.parametrize("point", ["remote.flagged", "remote.gc_reserved", "remote.gc_marker_put",
                                   "remote.gc_data_deleted"])
def test_kill9_during_remote_gc_leaves_no_dangling_pointer_and_no_leak(cluster: SeaweedCluster, tmp_path: Path,
                                                                      point: str) -> None:
    settings = new_bucket(cluster)
    objects = make_object_store(settings)
    store = tmp_path / "s"
    kv, old_key, _first = uploaded_store_with_a_collected_block(store, settings)
    pool = RemotePool(objects, str(tmp_path / "pool"))
    try:
        if point == "remote.gc_data_deleted":  # a first pass publishes; the kill comes at the deletion
            assert run_gc(store, settings, "none").returncode == 0
            time.sleep(1.6)
        proc = run_gc(store, settings, point)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        pool.poll()
        no_dangling_pointer(pool, kv, objects)  # after the kill: the old object, if named, is still there
        if point == "remote.gc_data_deleted":
            assert old_key not in keys_of(objects, BLOCKS)  # deleted, the list not yet told
        else:
            assert old_key in keys_of(objects, BLOCKS)  # never deleted before its marker's grace
        proc = run_gc(store, settings, "none")  # the retry finishes the step the kill cut
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        time.sleep(1.6)
        assert run_gc(store, settings, "none").returncode == 0
        assert len(keys_of(objects, GC)) == 1  # one marker: the retry reused its reserved number
        with blockstore.open(store) as s:  # no leak: the bucket holds exactly the blocks the node holds
            up = Uploader(s, objects, "node-a")
            held = {e.remote_name.decode() for e in s.block_table() if e.state == BLOCK_SEALED}
            if point == "remote.flagged":  # the cut mark stays cut: the reclaimer went by the flag
                assert any(up.ledger.uploaded(e.block_id) is None for e in s.block_table() if e.remote_name)
            up.close()
        assert set(keys_of(objects, BLOCKS)) == held and old_key not in held
        assert len(keys_of(objects, INDEX)) == len(held)  # the old index object went with its data
        pool.poll()
        no_dangling_pointer(pool, kv, objects)
    finally:
        pool.close()


def test_an_unreadable_old_index_holds_back_its_block_only(cluster: SeaweedCluster, tmp_path: Path) -> None:
    """A block whose old index object cannot be read waits (its keys are unknown, so no marker could drop
    their pointers); the pass goes on and nothing is deleted."""
    settings = new_bucket(cluster)
    objects = make_object_store(settings)
    store = tmp_path / "s"
    _kv, old_key, first = uploaded_store_with_a_collected_block(store, settings)
    with blockstore.open(store, block_size=BLOCK) as s:
        up = Uploader(s, objects, "node-a")
        old_index = up.ledger.uploaded(first)["index_key"]  # type: ignore[index]
        objects.delete(old_index)
        s.seal_open_blocks()
        assert up.run_once().pending_blocks == []
        rec = Reclaimer(up, grace_s=GRACE_S, max_poll_interval_s=POLL_S)
        st = rec.run_once()
        assert "could not be read" in st.waiting[first] and st.last_error is None and st.published == []
        assert old_key in keys_of(objects, BLOCKS) and not keys_of(objects, GC)
        rec.close()
        up.close()
