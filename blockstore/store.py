"""The Store: the engine's public API. It checks arguments and delegates to the engine's parts:

- opening.py and manifest.py open (or create) the store; blocks.py and directory.py own its files;
- writer.py (WriteEngine, over blocklife.py and leader.py) applies writes by group commit, placing
  records with placement.py; recovery.py runs at an open after a crash;
- reader.py reads located records into page-aligned or caller-owned buffers, verified;
- chunks.py and tensors.py are the chunk-record and tensor APIs, composed here.

Compaction (blockstore.compaction) is a plugin started by name; the engine never imports it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

from blockstore import foreground
from blockstore.backend import Backend, get_backend
from blockstore.blocklife import Evicted
from blockstore.blocks import BlockFiles
from blockstore.chunks import ChunkRecords
from blockstore.directory import BLOCK_OPEN, BlockEntry, Directory, Location
from blockstore.errors import BlockstoreError, InvalidArgument, NoSpace, NotFound, ReadOnlyStore, StoreClosed
from blockstore.keys import SPACE_KV, TOMBSTONE_META, key_suffix
from blockstore.lock import WriterLock
from blockstore.manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST,
    load_manifest,
    new_manifest,
    recorded_durability,
    valid_block_size,
    write_manifest_file,
)
from blockstore.mutations import Mutation, kv_mutations, partition_of
from blockstore.opening import (
    DIRECTORY,
    announce_open,
    check_manifest_names_the_blocks,
    check_options,
    check_store_layout,
    check_store_path,
    make_store_dirs,
    refuse_lost_manifest,
)
from blockstore.placement import OpenBlocks
from blockstore.reader import Reader, ReadObserver
from blockstore.records import Buffer, Kind
from blockstore.reserve import SpaceReserve
from blockstore.stats import StoreStats, measure
from blockstore.store_compaction import CompactionSeams
from blockstore.store_listing import Listings
from blockstore.store_records import DEFAULT_NAMESPACE, RecordConveniences
from blockstore.store_remote import RemoteSeams
from blockstore.tensors import TensorRecords
from blockstore.tiering import Tiering
from blockstore.validate import check_blocks, check_bool, check_keys, check_locations, check_meta, check_ns, check_out
from blockstore.validate import check_key as _check_key
from blockstore.writer import WriteEngine

Durability = Literal["cache", "sync", "remote"]
OnCorrupt = Literal["raise", "miss"]

_log = logging.getLogger("blockstore")


class Store(RecordConveniences, Listings, RemoteSeams, CompactionSeams):
    """A blockstore store. Use `blockstore.open(...)`; usable as a context manager.

    Thread-safe: any number of threads may read and write concurrently.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        read_only: bool = False,
        durability: Durability = "cache",
        block_size: int | None = None,
        max_open_blocks: int = 64,
        idle_seal_seconds: float = 30.0,
        read_gap: int = 128 << 10,
        read_ahead: bool = True,
        on_corrupt: OnCorrupt = "raise",
        backend: str | None = None,
        compaction: str | dict[str, Any] | None = None,
        allow_non_empty: bool = False,
        remote_seal_seconds: float = 0.2,
        remote_timeout: float = 30.0,
    ) -> None:
        for flag, value in (("create", create), ("read_only", read_only), ("read_ahead", read_ahead),
                            ("allow_non_empty", allow_non_empty)):
            check_bool(flag, value)
        fs_path = check_options(path, durability=durability, block_size=block_size, max_open_blocks=max_open_blocks,
                                 idle_seal_seconds=idle_seal_seconds, read_gap=read_gap, on_corrupt=on_corrupt,
                                 remote_seal_seconds=remote_seal_seconds, remote_timeout=remote_timeout)
        self.path = fs_path
        self._allow_non_empty = allow_non_empty
        self.read_only = read_only
        self.durability: Durability = durability
        # "remote" is "sync" on the local disk, plus the wait for the object store (tiering.py)
        self._local_durability = "sync" if durability == "remote" else durability
        self._remote_waits = (remote_seal_seconds, remote_timeout)
        # None: the store's own (its MANIFEST records the size it was created with); a size given for an
        # existing store applies to the blocks opened from now on
        self._block_size_given = block_size is not None
        self.block_size = block_size if block_size is not None else DEFAULT_BLOCK_SIZE
        self.max_open_blocks = max_open_blocks
        self.idle_seal_seconds = idle_seal_seconds
        self.read_gap = read_gap
        self.read_ahead = bool(read_ahead)
        self.on_corrupt: OnCorrupt = on_corrupt
        self.backend: Backend = get_backend(backend)
        self._closed = False
        self._lock = WriterLock(self.path)
        self.recovery_report: dict[str, Any] | None = None
        self._read_observers: list[ReadObserver] = []  # the Reader's (tests look at it)
        self.compactor: Any = None
        self._tensors = TensorRecords(self)

        self._open_files(create)
        if compaction is not None:
            if read_only:
                self.close()
                raise InvalidArgument("compaction needs a writable store (read_only=True given)")
            # the engine does not depend on compaction: it is a plugin the store starts by name
            try:
                self.compactor = importlib.import_module("blockstore.compaction").attach(self, compaction)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ open / close

    def _open_files(self, create: bool) -> None:
        check_store_path(self.path, create, self.read_only, self._allow_non_empty)
        manifest_path = os.path.join(self.path, MANIFEST)
        exists = os.path.exists(manifest_path)
        if not exists:
            refuse_lost_manifest(self.path)
            if not create or self.read_only:
                raise NotFound(f"no store at {self.path!r} (no {MANIFEST}); pass create=True to make one")
            make_store_dirs(self.path, self.backend)
        else:
            check_store_layout(self.path)
        if not self.read_only:
            self._lock.acquire(self.path)
        directory: Directory | None = None
        try:
            # A new store's MANIFEST is written last, once its directory exists: a creation cut short
            # (kill -9, an I/O error) then leaves no MANIFEST, and the next open simply creates again.
            # Written first, it made a store that no open could ever load (found by tests/test_faults.py).
            manifest = (load_manifest(self.path) if exists
                        else new_manifest(block_size=self.block_size, durability=self._local_durability))
            self.store_id = int(manifest["store_id"])
            recorded = manifest.get("block_size")
            if not self._block_size_given and valid_block_size(recorded):
                self.block_size = recorded
            self._reserve = SpaceReserve(self.path, self.block_size)
            if exists and not self.read_only:
                check_manifest_names_the_blocks(self.path, self.store_id, self.backend)
            local = self._local_durability
            self.blocks = BlockFiles(self.path, self.backend, self.store_id, sync=local == "sync")
            # the WAL on disk was written under the last writer's durability (MANIFEST "durability")
            last_durability = recorded_durability(manifest, local)
            if not self.read_only:
                self._reserve.before_open()  # a full disk: the directory's recovery takes the reserve's room
            self.dir = directory = Directory(os.path.join(self.path, DIRECTORY), read_only=self.read_only,
                                             sync=local == "sync", create=not exists,
                                             strict_wal=last_durability == "sync", block_files=self.blocks.list_files)
            self._placement = OpenBlocks(path=self.path, directory=directory, blocks=self.blocks,
                                         block_size=self.block_size, max_open_blocks=self.max_open_blocks,
                                         idle_seal_seconds=self.idle_seal_seconds)
            self._engine = WriteEngine(path=self.path, read_only=self.read_only, durability=local,
                                       backend=self.backend, directory=directory, blocks=self.blocks,
                                       store_id=self.store_id, placement=self._placement, check_open=self._check_open)
            self._reader = Reader(path=self.path, directory=directory, blocks=self.blocks, backend=self.backend,
                                  read_gap=self.read_gap, read_ahead=self.read_ahead, on_corrupt=self.on_corrupt,
                                  block_named=self._engine.block_named)
            self._reader.observers = self._read_observers
            # placement scores its two ways of placing a namespace on the requests served (placement_choice.py)
            self._read_observers.append(self._placement.choice.observe)
            self._tiering = Tiering(self._engine, remote_seal_seconds=self._remote_waits[0],
                                    remote_timeout=self._remote_waits[1])
            self._reader.remote_name_of = self._tiering.remote_name
            self._chunks = ChunkRecords(check_open=self._check_open, namespace_id=self.namespace_id,
                                        submit=self._submit, read=self._reader.read, directory=directory)
            self._engine.last_durability = last_durability  # recovery: what a crashed session promised
            self._engine.load_state(fresh=not exists)  # its directory writes are all synced, in either mode
            if exists and not self.read_only and last_durability != local:
                # this session's mode, for how the next open reads its WAL: only once recovery is done (written
                # before, a refused or killed open left the crashed session judged by the wrong mode: session 26b)
                self._write_manifest(manifest_path, {**manifest, "durability": local})
            self._tiering.adopt_table(remote_durability=self.durability == "remote")
            self.recovery_report = self._engine.recovery_report
            if not exists:
                # blocks/ and directory/ are named durably before the MANIFEST can be: a rename may
                # reach the disk before an earlier mkdir (POSIX orders neither)
                self.backend.dir_sync(self.path)
                self._write_manifest(manifest_path, manifest)
            announce_open(self, created=not exists)
        except BaseException:
            if directory is not None:
                directory.close()  # else RocksDB's lock outlives the failed open inside this process
            self._lock.release()
            raise

    def _write_manifest(self, p: str, m: dict[str, Any]) -> None:
        write_manifest_file(p, m)
        self.backend.dir_sync(self.path)

    def close(self) -> None:
        """Stop compaction, seal open blocks, make everything durable, mark the store clean. Idempotent."""
        if self._closed:
            return
        if self.compactor is not None:
            compactor, self.compactor = self.compactor, None
            try:
                compactor.stop()
            except BlockstoreError as exc:  # its copies are committed or not: nothing acknowledged is at stake
                _log.warning("compactor stop failed: %s", exc)
        failed: BlockstoreError | None = None
        try:
            if not self.read_only:
                failed = self._engine.close_writes()
        except NoSpace as exc:
            raise self._engine.no_space(exc, closing=True) from exc
        finally:
            self._closed = True
            self._tiering.store_closed()
            self.blocks.close()
            self.dir.close()
            self._lock.release()
        if failed is not None:
            # the store is closed but not clean (the next open recovers it); the caller must hear that
            # what it wrote is not known to be durable. Swallowed, a cache-mode store lost puts made
            # before a close that had returned normally (found by tests/test_faults.py).
            raise self._engine.no_space(failed, closing=True) if isinstance(failed, NoSpace) else failed

    def abandon(self) -> None:
        """Drop the store without sealing or marking it clean, as a crash would (tests only).
        The directory is closed as kill -9 leaves it: every write it acknowledged is in its WAL."""
        if self.compactor is not None:
            self.compactor.stop(flush=False)
            self.compactor = None
        self._closed = True
        self._placement.drop_fds(self.backend)
        self.blocks.close()
        self.dir.close()
        self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.path!r} is closed")
        if write and self.read_only:
            raise ReadOnlyStore(f"store {self.path!r} was opened read-only")

    # ------------------------------------------------------------------ namespaces

    def namespaces(self) -> list[str]:
        return sorted(self._engine.ns_ids)

    def namespace_id(self, ns: str) -> int | None:
        """The directory's id of namespace `ns`, None if it does not exist yet. It is the first part of
        every directory key suffix of the namespace's records (`blockstore.keys.key_suffix`), as read
        observers and `Directory.block_records` give them; an id is never reused."""
        return self._engine.ns_ids.get(check_ns(ns))

    # ------------------------------------------------------------------ writes

    def put(self, key: bytes, value: Buffer, *, ns: str = DEFAULT_NAMESPACE, meta: bytes = b"",
            partition: bytes | str | None = None) -> None:
        """Store `value` under `key` (replacing any previous value: the old record becomes dead)."""
        _check_key(key)
        meta = check_meta(meta)
        self.put_many([(key, value)], ns=ns, metas=[meta] if meta else None, partition=partition)

    def put_many(self, items: Sequence[tuple[bytes, Buffer]], *, ns: str = DEFAULT_NAMESPACE,
                 metas: Sequence[bytes] | None = None, partition: bytes | str | None = None) -> None:
        """Store many values. Records of one call are written next to each other (same partition).

        Each record is atomic; the call as a whole is not (a failure part-way leaves a prefix).
        In `sync` mode every record is durable when this returns.
        """
        self._check_open(write=True)
        check_ns(ns)
        part = partition_of(ns, partition)
        self._submit(kv_mutations(ns, part, items, metas))

    def delete(self, key: bytes, *, ns: str = DEFAULT_NAMESPACE) -> bool:
        """Delete `key`: writes a tombstone. Returns whether the key existed."""
        return self.delete_many([_check_key(key)], ns=ns)[0]

    def delete_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[bool]:
        self._check_open(write=True)
        check_ns(ns)
        part = partition_of(ns, None)
        muts = [Mutation(ns, SPACE_KV, k, Kind.TOMBSTONE, part, TOMBSTONE_META[SPACE_KV]) for k in check_keys(keys)]
        self._submit(muts)
        return [bool(m.result) for m in muts]

    def _submit(self, muts: list[Mutation]) -> None:
        """A user write (put, delete, chunk records): group commit, then in `remote` mode the wait until
        its block's object is confirmed (tiering.py). Relocation's copies do not wait: not acknowledged
        to anyone, and their source's object already holds the record. A write that adds data waits for room
        while the space reserve is given up, and a delete is refused while free space is below 3/4 of it (room kept
        for close, reopen and compaction); the first NoSpace gives it up (reserve.py)."""
        if self._engine.bytes_put_total >= self._reserve.check_at and any(m.kind != Kind.TOMBSTONE for m in muts):
            self._reserve.admit(self._engine.bytes_put_total)
        elif self._reserve.given_up:
            self._reserve.admit_delete()
        try:
            if self.durability != "remote":
                self._engine.submit(muts)
                return
            self._tiering.check_attached()  # before anything is written: a put that can never be confirmed
            self._engine.submit(muts)
        except NoSpace:
            self._reserve.give_up("a write found the disk full")
            raise
        self._tiering.wait_confirmed(self._tiering.newest_block())

    # ------------------------------------------------------------------ observation and relocation

    def add_read_observer(self, observe: Callable[[Sequence[bytes], Sequence[Location | None]], None]) -> None:
        """Call `observe(key suffixes, locations)` with every batched read (one request), after its
        lookup. Compaction learns co-access this way. Observers run on the reader's thread: keep them
        cheap; their exceptions are logged, never raised into the read."""
        if not callable(observe):
            raise InvalidArgument(f"observe must be callable, not {type(observe).__name__}")
        self._read_observers.append(observe)

    def request(self) -> AbstractContextManager[None]:
        """`with store.request():` every read this thread makes inside (get_many, get_chunks, ...) is one
        request to the read observers: compaction learns a request that reads chunk and KV records as one."""
        return self._reader.request()

    def remove_read_observer(self, observe: Callable[[Sequence[bytes], Sequence[Location | None]], None]) -> None:
        if observe in self._read_observers:
            self._read_observers.remove(observe)

    def read_locations(self, locs: Sequence[Location]) -> list[memoryview]:
        """Read and verify the payloads at these places (raises on corruption whatever on_corrupt says:
        a relocation must never copy bad bytes)."""
        self._check_open()
        return self._reader.read_locations(check_locations(locs))

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes, *, ns: str = DEFAULT_NAMESPACE) -> bytes | None:
        """The value stored under `key`, or None."""
        got = self.get_many([_check_key(key)], ns=ns)[0]
        return None if got is None else bytes(got)

    def get_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE,
                 out: Sequence[Buffer] | None = None) -> list[Any]:
        """Batched read: one request. Without `out`, returns a page-aligned memoryview per key (None
        for a miss). With `out` (one writable buffer per key, large enough), fills them without a copy
        and returns each payload's length (None for a miss)."""
        self._check_open()
        nid = self.namespace_id(ns)
        keys = check_keys(keys)
        out = check_out(out, len(keys))
        if nid is None:
            return [None] * len(keys)
        return self._reader.read(nid, SPACE_KV, keys, out)

    def read_located(self, keys: Sequence[bytes], locs: Sequence[Location | None], *, ns: str = DEFAULT_NAMESPACE,
                     out: Sequence[Buffer] | None = None) -> list[Any]:
        """`get_many(keys, ns=ns, out=out)` for keys the caller has just looked up with `locate_many`
        (`locs`, one per key): reads these located records into these buffers without a second directory
        lookup. Read observers see it as a read; a record that compaction moved since the lookup is
        looked up again, so the result is what get_many would have returned at some point since."""
        self._check_open()
        nid = self.namespace_id(ns)
        keys = check_keys(keys)
        locs = check_locations(locs, len(keys))
        out = check_out(out, len(keys))
        if nid is None:
            return [None] * len(keys)
        return self._reader.read(nid, SPACE_KV, keys, out, located=locs)

    def contains_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[bool]:
        return [loc is not None for loc in self.locate_many(keys, ns=ns)]

    def recent_reads(self, since: float) -> list[float]:
        """Seconds each read took (get_many, read_located, get_chunks, ...) among the last 1,024 that
        ended after `time.perf_counter()` was `since`: compaction paces itself by them."""
        if isinstance(since, bool) or not isinstance(since, (int, float)):
            raise InvalidArgument(f"since must be a number (a time.perf_counter() value), not {type(since).__name__}")
        return self._reader.recent_reads(since)

    def locate_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[Location | None]:
        """Where each key's live record is (for tools, compaction and benchmarks)."""
        self._check_open()
        nid = self.namespace_id(ns)
        keys = check_keys(keys)
        if nid is None:
            return [None] * len(keys)
        foreground.READS.append(None)  # a foreground lookup: background work steps aside (foreground.py)
        try:
            return self.dir.get_locations([key_suffix(nid, SPACE_KV, k) for k in keys])
        finally:
            foreground.READS.pop()

    # ------------------------------------------------------------------ stats

    def stats(self) -> StoreStats:
        self._check_open()
        with self._engine.state_lock:
            blocks = list(self._engine.table.values())
            open_blocks = sum(1 for e in blocks if e.state == BLOCK_OPEN)
            bytes_put, bytes_written = self._engine.bytes_put_total, self._engine.bytes_written_total
        return measure(blocks, open_blocks, bytes_put, bytes_written, self.blocks.list_files(),
                       self.dir.size_on_disk(os.path.join(self.path, DIRECTORY)))

    def sync_moves(self) -> list[int]:
        """One synced directory write, then delete the blocks moves emptied (blocklife.sync_moves)."""
        return self._engine.sync_moves()

    def reclaim_empty_blocks(self) -> list[int]:
        """Delete sealed blocks that hold nothing live and no tombstone; returns their ids."""
        return self._engine.reclaim_empty_blocks()

    def evict_blocks(self, block_ids: Sequence[int]) -> Evicted:
        """A cache's capacity path: remove these sealed blocks and every key the directory still places in
        them (compare-and-swap on the location: a key overwritten or moved since stays) in one synced
        directory write, without tombstones; refuses a block when a block that stays may hold an older
        record of one of its keys (blocklife.evict_blocks says why that is safe). Returns the blocks
        removed, the (key suffix, location) of each key removed, and the blocks refused."""
        self._check_open(write=True)
        return self._engine.evict_blocks(check_blocks(block_ids))

    def hold_blocks(self, block_ids: Sequence[int]) -> Any:
        """Context manager: these blocks' files outlive any deletion until it exits (a compactor holds
        its sources between listing their records and reading them)."""
        return self.blocks.pinned(check_blocks(block_ids))

    def block_read_fd(self, block_id: int) -> int | None:
        """A read-only descriptor of a block held with `hold_blocks`, for a caller that reads and verifies
        records itself with `backend.read_files` (the blend's one-call layer loader); None when the block
        has no local file (deleted, or dropped to the remote tier: read through `read_located`). The
        descriptor belongs to the store: valid while the hold lasts, never closed by the caller."""
        try:
            return self.blocks.read_fd(check_blocks([block_id], "block_id")[0])
        except NotFound:
            return None

    def io_counters(self) -> tuple[int, int]:
        """(logical bytes users put, bytes appended to block files): write amplification's terms."""
        return self._engine.io_counters()

    def open_block_min_seqs(self) -> dict[int, int]:
        """Lowest sequence number in each block still being appended (0: nothing in it yet)."""
        return self._placement.min_seqs()

    def has_block(self, block_id: int) -> bool:
        """Whether the block table names this block (O(1): compaction asks it per victim)."""
        return self._engine.block_named(block_id)

    def block_table(self, *, after: int | None = None) -> list[BlockEntry]:
        """A snapshot of the block table in block order (for tools and compaction); `after`: only the
        blocks with a higher id (the remote uploader's cursor: it copies what it looks at, not the table)."""
        with self._engine.state_lock:
            entries = [e for bid, e in self._engine.table.items() if after is None or bid > after]
        # copied outside the lock (entries are replaced, never changed in place), with checkpoints: compaction
        # copies the whole table every pass (foreground.py)
        return [e.copy() for e in foreground.stepping(sorted(entries, key=lambda e: e.block_id))]

    def drop_page_cache(self) -> None:
        """Evict this store's block files from the OS page cache (cold-read benchmarks)."""
        self.blocks.drop_page_cache()


def open_store(path: str | os.PathLike[str], **kwargs: Any) -> Store:
    return Store(path, **kwargs)

