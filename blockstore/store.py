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

import errno
import importlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from blockstore import hooks
from blockstore.backend import Backend, get_backend
from blockstore.blocks import BLOCKS_DIR, BlockFiles, OpenBlock, block_file_name
from blockstore.chunks import Chunk, ChunkRecords, ChunkWrite
from blockstore.directory import (
    BLOCK_OPEN,
    BLOCK_RECLAIMING,
    BLOCK_SEALED,
    BlockEntry,
    Directory,
    DirectoryBatch,
    Location,
)
from blockstore.errors import (
    BlockstoreError,
    CorruptionError,
    FormatVersionError,
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
    block_key,
    chunk_session_key_strict,
    key_suffix,
    keys_prefix,
    namespace_id_key,
    namespace_key,
    session_key,
    suffix_ns_id,
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
from blockstore.writer import GroupPlan, LeaderSlot, Planned, takes_effect

# Re-exported only for bench/ (gpu_path, ceilings, throughput, scaling), which import it from here until
# they import blockstore.reader (issue 14); nothing else may use the name.
from blockstore.reader import aligned_buffer as aligned_buffer  # noqa: F401  isort: skip
from blockstore.records import (
    FORMAT_VERSION,
    PAGE,
    REC_ALIGNED,
    AppendRecord,
    Buffer,
    Kind,
    aligned_flags,
    record_layout,
)
from blockstore.recovery import recover
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

    _unsure: tuple[Any, ...] | None = None  # a group whose directory write failed (_settle_failed_commit)
    _names_durable_below = 0  # cache mode: block files with a lower id have durable names (blocks/ fsynced)

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
        self._state_lock = threading.Lock()  # guards _blocks, _open, counters
        self._slot = LeaderSlot()
        self._sealed_unsynced: set[int] = set()
        self._reclaim_after_sync: set[int] = set()  # sources emptied by moves, waiting for a synced directory
        self._reclaiming: set[int] = set()  # marked reclaiming in the directory; entry dropped once the file is gone
        self._ns_ids: dict[str, int] = {}
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
            self._chunks = ChunkRecords(check_open=self._check_open, namespace_id=self.namespace_id,
                                        submit=self._submit, read=self._reader.read, directory=directory)
            if exists and not self.read_only and last_durability != self.durability:
                # before this session writes: its WAL is read back under this mode's rule
                manifest["durability"] = self.durability
                self._write_manifest(manifest_path, manifest)
            self._load_state(fresh=not exists)
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

    def _load_state(self, fresh: bool) -> None:
        d = self.dir
        if fresh:
            b = DirectoryBatch()
            for name in ("next_seq", "next_block", "next_ns"):
                b.put_meta(name, 1)
            b.put_meta("format_version", FORMAT_VERSION)
            b.put_meta("bytes_put", 0)
            b.put_meta("bytes_written", 0)
            b.put_meta("clean", 1)
            d.write(b, force_sync=True)
        version = d.get_meta("format_version") or 0
        if version > FORMAT_VERSION:
            raise FormatVersionError(f"directory format version {version} is newer than this build ({FORMAT_VERSION})")
        self._ns_ids = d.namespaces()
        self._blocks: dict[int, BlockEntry] = d.load_blocks()
        reclaiming = [bid for bid, e in self._blocks.items() if e.state == BLOCK_RECLAIMING]
        for bid in reclaiming:
            del self._blocks[bid]
        if reclaiming and not self.read_only:
            self._finish_reclaims(reclaiming)
        unclean = d.get_meta("clean") != 1
        left_open = any(e.state == BLOCK_OPEN for e in self._blocks.values())
        if not self.read_only:
            self._refuse_unnamed_block_files(set(self._blocks) | set(reclaiming))
        if not self.read_only and (unclean or left_open):
            self.recovery_report = recover(self, full=unclean)
            self._blocks = {bid: e for bid, e in d.load_blocks().items() if e.state != BLOCK_RECLAIMING}
            for bid, e in list(self._blocks.items()):
                if self._reclaimable(e):  # an open block whose records had all died before the crash
                    self._delete_block(bid)
        self._next_seq = d.get_meta("next_seq") or 1
        self._placement.next_block = d.get_meta("next_block") or 1
        self._next_ns = d.get_meta("next_ns") or 1
        self._bytes_put = d.get_meta("bytes_put") or 0
        self._bytes_written = d.get_meta("bytes_written") or 0
        if not self.read_only:
            b = DirectoryBatch()
            b.put_meta("clean", 0)
            # recovery after a power cut in cache mode verifies the blocks made from here on
            b.put_meta("session_first_block", self._placement.next_block)
            d.write(b, force_sync=True)

    def _refuse_unnamed_block_files(self, named: set[int]) -> None:
        """Blocks are named in the directory (synced) before their files exist, so a block file the
        directory does not name means the directory lost writes (a lost or truncated WAL, an old copy
        put back): writing on would reuse sequence numbers the lost records hold, and recovery would
        cut acknowledged records at stale committed ends. One listdir per writable open."""
        unnamed = sorted(set(self.blocks.list_files()) - named)
        if unnamed:
            raise CorruptionError(
                f"{self.path}: {len(unnamed)} block file(s) the directory does not name "
                f"({', '.join(block_file_name(b) for b in unnamed[:8])}): the directory lost writes; "
                f"run `blockstore fsck --repair {self.path}` (it rebuilds what the blocks hold)")

    def _finish_reclaims(self, block_ids: list[int]) -> None:
        """Blocks marked reclaiming before a crash: the durable mark is the proof that nothing in them is
        live, so their files go, then their entries."""
        for bid in block_ids:
            if self.blocks.exists(bid):
                self.blocks.delete(bid)
        self.backend.dir_sync(self.blocks.dir)
        b = DirectoryBatch()
        for bid in block_ids:
            b.delete_block(bid)
        self.dir.write(b, force_sync=True)

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
                with self._slot.exclusive():
                    self._settle_failed_commit()  # before a footer goes where a replayed commit put records
                    failed = self._seal_all()
                    self.dir.flush()
                    if failed is None:
                        b = DirectoryBatch()
                        b.put_meta("clean", 1)
                        self.dir.write(b, force_sync=True)
        except NoSpace as exc:
            raise self._no_space(exc, closing=True) from exc
        finally:
            self._closed = True
            self.blocks.close()
            self.dir.close()
            self._lock.release()
        if failed is not None:
            # the store is closed but not clean (the next open recovers it); the caller must hear that
            # what it wrote is not known to be durable. Swallowed, a cache-mode store lost puts made
            # before a close that had returned normally (found by tests/test_faults.py).
            raise self._no_space(failed, closing=True) if isinstance(failed, NoSpace) else failed

    def _seal_all(self) -> BlockstoreError | None:
        """Seal every open and retired block; None if all of them are sealed and durable, else the
        first error (the others are attempted anyway)."""
        errors: list[BlockstoreError] = []
        batch = DirectoryBatch()
        for ob in list(self._placement.open.values()) + self._placement.retired:
            try:
                self._seal(ob, batch)
                self.backend.sync(ob.fd)
            except BlockstoreError as exc:
                errors.append(exc)
            finally:
                self._close_fd(ob)
        self._placement.open.clear()
        self._placement.retired.clear()
        # cache mode seals rotated blocks without fdatasync: a clean close must not leave any block
        # unsynced, or a power loss after it would go unnoticed (recovery is skipped when clean)
        for bid in sorted(self._sealed_unsynced):
            try:
                fd = self.backend.open(self.blocks.path(bid), False)
            except NotFound:
                continue  # reclaimed since
            try:
                self.backend.sync(fd)
            except BlockstoreError as exc:
                errors.append(exc)
            finally:
                self.backend.close(fd)
        self._sealed_unsynced.clear()
        try:
            self.backend.dir_sync(self.blocks.dir)  # the block files' names, too
        except BlockstoreError as exc:
            errors.append(exc)
        self.dir.write(batch, force_sync=True)
        for bid, e in list(self._blocks.items()):
            if self._reclaimable(e):
                self._delete_block(bid)
        if self._reclaiming:
            b = DirectoryBatch()
            self._forget_reclaimed(b)
            self.dir.write(b, force_sync=True)
        return errors[0] if errors else None

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
        return sorted(self._ns_ids)

    def namespace_id(self, ns: str) -> int | None:
        """The directory's id of namespace `ns`, None if it does not exist yet. It is the first part of
        every directory key suffix of the namespace's records (`blockstore.keys.key_suffix`), as read
        observers and `Directory.block_records` give them; an id is never reused."""
        return self._ns_ids.get(check_ns(ns))

    _ns_id = namespace_id  # the engine's own spelling

    def _block_named(self, bid: int) -> bool:
        with self._state_lock:
            return bid in self._blocks

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
        self._submit(muts)

    def delete(self, key: bytes, *, ns: str = DEFAULT_NAMESPACE) -> bool:
        """Delete `key`: writes a tombstone. Returns whether the key existed."""
        return self.delete_many([_check_key(key)], ns=ns)[0]

    def delete_many(self, keys: Sequence[bytes], *, ns: str = DEFAULT_NAMESPACE) -> list[bool]:
        self._check_open(write=True)
        check_ns(ns)
        part = self._partition(ns, None)
        muts = [Mutation(ns, SPACE_KV, k, Kind.TOMBSTONE, part, TOMBSTONE_META[SPACE_KV]) for k in check_keys(keys)]
        self._submit(muts)
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

    def _submit(self, muts: list[Mutation]) -> None:
        """Group commit: queue, and either lead a group or wait for a leader to apply ours."""
        self._slot.submit(muts, self._apply, lambda: self._check_open(write=True))

    # ---- the leader's work ----

    def _apply(self, muts: list[Mutation]) -> None:
        to_seal: list[OpenBlock] = []
        try:
            self._apply_group(muts, to_seal)
        except BaseException as exc:
            # blocks taken out of rotation but not sealed: seal them at close (or recovery does)
            self._placement.retired.extend(ob for ob in to_seal if ob not in self._placement.retired)
            if isinstance(exc, NoSpace):
                raise self._no_space(exc) from exc
            raise

    def _no_space(self, exc: NoSpace, *, closing: bool = False) -> NoSpace:
        """The NoSpace a caller sees: what happened and what to do (it used to name neither)."""
        if "free space" in str(exc):
            return exc  # explained already
        code = errno.EDQUOT if exc.errno == errno.EDQUOT or "quota" in str(exc).lower() else errno.ENOSPC
        state = "over its disk quota (EDQUOT)" if code == errno.EDQUOT else "full (ENOSPC)"
        if closing:
            then = ("close() could not finish: the store is closed but not marked clean, and the next open "
                    "recovers it (nothing acknowledged is lost); free space before reopening it")
        else:
            then = ("this write failed and was not acknowledged, and every write acknowledged before it is intact; "
                    "free space there and retry: the store resumes writing by itself once there is room (no reopen "
                    "needed)")
        return NoSpace(code, f"{exc.strerror or exc} -- the filesystem holding store {self.path!r} is {state}: {then}")

    def _settle_failed_commit(self) -> None:
        """The last group's directory write failed, yet RocksDB may hold its batch whole (a WAL sync that
        failed after the write), and the reopen that resumes the directory replays it. Before anything is
        appended again (an append at the restored tail would overwrite records the directory names),
        resume the directory and look: if the batch is there, adopt what it committed (its records were
        never acknowledged, but they are stored now); else forget it."""
        u = self._unsure
        if u is None:
            return
        self.dir.resume()  # NoSpace while the disk is still full: nothing is appended, the next write looks
        bid, total, post, created_ns, seq, bytes_put, bytes_written, entries = u
        raw = self.dir.get(block_key(bid))
        self._unsure = None
        if raw is None or BlockEntry.decode(bid, raw).total_records != total:
            return
        _log.warning("%s: a directory write reported as failed was found committed after the directory "
                     "was reopened; its %d bytes of records are kept", self.path, bytes_written)
        for ob, tail, e, lo, hi, n in post:
            ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records = tail, e, lo, hi, n
        with self._state_lock:
            self._ns_ids.update(created_ns)
            self._next_seq = max(self._next_seq, seq)
            self._bytes_put += bytes_put
            self._bytes_written += bytes_written
            self._blocks.update(entries)

    def _apply_group(self, muts: list[Mutation], to_seal: list[OpenBlock]) -> None:
        """Apply one group: plan (blocks, sequence numbers, compare-and-swap), append (one backend call
        per block), publish (one directory batch), then update the in-memory state it committed."""
        self._settle_failed_commit()
        hooks.fire("write.begin")
        plan = self._plan_group(muts, to_seal)
        placements = self._append_group(plan)
        hooks.fire("write.appended")
        self._publish_group(plan, placements, to_seal)

    def _plan_group(self, muts: list[Mutation], to_seal: list[OpenBlock]) -> GroupPlan:
        """Pick each record's block, rotating full and idle blocks out (into `to_seal`), and assign
        sequence numbers; decide each delete and move against the directory as it is now."""
        batch = DirectoryBatch()
        ns_ids, created_ns = self._resolve_namespaces(muts, batch)
        suffixes = [m.suffix or key_suffix(ns_ids[m.ns], m.space, m.key) for m in muts]
        unique = list(dict.fromkeys(suffixes))
        plan = GroupPlan(batch, created_ns, dict(zip(unique, self.dir.get_locations(unique))), self._next_seq)
        to_seal.extend(self._placement.idle_blocks())
        live_after: dict[bytes, bool] = {s: plan.current[s] is not None for s in plan.current}
        touched: set[bytes] = set()  # keys a put or delete of this group changed
        pending_need = 0  # a relocation set's size, carried to its first move that wins its CAS
        per_partition = Counter(m.partition for m in muts if m.expected is None)
        for m, suffix in zip(muts, suffixes):
            pending_need = max(pending_need, m.group_need)
            if not takes_effect(m, suffix, plan, live_after, touched):
                continue
            plen = len(m.payload)  # type: ignore[arg-type]
            need = max(len(m.key) + len(m.meta) + plen, pending_need)
            pending_need = 0
            if m.expected is None:
                self._placement.writes_placed += 1
            ob = self._placement.block_for(m.partition, need, plan.tails, to_seal, batch,
                                 lone=m.expected is None and per_partition[m.partition] == 1)
            tail = plan.tails.get(ob.entry.block_id, ob.tail)
            _poff, rlen = record_layout(tail, len(m.key), len(m.meta), plen, aligned_flags(plen))
            plan.tails[ob.entry.block_id] = tail + rlen
            nid = suffix_ns_id(suffix)
            if m.expected is not None:  # a relocated copy keeps its sequence number: same record, new place
                rec = AppendRecord(m.kind, nid, m.key, m.meta, m.payload, m.expected.seq, m.payload_xxh3)
            else:
                rec = AppendRecord(m.kind, nid, m.key, m.meta, m.payload, plan.seq, m.payload_xxh3)
                plan.seq += 1
            plan.planned.setdefault(ob.entry.block_id, Planned(ob)).records.append(rec)
            plan.placed.append((m, suffix, ob, rec))
            live_after[suffix] = m.kind != Kind.TOMBSTONE
        # Moves (compaction) are durable whatever the mode: their source is deleted once the directory
        # names the copy, and what a clean close made durable must not become volatile again.
        plan.moves = any(m.expected is not None for m in muts)
        # A delete is durable when it returns, whatever the mode: in cache mode a power cut may lose
        # recent puts, but never bring back a key whose delete was acknowledged (docs/durability).
        plan.deletes = any(m.kind == Kind.TOMBSTONE and m.expected is None and m.result for m in muts)
        # An overwrite's new bytes are synced before the directory batch names them, in cache mode
        # too: the kernel may write the directory's WAL back before the block's pages, and a power
        # cut must then leave the key with its new value or its old one, never neither (found by
        # tests/power_loss.py). The directory write itself stays unsynced: losing it keeps the old value.
        plan.overwrites = any(m.expected is None and m.kind != Kind.TOMBSTONE and plan.current[s] is not None
                              for m, s, _ob, _rec in plan.placed)
        return plan

    def _append_group(self, plan: GroupPlan) -> dict[int, list[Any]]:
        """Write: one backend call per block; it ends with that block's fdatasync when the group must
        be durable. The placements (where each record landed) by block id."""
        placements: dict[int, list[Any]] = {}
        sync = self.durability == "sync" or plan.moves or plan.deletes or plan.overwrites
        for bid, pl in plan.planned.items():
            ob = pl.block
            try:
                pls, _end = self.backend.append(ob.fd, ob.tail, pl.records, sync)
            except BlockstoreError as exc:
                # NoSpace keeps the block in rotation at its last good tail (the next append overwrites
                # the failed bytes): retiring it opened a new block file, holding its descriptor, for
                # every retry while the disk stayed full
                if not isinstance(exc, NoSpace):
                    self._placement.retire(ob)
                raise
            placements[bid] = pls
        return placements

    def _group_entry(self, entries: dict[int, BlockEntry], bid: int, to_seal: list[OpenBlock]) -> BlockEntry:
        """The block entry this group changes, copied once per group."""
        if bid not in entries:
            entries[bid] = self._blocks[bid].copy() if bid in self._blocks else self._placement.open_entry(bid, to_seal)
        return entries[bid]

    def _stage_records(self, plan: GroupPlan, placements: dict[int, list[Any]], entries: dict[int, BlockEntry],
                       to_seal: list[OpenBlock]) -> tuple[int, int]:
        """Stage each placed record in the batch: its location, the old one dead, both blocks' counters,
        the chunk session index. Returns (logical bytes put, bytes appended)."""
        batch, current = plan.batch, plan.current
        now = time.time_ns()
        bytes_put = bytes_written = 0
        index: dict[int, int] = {bid: 0 for bid in plan.planned}
        for m, suffix, ob, rec in plan.placed:
            bid = ob.entry.block_id
            p = placements[bid][index[bid]]
            index[bid] += 1
            old = current[suffix]
            e = self._group_entry(entries, bid, to_seal)
            e.written_bytes += p.record_len
            e.total_records += 1
            e.data_end = p.offset + p.record_len
            e.last_append_ns = now
            bytes_written += p.record_len
            if old is not None:
                oe = self._group_entry(entries, old.block_id, to_seal)
                oe.live_bytes -= old.record_len
                oe.live_records -= 1
                oe.live_logical_bytes -= len(m.key) + old.payload_len
                batch.forget_reverse(old)
                if old.kind == Kind.CHUNK and m.expected is None:
                    batch.delete(chunk_session_key_strict(suffix, old))
            if m.kind == Kind.TOMBSTONE:
                e.tombstones += 1
                batch.delete_location(suffix, None)
                current[suffix] = None
            else:
                plen = len(m.payload)  # type: ignore[arg-type]
                loc = Location(m.kind, p.flags, p.payload_off, bid, p.offset, p.record_len, plen,
                               rec.seq, p.payload_xxh3, m.meta)
                batch.put_location(suffix, loc)
                current[suffix] = loc
                e.live_bytes += p.record_len
                e.live_records += 1
                e.live_logical_bytes += len(m.key) + plen
                if m.expected is None:
                    bytes_put += len(m.key) + plen
                if m.chunk_index is not None:
                    user, session, ts, cid = m.chunk_index
                    batch.put(session_key(suffix_ns_id(suffix), user, session, ts, cid), b"")
            ob.min_seq = min(ob.min_seq or rec.seq, rec.seq)
            ob.max_seq = max(ob.max_seq, rec.seq)
            ob.records += 1
        return bytes_put, bytes_written

    def _publish_group(self, plan: GroupPlan, placements: dict[int, list[Any]], to_seal: list[OpenBlock]) -> None:
        """Write the group's one directory batch (new locations, old ones dead, block counters, counters,
        the footers of blocks rotated out), then adopt what it committed."""
        planned, batch = plan.planned, plan.batch
        # Everything below changes in-memory block state before the directory write, which can still
        # fail: keep what to restore, so failed records never count (they are dead bytes past the tail).
        saved = [(pl.block, pl.block.tail, pl.block.entry, pl.block.min_seq, pl.block.max_seq, pl.block.records)
                 for pl in planned.values()] + [(ob, ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records)
                                                 for ob in to_seal]
        entries: dict[int, BlockEntry] = {}
        try:
            bytes_put, bytes_written = self._stage_records(plan, placements, entries, to_seal)
            for bid in plan.retired_tombstones:
                e = self._group_entry(entries, bid, to_seal)
                e.tombstones = max(0, e.tombstones - 1)
            for bid, pl in planned.items():
                pl.block.tail = plan.tails[bid]
                pl.block.entry = self._group_entry(entries, bid, to_seal)
            # seal what rotated out (footer after its last records, before the batch names them)
            for ob in to_seal:
                self._seal(ob, batch, entries)
                self._placement.open = {k: v for k, v in self._placement.open.items() if v is not ob}
            for e in entries.values():
                batch.put_block(e)
            batch.put_meta("next_seq", plan.seq)
            batch.put_meta("next_block", self._placement.next_block)
            batch.put_meta("bytes_put", self._bytes_put + bytes_put)
            batch.put_meta("bytes_written", self._bytes_written + bytes_written)
            unnamed = self._placement.unnamed
            for bid in unnamed:
                if not self.blocks.exists(bid):
                    batch.delete_block(bid)
            hooks.fire("write.before_directory")
            self._write_group_batch(plan, saved, entries, bytes_put, bytes_written)
        except BaseException:
            for ob, tail, e, lo, hi, n in saved:
                ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records = tail, e, lo, hi, n
            raise
        hooks.fire("write.committed")
        self._adopt_group(plan, entries, unnamed, bytes_put, bytes_written, to_seal)

    def _write_group_batch(self, plan: GroupPlan, saved: list[Any], entries: dict[int, BlockEntry],
                           bytes_put: int, bytes_written: int) -> None:
        # An overwrite's synced record may sit in a block file made this session whose name is not
        # durable yet: a later synced directory write (or the WAL written back) makes the entry durable,
        # a power cut loses the file, recovery forgets the block and drops the key's entry, and the
        # key reads absent while its old value is intact on disk (found by tests/power_loss.py). So
        # blocks/ is fsynced first, as for moves and deletes (once per new block file).
        if self.durability != "sync" and (plan.moves or plan.deletes or (
                plan.overwrites and any(b >= self._names_durable_below for b in plan.planned))):
            names_below = self._placement.next_block
            self.backend.dir_sync(self.blocks.dir)  # a block file created for them, too
            self._names_durable_below = names_below
        try:
            self.dir.write(plan.batch, force_sync=plan.deletes)
        except BlockstoreError:
            if plan.planned:  # what it would have committed, for _settle_failed_commit
                first = next(iter(plan.planned))
                self._unsure = (first, entries[first].total_records,
                                [(ob, ob.tail, ob.entry, ob.min_seq, ob.max_seq, ob.records) for ob, *_ in saved],
                                dict(plan.created_ns), plan.seq, bytes_put, bytes_written, dict(entries))
            raise

    def _adopt_group(self, plan: GroupPlan, entries: dict[int, BlockEntry], unnamed: frozenset[int],
                     bytes_put: int, bytes_written: int, to_seal: list[OpenBlock]) -> None:
        """The group committed: the in-memory state follows, and blocks it emptied go."""
        with self._state_lock:
            self._ns_ids.update(plan.created_ns)  # only now: a failed batch must not leave a phantom namespace
            self._next_seq = plan.seq
            self._bytes_put += bytes_put
            self._bytes_written += bytes_written
            self._blocks.update(entries)
        self._placement.unnamed = self._placement.unnamed - unnamed
        for ob in to_seal:
            self._close_fd(ob)
        to_seal.clear()
        for bid, e in entries.items():
            if self._reclaimable(e):
                if plan.moves and self.durability != "sync":
                    # the copies are durable, the directory batch naming them is not yet: the source
                    # goes only after a synced directory write (sync_moves, or close)
                    self._reclaim_after_sync.add(bid)
                    continue
                try:
                    self._delete_block(bid)
                except BlockstoreError:
                    pass  # the group is committed; an empty block left behind is reclaimed at close

    def _resolve_namespaces(self, muts: list[Mutation], batch: DirectoryBatch) -> tuple[dict[str, int], dict[str, int]]:
        """(id of every namespace the group names, the ones this group creates). A delete never creates
        a namespace: in one that does not exist it gets id 0, which names nothing, so it is a miss."""
        out: dict[str, int] = {}
        created: dict[str, int] = {}
        for m in muts:
            if m.ns in out or m.suffix is not None:
                continue
            nid = self._ns_ids.get(m.ns)
            if nid is None and m.kind == Kind.TOMBSTONE and not any(
                    x.ns == m.ns and x.kind != Kind.TOMBSTONE for x in muts):
                continue
            if nid is None:
                nid = self._next_ns
                self._next_ns += 1  # never reused, even if this batch fails
                batch.put(namespace_key(m.ns), nid.to_bytes(4, "little"))
                batch.put(namespace_id_key(nid), m.ns.encode())
                batch.put_meta("next_ns", self._next_ns)
                created[m.ns] = nid
            out[m.ns] = nid
        for m in muts:
            if m.suffix is None and m.ns not in out:
                out[m.ns] = 0
        return out, created

    def _seal(self, ob: OpenBlock, batch: DirectoryBatch, entries: dict[int, BlockEntry] | None = None) -> None:
        self.blocks.seal(ob)
        if self.durability == "cache":
            self._sealed_unsynced.add(ob.entry.block_id)  # made durable by close(), before "clean"
        e = (entries or {}).get(ob.entry.block_id) or self._blocks.get(ob.entry.block_id) or ob.entry
        e = e.copy()
        e.state = BLOCK_SEALED
        e.sealed_ns = time.time_ns()
        e.data_end = ob.tail
        if entries is not None:
            entries[e.block_id] = e
        else:
            batch.put_block(e)
            self._blocks[e.block_id] = e

    def _close_fd(self, ob: OpenBlock) -> None:
        try:
            self.backend.close(ob.fd)
        except BlockstoreError:
            pass

    def _reclaimable(self, e: BlockEntry) -> bool:
        return e.state == BLOCK_SEALED and e.live_records == 0 and e.tombstones == 0

    def _delete_block(self, bid: int) -> None:
        """Delete a block that holds nothing live, on durable proof (invariant 4): its entry is marked
        `reclaiming` in a synced directory write first, then the file is unlinked (now, or when its last
        reader lets go), then the entry goes (at the next deletion, close or open). A crash in between
        leaves a `reclaiming` entry, and the next open finishes the job; a file the directory does not
        name is never deleted."""
        hooks.fire("block.delete", bid)
        self._sync_dirty_blocks()
        with self._state_lock:
            e = self._blocks.get(bid)
        b = DirectoryBatch()
        if e is not None:
            e = e.copy()
            e.state = BLOCK_RECLAIMING
            b.put_block(e)
        self._forget_reclaimed(b)
        self.dir.write(b, force_sync=True)
        with self._state_lock:
            self._blocks.pop(bid, None)
            self._reclaiming.add(bid)
        self.blocks.delete(bid)

    def _sync_dirty_blocks(self) -> None:
        """Cache mode, before a block file is deleted: make this session's unsynced block data (open and
        retired blocks, blocks sealed unsynced) and the block files' names durable. What emptied the
        block can be such data: a newer put that let compaction drop the key's tombstone (then deleted
        with its block), or an overwrite. Lost to a power cut after the unlink, it leaves the key's
        older record on disk with nothing newer: the directory has no entry for it (fsck:
        `unreferenced`), and a rebuild from blocks brings a deleted key back (found by
        tests/power_loss.py). Deletions are rare (a compaction pass, a delete that empties a block),
        so the cost is small."""
        if self.durability == "sync":
            return
        for ob in list(self._placement.open.values()) + self._placement.retired:
            self.backend.sync(ob.fd)
        for sid in sorted(self._sealed_unsynced):
            try:
                fd = self.backend.open(self.blocks.path(sid), False)
            except NotFound:
                self._sealed_unsynced.discard(sid)  # reclaimed since
                continue
            try:
                self.backend.sync(fd)
            finally:
                self.backend.close(fd)
            self._sealed_unsynced.discard(sid)
        names_below = self._placement.next_block  # 0 while an open finishes reclaims
        self.backend.dir_sync(self.blocks.dir)
        self._names_durable_below = max(self._names_durable_below, names_below)

    def _forget_reclaimed(self, batch: DirectoryBatch) -> None:
        """Drop the entries of reclaimed blocks whose files are gone (the unlink waits for readers). The
        unlinks are made durable first (cache mode does not fsync blocks/ at each one): else a power cut
        brings back a file whose entry is gone, which the next open cannot account for (tests/power_loss.py)."""
        gone = [rid for rid in list(self._reclaiming) if not self.blocks.exists(rid)]
        if gone and not self.blocks.sync:
            self.backend.dir_sync(self.blocks.dir)
        for rid in gone:
            batch.delete_block(rid)
            self._reclaiming.discard(rid)

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
        self._submit(muts)
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
        with self._state_lock:
            blocks = list(self._blocks.values())
            open_blocks = sum(1 for e in blocks if e.state == BLOCK_OPEN)
            bytes_put, bytes_written = self._bytes_put, self._bytes_written
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
        self._check_open(write=True)
        with self._slot.exclusive():
            pending, self._reclaim_after_sync = self._reclaim_after_sync, set()
            if not pending:
                return []
            b = DirectoryBatch()
            b.put_meta("bytes_written", self._bytes_written)
            self.dir.write(b, force_sync=True)
            gone = []
            for bid in sorted(pending):
                e = self._blocks.get(bid)
                if e is not None and self._reclaimable(e):
                    self._delete_block(bid)
                    gone.append(bid)
            return gone

    def hold_blocks(self, block_ids: Sequence[int]) -> Any:
        """Context manager: these blocks' files outlive any deletion until it exits (a compactor holds
        its sources between listing their records and reading them)."""
        return self.blocks.pinned(block_ids)

    def reclaim_empty_blocks(self) -> list[int]:
        """Delete sealed blocks that hold nothing live and no tombstone (recovery can leave such a
        block: one that was open at a crash and whose records had all died). Returns their ids."""
        self._check_open(write=True)
        with self._slot.exclusive():
            gone = [bid for bid, e in list(self._blocks.items()) if self._reclaimable(e)]
            for bid in gone:
                self._delete_block(bid)
            return gone

    def io_counters(self) -> tuple[int, int]:
        """(logical bytes users put, bytes appended to block files): write amplification's terms."""
        with self._state_lock:
            return self._bytes_put, self._bytes_written

    def open_block_min_seqs(self) -> dict[int, int]:
        """Lowest sequence number in each block still being appended (0: nothing in it yet). With the
        sealed blocks' footers, this tells compaction whether any record older than a tombstone is left."""
        return self._placement.min_seqs()

    def block_table(self) -> list[BlockEntry]:
        """A snapshot of the block table (for tools and compaction)."""
        with self._state_lock:
            return [e.copy() for e in sorted(self._blocks.values(), key=lambda e: e.block_id)]

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

