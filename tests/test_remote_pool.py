"""RemotePool's ingestion rules, with an in-memory bucket as a unit-test aid (the real-cluster tests are
test_remote.py and test_remote_gc.py): many index objects ingested in one synced batch decide each key as if
one by one, in each node's publication order, and gc markers wait for the index they name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blockstore.records import Kind
from blockstore.remote import RemotePool
from blockstore.remote.layout import GC, INDEX, BlockIndex, IndexEntry, Superseded, gc_key, index_name


class MemoryBucket:
    """The ObjectStore calls a pool makes, over a dict (names sort as S3 lists them)."""

    settings = None

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0

    def get(self, key: str) -> bytes:
        self.gets += 1
        return self.objects[key]

    def list_after(self, prefix: str, after: str | None) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix) and (after is None or k > after))

    def list_children(self, prefix: str) -> list[str]:
        return sorted({prefix + k[len(prefix):].split("/", 1)[0] + "/" for k in self.objects if k.startswith(prefix)})

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        raise AssertionError("not read here")


def entry(key: bytes, seq: int, kind: int = int(Kind.KV)) -> IndexEntry:
    return IndexEntry("default", key, kind, 4096, 256, 1280, 1024, seq, 7)


def publish(bucket: MemoryBucket, node: str, seq: int, block: int, entries: list[IndexEntry]) -> str:
    name = INDEX + index_name(node, seq, block)
    bucket.objects[name] = BlockIndex(node, block, f"blocks/{node}/{block:016x}-0", 0, 1 << 20, entries).encode()
    return name


def test_one_batch_decides_each_key_as_if_one_object_at_a_time(tmp_path: Path) -> None:
    bucket = MemoryBucket()
    publish(bucket, "a", 0, 1, [entry(b"k", 1), entry(b"old-wins-not", 9)])
    publish(bucket, "a", 1, 2, [entry(b"k", 2, int(Kind.TOMBSTONE)), entry(b"old-wins-not", 3)])
    publish(bucket, "a", 2, 3, [entry(b"back", 4)])
    publish(bucket, "b", 0, 1, [entry(b"back", 1)])  # another node: ingested after node a's, it wins
    pool = RemotePool(bucket, str(tmp_path / "pool"))  # type: ignore[arg-type]
    try:
        assert pool.poll() == 4  # one window: one synced batch for all four
        got = {k: pool.locate_many([k], ns="default")[0] for k in (b"k", b"old-wins-not", b"back")}
        assert got[b"k"] is None  # the tombstone in the same batch removed the put before it
        assert got[b"old-wins-not"] is not None and got[b"old-wins-not"].seq == 9  # the older record stayed out
        assert got[b"back"] is not None and got[b"back"].node == "b"
        assert pool.poll() == 0 and pool.locate_many([b"k"], ns="other") == [None]
    finally:
        pool.close()


def test_a_gc_marker_waits_for_the_index_it_names(tmp_path: Path) -> None:
    bucket = MemoryBucket()
    first = publish(bucket, "a", 0, 1, [entry(b"k", 1), entry(b"dead", 2)])
    pool = RemotePool(bucket, str(tmp_path / "pool"))  # type: ignore[arg-type]
    try:
        assert pool.poll() == 1
        old = pool.locate_many([b"k"], ns="default")[0]
        assert old is not None
        # the marker names an index not yet in the bucket: listed, not applied
        later = INDEX + index_name("a", 1, 2)
        bucket.objects[gc_key("a", 0, 1)] = Superseded("a", 1, old.data_key, first, later,
                                                       [("default", b"k"), ("default", b"dead")]).encode()
        assert pool.poll() == 0 and pool.locate_many([b"dead"], ns="default")[0] is not None
        publish(bucket, "a", 1, 2, [entry(b"k", 1)])  # k's new place, the same sequence (a GC copy)
        assert pool.poll() == 2  # the index, then the marker
        moved, dead = pool.locate_many([b"k", b"dead"], ns="default")
        assert moved is not None and moved.data_key != old.data_key and dead is None
        assert [k for k in bucket.objects if k.startswith(GC)] and pool.poll() == 0
    finally:
        pool.close()
