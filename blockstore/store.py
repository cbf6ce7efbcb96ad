"""The Store: the engine's public API over blocks, the directory and the I/O backend.

Write path (docs/format.md §3): callers enqueue mutations; one thread at a time becomes the group
leader, appends everything queued to the right blocks (one `pwritev` per block, and in `sync` mode
one fdatasync per block), then writes one directory batch, then wakes every caller of the group.
So in `sync` mode concurrent writers share fsyncs (group commit), and a put is acknowledged only
after its bytes and its directory entry are durable.

Read path: one directory multi-get, then per block one C call that coalesces neighbouring records
into one `preadv` straight into page-aligned (or caller-owned) buffers and verifies each payload's
xxh3 before it is returned (invariant 1).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from blockstore.backend import Backend, get_backend
from blockstore.blocks import BLOCKS_DIR, BlockFiles
from blockstore.chunks import Chunk, ChunkRecords, ChunkWrite
from blockstore.directory import (
    BLOCK_OPEN,
    BlockEntry,
    Directory,
    DirectoryBatch,
    Location,
)
from blockstore.errors import (
    BlockstoreError,
    CorruptionError,
    InvalidArgument,
    NoSpace,
    NotFound,
    ReadOnlyStore,
    StoreClosed,
    error_for_os,
)
from blockstore.keys import (
    SPACE_KV,
    TOMBSTONE_META,
    key_suffix,
    keys_prefix,
)
from blockstore.lock import LOCK_FILE, WriterLock
from blockstore.manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST,
    load_manifest,
    new_manifest,
    valid_block_size,
    write_manifest_file,
)

# Re-exported only for blockstore/tools/ (fsck, repair), which import them from here until they import
# blockstore.manifest (issue 14); nothing else may use these names.
from blockstore.manifest import MAX_BLOCK as _MAX_BLOCK  # noqa: F401  isort: skip
from blockstore.manifest import MIN_BLOCK as _MIN_BLOCK  # noqa: F401  isort: skip
from blockstore.mutations import Mutation
from blockstore.placement import OpenBlocks
from blockstore.reader import Reader, ReadObserver
from blockstore.writer import WriteEngine

# Re-exported only for bench/ (gpu_path, ceilings, throughput, scaling), which import it from here until
# they import blockstore.reader (issue 14); nothing else may use the name.
from blockstore.reader import aligned_buffer as aligned_buffer  # noqa: F401  isort: skip
from blockstore.records import (
    PAGE,
    REC_ALIGNED,
    Buffer,
    Kind,
)
from blockstore.tensors import TensorRecords
from blockstore.validate import (
    check_bool,
    check_keys,
    check_meta,
    check_ns,
    check_out,
    check_pairs,
    check_seq,
    payload_view,
)
from blockstore.validate import check_key as _check_key

Durability = Literal["cache", "sync"]
OnCorrupt = Literal["raise", "miss"]

DIRECTORY = "directory"
_log = logging.getLogger("blockstore")

DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class StoreStats:
    records: int
    live_bytes: int
    live_logical_bytes: int
    written_bytes: int
    blocks: int
    open_blocks: int
    block_file_bytes: int
    directory_bytes: int
    bytes_put: int
    bytes_appended: int
    space_amplification: float
    write_amplification: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


# What a creation of ours cut short leaves before the MANIFEST is written (Store._open_files), and
# lost+found (fsck --repair's, or a file system's root when a store is made at a mount point): a
# directory holding nothing else may be created into.
_CREATION_LEFTOVERS = frozenset({BLOCKS_DIR, DIRECTORY, LOCK_FILE, MANIFEST + ".tmp", "lost+found"})


def _check_store_path(path: str, create: bool, read_only: bool, allow_non_empty: bool) -> None:
    """Refuse, before anything is written, a path that cannot be a store: a file (or a path through
    one), or, where a store would be created, a non-empty directory that is not a store (unless
    `allow_non_empty`): creating into someone's data directory must never happen by mistake."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return  # created (with its parents) by _open_files
    except NotADirectoryError:
        raise InvalidArgument(f"path {path!r} is not a directory: a component of it is a file") from None
    except OSError as exc:
        raise error_for_os(exc, f"open store {path!r}") from exc
    if not os.path.isdir(path):
        raise InvalidArgument(f"path {path!r} is not a directory (a store is a directory)")
    if not create or read_only or allow_non_empty or os.path.lexists(os.path.join(path, MANIFEST)):
        return
    try:
        foreign = sorted(set(os.listdir(path)) - _CREATION_LEFTOVERS)
        blocks_dir = os.path.join(path, BLOCKS_DIR)
        lost_manifest = os.path.isdir(blocks_dir) and any(n.endswith(".blk") for n in os.listdir(blocks_dir))
    except OSError as exc:
        raise error_for_os(exc, f"list {path!r}") from exc
    if foreign and not lost_manifest:  # a lost MANIFEST: _open_files says so (CorruptionError)
        shown = ", ".join(repr(n) for n in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise InvalidArgument(
            f"path {path!r} is a non-empty directory that is not a store (no {MANIFEST}; it holds {shown}): "
            "pass allow_non_empty=True to create a store in it anyway"
        )


def _check_options(path: Any, *, durability: Any, block_size: Any, max_open_blocks: Any, idle_seal_seconds: Any,
                   read_gap: Any, on_corrupt: Any) -> str:
    """Store()'s arguments checked before anything is touched; the path as a str."""
    try:
        fs_path = os.fspath(path)
    except TypeError:
        raise InvalidArgument(f"path must be a str or os.PathLike, not {type(path).__name__}") from None
    if not isinstance(fs_path, str) or not fs_path or "\0" in fs_path:
        raise InvalidArgument(f"path must be a non-empty str without NUL characters, got {fs_path!r}")
    if durability not in ("cache", "sync"):
        raise InvalidArgument(f"durability must be 'cache' or 'sync', got {durability!r}")
    if block_size is not None and not valid_block_size(block_size):
        raise InvalidArgument(f"block_size must be an int between 64 KiB and 1 TiB, got {block_size!r}")
    if isinstance(max_open_blocks, bool) or not isinstance(max_open_blocks, int) or max_open_blocks < 1:
        raise InvalidArgument(f"max_open_blocks must be a positive int, got {max_open_blocks!r}")
    if on_corrupt not in ("raise", "miss"):
        raise InvalidArgument(f"on_corrupt must be 'raise' or 'miss', got {on_corrupt!r}")
    if isinstance(idle_seal_seconds, bool) or not isinstance(idle_seal_seconds, (int, float)) \
            or not idle_seal_seconds >= 0:
        raise InvalidArgument(f"idle_seal_seconds must be a number >= 0 (0 disables), got {idle_seal_seconds!r}")
    if isinstance(read_gap, bool) or not isinstance(read_gap, int) or not 0 <= read_gap <= (64 << 20):
        raise InvalidArgument(f"read_gap must be an int within 0..64 MiB, got {read_gap!r}")
    return fs_path


class Store:
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
        max_open_blocks: int = 16,
        idle_seal_seconds: float = 30.0,
        read_gap: int = 128 << 10,
        read_ahead: bool = True,
        on_corrupt: OnCorrupt = "raise",
        backend: str | None = None,
        compaction: str | dict[str, Any] | None = None,
        allow_non_empty: bool = False,
    ) -> None:
        for flag, value in (("create", create), ("read_only", read_only), ("read_ahead", read_ahead),
                            ("allow_non_empty", allow_non_empty)):
            check_bool(flag, value)
        fs_path = _check_options(path, durability=durability, block_size=block_size, max_open_blocks=max_open_blocks,
                                 idle_seal_seconds=idle_seal_seconds, read_gap=read_gap, on_corrupt=on_corrupt)
        self.path = fs_path
        self._allow_non_empty = allow_non_empty
        self.read_only = read_only
        self.durability: Durability = durability
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
        _check_store_path(self.path, create, self.read_only, self._allow_non_empty)
        manifest_path = os.path.join(self.path, MANIFEST)
        exists = os.path.exists(manifest_path)
        if not exists:
            if not create or self.read_only:
                raise NotFound(f"no store at {self.path!r} (no {MANIFEST}); pass create=True to make one")
            blocks_dir = os.path.join(self.path, BLOCKS_DIR)
            if os.path.isdir(blocks_dir) and any(n.endswith(".blk") for n in os.listdir(blocks_dir)):
                # A creation cut short leaves no block file (blocks are made only by an open store), so
                # these belong to a store whose MANIFEST was lost: creating over it would reuse block ids
                # and overwrite acknowledged data.
                raise CorruptionError(f"{self.path!r} has block files but no {MANIFEST}: its MANIFEST was lost; "
                                      "`blockstore fsck --repair` re-creates it from the block headers")
            # Each directory made here is durable before anything is put in it: a new name survives a
            # power cut only once its parent directory is fsynced, and a store made at a new path was
            # otherwise lost whole (the next open then made an empty one; tests/power_loss.py).
            made = []
            d = os.path.abspath(blocks_dir)
            while not os.path.isdir(d):
                made.append(d)
                d = os.path.dirname(d)
            os.makedirs(blocks_dir, exist_ok=True)
            for d in made:  # bottom-up: each new directory's parent
                self.backend.dir_sync(os.path.dirname(d))
        if not self.read_only:
            self._lock.acquire(self.path)
        directory: Directory | None = None
        try:
            # A new store's MANIFEST is written last, once its directory exists: a creation cut short
            # (kill -9, an I/O error) then leaves no MANIFEST, and the next open simply creates again.
            # Written first, it made a store that no open could ever load (found by tests/test_faults.py).
            manifest = (load_manifest(self.path) if exists
                        else new_manifest(block_size=self.block_size, durability=self.durability))
            self.store_id = int(manifest["store_id"])
            recorded = manifest.get("block_size")
            if not self._block_size_given and valid_block_size(recorded):
                self.block_size = recorded
            self.blocks = BlockFiles(self.path, self.backend, self.store_id, sync=self.durability == "sync")
            # the WAL on disk was written under the last writer's durability (MANIFEST "durability")
            last_durability = manifest.get("durability", self.durability)
            self.dir = directory = Directory(
                os.path.join(self.path, DIRECTORY),
                read_only=self.read_only,
                sync=self.durability == "sync",
                create=not exists,
                strict_wal=last_durability == "sync",
            )
            self._reader = Reader(path=self.path, directory=directory, blocks=self.blocks, backend=self.backend,
                                  read_gap=self.read_gap, read_ahead=self.read_ahead, on_corrupt=self.on_corrupt,
                                  block_named=self._block_named)
            self._reader.observers = self._read_observers
            self._placement = OpenBlocks(path=self.path, directory=directory, blocks=self.blocks,
                                         block_size=self.block_size, max_open_blocks=self.max_open_blocks,
                                         idle_seal_seconds=self.idle_seal_seconds)
            self._engine = WriteEngine(path=self.path, read_only=self.read_only, durability=self.durability,
                                       backend=self.backend, directory=directory, blocks=self.blocks,
                                       store_id=self.store_id, placement=self._placement, check_open=self._check_open)
            self._chunks = ChunkRecords(check_open=self._check_open, namespace_id=self.namespace_id,
                                        submit=self._engine.submit, read=self._reader.read, directory=directory)
            if exists and not self.read_only and last_durability != self.durability:
                # before this session writes: its WAL is read back under this mode's rule
                manifest["durability"] = self.durability
                self._write_manifest(manifest_path, manifest)
            self._engine.load_state(fresh=not exists)
            self.recovery_report = self._engine.recovery_report
            if not exists:
                # blocks/ and directory/ are named durably before the MANIFEST can be: a rename may
                # reach the disk before an earlier mkdir (POSIX orders neither)
                self.backend.dir_sync(self.path)
                self._write_manifest(manifest_path, manifest)
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
                with self._engine.slot.exclusive():
                    self._engine.settle_failed_commit()  # before a footer goes where a replayed commit put records
                    failed = self._engine.seal_all()
                    self.dir.flush()
                    if failed is None:
                        b = DirectoryBatch()
                        b.put_meta("clean", 1)
                        self.dir.write(b, force_sync=True)
        except NoSpace as exc:
            raise self._engine.no_space(exc, closing=True) from exc
        finally:
            self._closed = True
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
        for ob in list(self._placement.open.values()) + self._placement.retired:
            try:
                self.backend.close(ob.fd)
            except BlockstoreError:
                pass
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

    _ns_id = namespace_id  # the engine's own spelling

    def _block_named(self, bid: int) -> bool:
        with self._engine.state_lock:
            return bid in self._engine.table

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
        part = self._partition(ns, partition)
        pairs = check_pairs("items", items, "(key, value)")
        if metas is not None:
            metas = check_seq("metas", metas, "bytes (one per item)")
            if len(metas) != len(pairs):
                raise InvalidArgument(f"metas has {len(metas)} entries for {len(pairs)} items: give one per item")
        muts = []  # every item is checked before any is queued: a bad one writes nothing of this call
        for i, (key, value) in enumerate(pairs):
            meta = check_meta(metas[i], f"metas[{i}]") if metas else b""
            muts.append(Mutation(ns, SPACE_KV, _check_key(key, f"items[{i}] key"), Kind.KV, part, meta,
                                  payload_view(value)))
        self._engine.submit(muts)

    def delete(self, key: bytes, *, ns: str = DEFAULT_NAMESPACE) -> bool:
        """Delete `key`: writes a tombstone. Returns whether the key existed."""
        return self.delete_many([_check_key(key)], ns=ns)[0]

    def delete_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[bool]:
        self._check_open(write=True)
        check_ns(ns)
        part = self._partition(ns, None)
        muts = [Mutation(ns, SPACE_KV, k, Kind.TOMBSTONE, part, TOMBSTONE_META[SPACE_KV]) for k in check_keys(keys)]
        self._engine.submit(muts)
        return [bool(m.result) for m in muts]

    def _partition(self, ns: str, partition: bytes | str | None) -> bytes:
        base = ns.encode()
        if partition is None:
            return base
        if isinstance(partition, str):
            try:
                p = partition.encode()
            except UnicodeEncodeError:
                raise InvalidArgument("partition must be valid UTF-8 (it holds a lone surrogate)") from None
        elif isinstance(partition, (bytes, bytearray, memoryview)):
            p = bytes(partition)
        else:
            raise InvalidArgument(f"partition must be bytes, a str or None, not {type(partition).__name__}")
        if len(p) > 4096:
            raise InvalidArgument("partition must be at most 4096 bytes")
        return base + b"\0" + p

    # ------------------------------------------------------------------ observation and relocation

    def add_read_observer(self, observe: Callable[[Sequence[bytes], Sequence[Location | None]], None]) -> None:
        """Call `observe(key suffixes, locations)` with every batched read (one request), after its
        lookup. Compaction learns co-access this way. Observers run on the reader's thread: keep them
        cheap; their exceptions are logged, never raised into the read."""
        if not callable(observe):
            raise InvalidArgument(f"observe must be callable, not {type(observe).__name__}")
        self._read_observers.append(observe)

    def remove_read_observer(self, observe: Callable[[Sequence[bytes], Sequence[Location | None]], None]) -> None:
        if observe in self._read_observers:
            self._read_observers.remove(observe)

    def relocate_many(self, moves: Sequence[tuple[bytes, Location, Buffer]], *, partition: bytes,
                      together: bool = False, drop_tombstones: Sequence[tuple[bytes, Location]] = ()) -> list[bool]:
        """Copy records to the open block of `partition` and re-point each key only if the directory
        still names its old place, in the same atomic batch that updates both blocks' counters.

        `moves` are (directory key suffix, the location read, its verified payload), as
        `Directory.block_records` and `read_locations` give them. Returns, per move, whether it
        happened (False: the key was overwritten or deleted meanwhile, and stays so). This is the
        compare-and-swap compaction is built on (docs/format.md §5.2).

        A move whose location is a tombstone's (kind `tombstone`, empty payload) carries the tombstone
        to the new block, keeping its sequence number, unless the key was written again since.
        `drop_tombstones` retires tombstones from their block without a copy: the caller has proved
        that no older record of the key is left anywhere. `together=True` keeps the moves in one block:
        if the open block cannot take all of them, a fresh one is started first."""
        self._check_open(write=True)
        if not isinstance(partition, (bytes, bytearray)):
            raise InvalidArgument(f"relocate_many: partition must be bytes, not {type(partition).__name__}")
        check_bool("together", together)
        muts = []
        for suffix, loc, payload in moves:
            if len(suffix) < 6:
                raise InvalidArgument("relocate_many: malformed key suffix")
            xxh = None if loc.kind == Kind.TOMBSTONE else loc.payload_xxh3
            muts.append(Mutation("", suffix[4], suffix[5:], loc.kind, bytes(partition), loc.meta,
                                  payload_view(payload), xxh, suffix=suffix, expected=loc))
        if together and muts:
            # a page-aligned record may need up to a page more where it lands than where it was
            muts[0].group_need = sum(loc.record_len + (PAGE if loc.flags & REC_ALIGNED else 0) for _s, loc, _p in moves)
        for suffix, loc in drop_tombstones:
            if len(suffix) < 6 or loc.kind != Kind.TOMBSTONE:
                raise InvalidArgument("relocate_many: drop_tombstones takes tombstone locations")
            muts.append(Mutation("", suffix[4], suffix[5:], loc.kind, bytes(partition), loc.meta, b"",
                                  suffix=suffix, expected=loc, drop=True))
        if not muts:
            return []
        self._engine.submit(muts)
        return [bool(m.result) for m in muts[: len(moves)]]

    def read_locations(self, locs: Sequence[Location]) -> list[memoryview]:
        """Read and verify the payloads at these places (raises on corruption whatever on_corrupt says:
        a relocation must never copy bad bytes)."""
        self._check_open()
        locs = check_seq("locs", locs, "Locations")
        for i, loc in enumerate(locs):
            if not isinstance(loc, Location):
                raise InvalidArgument(f"locs[{i}] must be a Location, not {type(loc).__name__}")
        return self._reader.read_locations(locs)

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
        nid = self._ns_id(ns)
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
        nid = self._ns_id(ns)
        keys = check_keys(keys)
        locs = check_seq("locs", locs, "Locations or None (one per key)")
        if len(locs) != len(keys):
            raise InvalidArgument(f"locs has {len(locs)} entries for {len(keys)} keys")
        for i, loc in enumerate(locs):
            if loc is not None and not isinstance(loc, Location):
                raise InvalidArgument(f"locs[{i}] must be a Location or None, not {type(loc).__name__}")
        out = check_out(out, len(keys))
        if nid is None:
            return [None] * len(keys)
        return self._reader.read(nid, SPACE_KV, keys, out, located=locs)

    def contains_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[bool]:
        self._check_open()
        nid = self._ns_id(ns)
        keys = check_keys(keys)
        if nid is None:
            return [False] * len(keys)
        return [loc is not None for loc in self.dir.get_locations([key_suffix(nid, SPACE_KV, k) for k in keys])]

    def locate_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[Location | None]:
        """Where each key's live record is (for tools, compaction and benchmarks)."""
        self._check_open()
        nid = self._ns_id(ns)
        keys = check_keys(keys)
        if nid is None:
            return [None] * len(keys)
        return self.dir.get_locations([key_suffix(nid, SPACE_KV, k) for k in keys])

    def iter_keys(self, *, ns: str = DEFAULT_NAMESPACE, prefix: bytes = b"") -> Iterator[bytes]:
        """KV keys of one namespace, in byte order (chunk records are listed by `list_chunks`)."""
        self._check_open()
        if not isinstance(prefix, (bytes, bytearray)):
            raise InvalidArgument(f"prefix must be bytes, not {type(prefix).__name__}")
        nid = self._ns_id(ns)
        if nid is None:
            return
        cut = len(keys_prefix(nid, SPACE_KV))
        for k, _v in self.dir.scan_prefix(keys_prefix(nid, SPACE_KV, bytes(prefix))):
            yield k[cut:]

    def iter_locations(self, *, ns: str = DEFAULT_NAMESPACE, after: bytes | None = None) -> Iterator[tuple[bytes, Location]]:
        """(key, location) of one namespace's KV records in key byte order, starting just after the key
        `after` (None: from the first). One directory scan; a cursor for listings and tools."""
        self._check_open()
        if after is not None and not isinstance(after, (bytes, bytearray)):
            raise InvalidArgument(f"after must be bytes or None, not {type(after).__name__}")
        nid = self._ns_id(ns)
        if nid is None:
            return
        prefix = keys_prefix(nid, SPACE_KV)
        start = None if after is None else prefix + bytes(after) + b"\x00"
        for k, v in self.dir.scan_prefix(prefix, start):
            yield k[len(prefix):], Location.decode(v)

    # ------------------------------------------------------------------ chunk and tensor records

    def put_chunk(self, user_id: str, session_id: str, chunk_id: str, text: str, *,
                  meta: Mapping[str, Any] | None = None, kv_keys: Sequence[bytes] = (),
                  ts_ns: int | None = None, ns: str = DEFAULT_NAMESPACE) -> None:
        """Write (or update: the old record becomes dead) one chunk record."""
        kv = tuple(check_seq("kv_keys", kv_keys, "bytes keys"))  # kv_keys=b"k" is not the keys 107 and so on
        self.put_chunks([ChunkWrite(user_id, session_id, chunk_id, text, meta, kv, ts_ns)], ns=ns)

    def put_chunks(self, chunks: Sequence[ChunkWrite], *, ns: str = DEFAULT_NAMESPACE) -> None:
        """Write many chunk records in one group commit (each record is atomic, the call is not: a
        failure part-way leaves a prefix). One call per chunk costs a directory write each; an agent
        saving a turn's memories, or an import, should batch them here."""
        self._chunks.put_chunks(chunks, ns=ns)

    def get_chunk(self, user_id: str, session_id: str, chunk_id: str, *, ns: str = DEFAULT_NAMESPACE) -> Chunk | None:
        return self.get_chunks([(user_id, session_id, chunk_id)], ns=ns)[0]

    def get_chunks(self, ids: Sequence[tuple[str, str, str]], *, ns: str = DEFAULT_NAMESPACE) -> list[Chunk | None]:
        """Batched read of chunk records (one request)."""
        return self._chunks.get_chunks(ids, ns=ns)

    def list_chunks(self, user_id: str, session_id: str, *, ns: str = DEFAULT_NAMESPACE) -> list[Chunk]:
        """A session's chunks in temporal order (timestamp, then chunk id)."""
        return self._chunks.list_chunks(user_id, session_id, ns=ns)

    def delete_chunk(self, user_id: str, session_id: str, chunk_id: str, *, ns: str = DEFAULT_NAMESPACE) -> bool:
        """Delete a chunk record (tombstone). Returns whether it existed."""
        return self._chunks.delete_chunk(user_id, session_id, chunk_id, ns=ns)

    def put_tensor(self, key: bytes, tensor: Any, *, ns: str = DEFAULT_NAMESPACE,
                   partition: bytes | str | None = None) -> None:
        self.put_tensors([(_check_key(key), tensor)], ns=ns, partition=partition)

    def put_tensors(self, items: Sequence[tuple[bytes, Any]], *, ns: str = DEFAULT_NAMESPACE,
                    partition: bytes | str | None = None) -> None:
        """Store tensors (numpy arrays, CPU torch tensors) next to each other (one partition, one batch)."""
        self._tensors.put_tensors(items, ns=ns, partition=partition)

    def get_tensor(self, key: bytes, *, ns: str = DEFAULT_NAMESPACE, out: Any = None) -> Any:
        return self.get_tensors([_check_key(key)], ns=ns, out=None if out is None else [out])[0]

    def get_tensors(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE,
                    out: Sequence[Any] | None = None) -> list[Any]:
        """Read tensors (one request). With `out`, reads straight into the given tensors, which must
        match the stored dtype and shape; otherwise allocates them. None for a miss."""
        return self._tensors.get_tensors(keys, ns=ns, out=out)

    # ------------------------------------------------------------------ stats

    def stats(self) -> StoreStats:
        self._check_open()
        with self._engine.state_lock:
            blocks = list(self._engine.table.values())
            open_blocks = sum(1 for e in blocks if e.state == BLOCK_OPEN)
            bytes_put, bytes_written = self._engine.bytes_put_total, self._engine.bytes_written_total
        files = self.blocks.list_files()
        file_bytes = 0
        for p in files.values():
            try:
                file_bytes += os.path.getsize(p)
            except OSError:
                pass
        dir_bytes = self.dir.size_on_disk(os.path.join(self.path, DIRECTORY))
        live_logical = sum(e.live_logical_bytes for e in blocks)
        return StoreStats(
            records=sum(e.live_records for e in blocks),
            live_bytes=sum(e.live_bytes for e in blocks),
            live_logical_bytes=live_logical,
            written_bytes=sum(e.written_bytes for e in blocks),
            blocks=len(files),
            open_blocks=open_blocks,
            block_file_bytes=file_bytes,
            directory_bytes=dir_bytes,
            bytes_put=bytes_put,
            bytes_appended=bytes_written,
            space_amplification=(file_bytes + dir_bytes) / live_logical if live_logical else 0.0,
            write_amplification=bytes_written / bytes_put if bytes_put else 0.0,
        )

    def sync_moves(self) -> list[int]:
        """Make the directory durable (one synced write) and delete the blocks that moves emptied
        since the last call. Compaction calls it once per pass: moves are then durable at a cost of
        one directory sync per pass rather than one per batch. Returns the blocks deleted."""
        return self._engine.sync_moves()

    def reclaim_empty_blocks(self) -> list[int]:
        """Delete sealed blocks that hold nothing live and no tombstone (recovery can leave such a
        block: one that was open at a crash and whose records had all died). Returns their ids."""
        return self._engine.reclaim_empty_blocks()

    def hold_blocks(self, block_ids: Sequence[int]) -> Any:
        """Context manager: these blocks' files outlive any deletion until it exits (a compactor holds
        its sources between listing their records and reading them)."""
        return self.blocks.pinned(block_ids)

    def io_counters(self) -> tuple[int, int]:
        """(logical bytes users put, bytes appended to block files): write amplification's terms."""
        with self._engine.state_lock:
            return self._engine.bytes_put_total, self._engine.bytes_written_total

    def open_block_min_seqs(self) -> dict[int, int]:
        """Lowest sequence number in each block still being appended (0: nothing in it yet). With the
        sealed blocks' footers, this tells compaction whether any record older than a tombstone is left."""
        return self._placement.min_seqs()

    def block_table(self) -> list[BlockEntry]:
        """A snapshot of the block table (for tools and compaction)."""
        with self._engine.state_lock:
            return [e.copy() for e in sorted(self._engine.table.values(), key=lambda e: e.block_id)]

    def drop_page_cache(self) -> None:
        """Evict this store's block files from the OS page cache (cold-read benchmarks)."""
        for p in self.blocks.list_files().values():
            try:
                fd = self.backend.open_ro(p)
            except NotFound:
                continue
            try:
                self.backend.drop_cache(fd)
            finally:
                self.backend.close(fd)


def open_store(path: str | os.PathLike[str], **kwargs: Any) -> Store:
    return Store(path, **kwargs)

