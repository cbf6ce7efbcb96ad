"""Many nodes, one pool: a node ingests every node's key-index objects (list-after from a cursor per
node) into its own RocksDB under its own folder, and reads what any node sealed through RemoteReader.

Lookup keys carry the namespace's name, so a key is only ever found in the namespace it was written
in, on every node. Within one origin node the higher sequence number wins (a KV tombstone removes the
key); between nodes the index ingested last wins (KV-cache keys name their content, so both are right).

Remote GC (reclaim.py): a node's "superseded" markers are listed after its indexes, with a cursor of their
own, and applied only once this pool has ingested the index the marker waits for: every pointer that
still names the reclaimed object is dropped (the moved records' new places are already in). A read that
finds an object gone (this pool polled too late for the grace period) re-polls once and reads again."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from rocksdict import Options, WriteBatch

from blockstore.errors import CorruptionError, InvalidArgument
from blockstore.records import RECORD_HEADER_SIZE, Kind
from blockstore.remote.errors import RemoteObjectMissing
from blockstore.remote.layout import GC, INDEX, BlockIndex, IndexEntry, Superseded
from blockstore.remote.objects import ObjectStore
from blockstore.remote.reader import RemoteReader, plan_runs
from blockstore.remote.synced_write import SyncedDB, write_synced

T = TypeVar("T")
POLL_PARALLEL = 8  # LISTs and GETs in flight during a poll (and read_records' ranged GETs)
POLL_WINDOW = 256  # index objects fetched ahead of their ingestion

_CURSOR = b"c/"  # + node id -> the last index object name ingested from that node
_KEY = b"k/"  # + namespace length, namespace, key -> the entry
_GC_CURSOR = b"g/"  # + node id -> the last gc marker name applied from that node


def _lookup_key(ns: str, key: bytes) -> bytes:
    raw = ns.encode()
    if not 0 < len(raw) < 256:
        raise InvalidArgument(f"namespace name must be 1-255 bytes, not {ns!r}")
    return _KEY + bytes([len(raw)]) + raw + key


def _encode(e: IndexEntry) -> bytes:
    return json.dumps([e.data_key, e.node, e.kind, e.offset, e.payload_off, e.record_len, e.payload_len, e.seq,
                       e.payload_xxh3]).encode()


def _decode(ns: str, key: bytes, raw: bytes) -> IndexEntry:
    dkey, node, kind, off, poff, rlen, plen, seq, cks = json.loads(raw)
    return IndexEntry(ns, key, kind, off, poff, rlen, plen, seq, cks, dkey, node)


class RemotePool:
    def __init__(self, objects: ObjectStore, path: str, *, reader: RemoteReader | None = None) -> None:
        self.objects = objects
        opts = Options()
        opts.create_if_missing(True)
        self._db = SyncedDB(path, opts)  # reopened after a failed durable write (synced_write.py)
        self.reader = reader or RemoteReader(objects)
        self._fetch_pool: ThreadPoolExecutor | None = None  # poll's and read_records' workers, made on first use
        self.ingested_objects = 0

    def close(self) -> None:
        self.reader.close()
        if self._fetch_pool is not None:
            self._fetch_pool.shutdown(wait=True)
        self._db.close()

    def poll(self) -> int:
        """Ingest every index object published since the last poll, then apply the gc markers whose
        indexes are in; returns how many objects were taken. One LIST for the nodes, one LIST-after per
        node, one GET per new object, for indexes and markers alike (cost proportional to what is new).
        The LISTs and GETs run POLL_PARALLEL at a time (bench/remote_scale.py: one node's LIST after another
        made an idle poll grow by ~1.5 ms a node); objects are applied in each node's publication order."""
        n = 0
        for window in self._new_objects(INDEX, _CURSOR):
            self._ingest([(node, name, BlockIndex.decode(raw)) for node, name, raw in window])
            n += len(window)
        waiting: set[str] = set()
        for window in self._new_objects(GC, _GC_CURSOR):
            for node, name, raw in window:
                if node in waiting:
                    continue
                marker = Superseded.decode(raw)
                if marker.after_index and marker.after_index > (self._cursor(_CURSOR, node) or ""):
                    waiting.add(node)  # its moved records' index is not in yet: the next poll applies it, in order
                    continue
                self._apply(node, name, marker)
                n += 1
        self.ingested_objects += n
        return n

    def _io(self) -> ThreadPoolExecutor:
        if self._fetch_pool is None:
            self._fetch_pool = ThreadPoolExecutor(max_workers=POLL_PARALLEL, thread_name_prefix="remote-pool-io")
        return self._fetch_pool

    def _new_objects(self, top: str, cursor: bytes) -> Iterator[list[tuple[str, str, bytes]]]:
        """Windows of (node, object name, bytes): every object under `top` after each node's cursor, in name
        order per node; a window at a time, so a long catch-up holds a bounded number in memory."""
        nodes = [p[len(top):].rstrip("/") for p in self.objects.list_children(top)]
        listings = self._io().map(lambda nd: self.objects.list_after(f"{top}{nd}/", self._cursor(cursor, nd)), nodes)
        names = [(node, name) for node, listed in zip(nodes, listings) for name in listed]
        for i in range(0, len(names), POLL_WINDOW):
            window = names[i:i + POLL_WINDOW]
            got = self._io().map(lambda nn: self.objects.get(nn[1]), window)
            yield [(node, name, raw) for (node, name), raw in zip(window, got)]

    def _cursor(self, kind: bytes, node: str) -> str | None:
        raw = self._db.get(kind + node.encode())
        return None if raw is None else bytes(raw).decode()

    def _apply(self, node: str, name: str, marker: Superseded) -> None:
        """Drop the marker's keys whose pointer still names its object, and move the cursor, in one batch."""
        batch = WriteBatch()
        for ns, key in marker.keys:
            lk = _lookup_key(ns, key)
            raw = self._db.get(lk)
            if raw is not None and _decode(ns, key, bytes(raw)).data_key == marker.data_key:
                batch.delete(lk)
        batch.put(_GC_CURSOR + node.encode(), name.encode())
        write_synced(self._db, batch)

    def _ingest(self, items: list[tuple[str, str, BlockIndex]]) -> None:
        """Index objects (each node's in publication order), their entries and the nodes' new cursors in one
        synced batch (one fsync per window, not per object: ingestion was ~3.6 ms an object, mostly the sync).
        A key named by more than one of them is decided against the batch's own earlier writes."""
        batch = WriteBatch()
        pending: dict[bytes, bytes | None] = {}  # this batch's writes (None: deleted), read before the DB
        cursors: dict[str, str] = {}
        for node, name, index in items:
            for e in index.entries:
                lk = _lookup_key(e.ns, e.key)
                old_raw = pending[lk] if lk in pending else self._db.get(lk)
                if old_raw is not None:
                    old = _decode(e.ns, e.key, bytes(old_raw))
                    if old.node == index.node and old.seq > e.seq:
                        continue  # an older record of the same node's key: the newer one stays
                if e.kind == Kind.TOMBSTONE:
                    if old_raw is not None:
                        batch.delete(lk)
                        pending[lk] = None
                    continue
                row = _encode(IndexEntry(e.ns, e.key, e.kind, e.offset, e.payload_off, e.record_len, e.payload_len,
                                         e.seq, e.payload_xxh3, index.data_key, index.node))
                batch.put(lk, row)
                pending[lk] = row
            cursors[node] = name
        for node, name in cursors.items():
            batch.put(_CURSOR + node.encode(), name.encode())
        write_synced(self._db, batch)

    def locate_many(self, keys: Sequence[bytes], *, ns: str) -> list[IndexEntry | None]:
        out: list[IndexEntry | None] = []
        for k in keys:
            raw = self._db.get(_lookup_key(ns, bytes(k)))
            out.append(None if raw is None else _decode(ns, bytes(k), bytes(raw)))
        return out

    def get_many(self, keys: Sequence[bytes], *, ns: str) -> list[memoryview | None]:
        """Each key's verified payload from the bucket, as a read-only view (None: no node published it
        in namespace `ns`). An object found gone (reclaimed after a grace period this pool overslept)
        makes it poll once and look again; a key whose object is still gone after that is a miss."""
        return self._with_repoll(keys, ns, lambda found: self.reader.read(found))

    def read_records(self, keys: Sequence[bytes], *, ns: str) -> list[tuple[memoryview, bytes] | None]:
        """As get_many, with each record's meta (the bytes between its key and its payload, checked by the
        header's xxh3 like the rest: the L2 adapter keeps its layout fingerprint there)."""
        return self._with_repoll(keys, ns, self._fetch_with_meta)

    def _with_repoll(self, keys: Sequence[bytes], ns: str,
                     fetch: Callable[[list[IndexEntry]], Sequence[T]]) -> list[T | None]:
        try:
            return self._read(keys, ns, fetch)
        except RemoteObjectMissing:
            self.poll()
        try:
            return self._read(keys, ns, fetch)
        except RemoteObjectMissing:
            out: list[T | None] = []
            for k in keys:
                try:
                    out.append(self._read([k], ns, fetch)[0])
                except RemoteObjectMissing:
                    out.append(None)
            return out

    def _read(self, keys: Sequence[bytes], ns: str,
              fetch: Callable[[list[IndexEntry]], Sequence[T]]) -> list[T | None]:
        located = self.locate_many(keys, ns=ns)
        got = iter(fetch([e for e in located if e is not None]))
        return [None if e is None else next(got) for e in located]

    def _fetch_with_meta(self, entries: list[IndexEntry]) -> list[tuple[memoryview, bytes]]:
        """The reader's coalesced runs, fetched in parallel, each record verified by the reader."""
        reader = self.reader
        runs = plan_runs(entries, reader.max_gap, reader.max_run)
        out: list[tuple[memoryview, bytes]] = [(memoryview(b""), b"")] * len(entries)

        def one(run: tuple[str, int, int, list[int]]) -> list[tuple[int, tuple[memoryview, bytes]]]:
            key, start, end, members = run
            raw = self.objects.get_ranges(key, [(start, end)])[0]
            if len(raw) != end - start:
                raise CorruptionError(f"{key}: asked bytes [{start}, {end}), got {len(raw)}")
            done = []
            for i in members:
                e = entries[i]
                rec = raw[e.offset - start: e.offset - start + e.record_len]
                payload = reader.verify(e, rec)  # the engine's corruption errors on any mismatch or short read
                info = reader.backend.decode_record(rec[: e.payload_off])
                meta_at = RECORD_HEADER_SIZE + info.key_len
                done.append((i, (payload, bytes(rec[meta_at: meta_at + info.meta_len]))))
            return done
        for part in self._io().map(one, runs):
            for i, item in part:
                out[i] = item
        return out
