"""The directory: RocksDB (through rocksdict, raw mode) mapping keys to places (docs/format.md §5).

The value encodings are in blockstore/directory_values.py (re-exported here), the key layout in keys.py.
Changes are staged in a `DirectoryBatch` (directory_batch.py, re-exported here) and written atomically, so a location and the block-table
counters it affects never disagree.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NoReturn, TypeVar, cast

from rocksdict import AccessType, DBRecoveryMode, Options, Rdict, WriteOptions

from blockstore import logs
from blockstore.directory_batch import DirectoryBatch
from blockstore.directory_values import (
    BLOCK_OPEN,
    BLOCK_RECLAIMING,
    BLOCK_SEALED,
    LOCATION_VERSION,
    MAX_COPIES,
    VALUE_VERSION,
    BlockEntry,
    CopyPlace,
    Location,
)
from blockstore.errors import BlockstoreError, CorruptionError, IOErrorBS, NoSpace, StoreClosed, error_for_os
from blockstore.keys import TAG_BLOCK, TAG_NS, location_key, meta_key, reverse_prefix
from blockstore.manifest import fsync_dir, last_writer_synced

_T = TypeVar("_T")
# the value types, for the modules that import them from here
__all__ = ["BLOCK_OPEN", "BLOCK_RECLAIMING", "BLOCK_SEALED", "LOCATION_VERSION", "MAX_COPIES", "VALUE_VERSION",
           "BlockEntry", "CopyPlace", "Directory", "DirectoryBatch", "Location", "repair_hint", "salvage",
           "translate_rocksdb_error"]

_U64 = struct.Struct("<Q")
_log = logs.get("directory")
SCAN_BATCH = 256  # keys a scan reads per RocksDB iterator (scan_prefix): a fresh iterator and a seek per batch


def repair_hint(store_path: str) -> str:
    return f"run `blockstore fsck --repair {store_path}` to rebuild it from the block files"


def translate_rocksdb_error(exc: BaseException, what: str, path: str) -> BlockstoreError:
    """RocksDB's failures as ours. rocksdict raises a bare Exception carrying RocksDB's status text
    ("Corruption: ...", "IO error: No space left ...", "Invalid argument: ... does not exist"); a caller
    must never see it, and damage must name the repair (docs/fsck.md)."""
    text = str(exc)
    store = os.path.dirname(os.path.abspath(path))
    if "No space" in text or "Disk quota" in text:
        return NoSpace(errno.ENOSPC, f"{what}: the disk is full ({text}); make room on the file system holding "
                       f"{store!r} and retry: what was acknowledged before is intact")
    if "Permission denied" in text or "Operation not permitted" in text:
        # not damage: fsck must not report it as a directory to rebuild (repair moved a readable one away)
        return IOErrorBS(errno.EACCES, f"{what}: no permission ({text}); nothing is damaged: give this user "
                         f"access to {path!r}")
    if "Corruption" in text or "does not exist" in text or "checksum" in text.lower() \
            or "CURRENT" in text or "MANIFEST" in text or "bad magic" in text.lower():
        return CorruptionError(f"{what}: the directory {path!r} is damaged ({text}); {repair_hint(store)}")
    return IOErrorBS(errno.EIO, f"{what}: {text}")


class Directory:
    """The RocksDB instance. Thread-safe for reads; writes are serialized by the store.

    Every call into RocksDB goes through this class, and a failure of any of them raises inside the
    BlockstoreError hierarchy. Scans check the iterator's status when they end: RocksDB's iterator
    turns invalid on a read error as it does at the end of the table, so an unchecked scan of a
    damaged table looked complete, and an open once deleted every block file the short table did not
    name (issue 13).
    """

    def __init__(self, path: str, *, read_only: bool, sync: bool, create: bool, strict_wal: bool | None = None,
                 block_files: Callable[[], Iterable[int]] | None = None) -> None:
        """`block_files` (the store's block ids on disk) lets a writable open refuse a directory whose MANIFEST
        lost edits before RocksDB deletes the tables it no longer names (`_keep_unnamed_tables`)."""
        self.path = path
        opts = Options(raw_mode=True)
        opts.create_if_missing(create and not read_only)
        # fail on damage RocksDB can see at open (a bad MANIFEST-*, an SST whose footer is wrong)
        # instead of opening what is left
        opts.set_paranoid_checks(True)
        if strict_wal is None:
            strict_wal = last_writer_synced(os.path.dirname(os.path.abspath(path)), default=sync)
        if strict_wal:
            # A WAL written in sync mode holds only synced, acknowledged writes, so one that does not
            # read to its end lost acknowledged writes: point-in-time recovery would open the older
            # state silently, and recovery would then cut acknowledged records at stale committed ends
            # (tests/test_directory_damage.py, truncate-tail). Fail instead; fsck --repair rebuilds.
            # A cache-mode WAL may end torn after a power cut (its tail was never synced): that is the
            # loss cache mode allows, and point-in-time recovery is right for it.
            opts.set_wal_recovery_mode(DBRecoveryMode.absolute_consistency())
        # No allow_mmap_reads: measured with bench/directory_mmap.py (200k keys, 3 repeats, 2026-11-23)
        # it gave +11 % on single gets but -11 % on 64-key multi-gets, and every read path here batches.
        self.read_only = read_only
        self._shadow: str | None = None
        if not create and not os.path.isdir(path):
            raise CorruptionError(f"the directory {path!r} is missing; "
                                  f"{repair_hint(os.path.dirname(os.path.abspath(path)))}")
        if not create:
            _refuse_special_files(path)
        if not read_only and not create:
            _keep_unnamed_tables(path, strict_wal, block_files)
        for retry in (True, False):
            try:
                if read_only:
                    self._db, self._shadow = _open_read_only(path, opts)
                else:
                    self._db = Rdict(path, opts)
                break
            except Exception as exc:  # rocksdict raises plain Exception with RocksDB's message
                # rocksdict-config.json (rocksdict's raw_mode, derived from our options) damaged: this open fails
                # on the comparator it implies, having rewritten the file from our options; the next one opens
                # (else fsck called the directory unreadable and repair rebuilt it from the blocks)
                if not (retry and "does not match existing comparator" in str(exc)):
                    raise translate_rocksdb_error(exc, "cannot open the directory", path) from exc
        # every write goes to the WAL unsynced; a durable one then syncs the WAL with flush_wal(True), which
        # rocksdict runs with the GIL released, where a write with WriteOptions.sync holds the GIL through
        # its fsync: every thread of the process, the readers included, stopped for the disk's sync latency
        # (a probe thread waited a whole switch interval, 5 ms, per synced write; bench.compaction_p99 on a
        # quiet 16-core machine: reads during compaction 2-4x their idle p99, waiting on relocation's
        # synced writes). The write returns once durable either way; others may see it a sync earlier.
        self._wo = WriteOptions()
        self._sync = sync
        self._opts = opts  # to reopen the handle after a failed write (resume)
        self._failed: BlockstoreError | None = None  # set by a failed write or flush until resume() succeeds
        self._resume_tried = (0.0, -1)  # (monotonic time, free bytes) of the last failure, to pace reopens
        self._closed = False  # set when close() begins: calls from then on raise StoreClosed

    def _fail(self, exc: BaseException, what: str) -> NoReturn:
        if isinstance(exc, BlockstoreError):
            raise exc
        if self._closed:
            # a call racing close(): rocksdict refuses it ("Already mutably borrowed" while close holds the
            # handle, DbClosedError after), which read as an I/O error (EIO) of an open store
            raise self._closed_error() from exc
        raise translate_rocksdb_error(exc, what, self.path) from exc

    def _closed_error(self) -> StoreClosed:
        return StoreClosed(f"store {os.path.dirname(os.path.abspath(self.path))!r} is closed")

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except Exception as exc:
            self._fail(exc, what)

    # ---- raw ----
    def get(self, key: bytes) -> bytes | None:
        return self._call("directory read", lambda: self._db.get(key))

    def multi_get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        return cast("list[bytes | None]", self._call("directory read", lambda: self._db.get(list(keys))))

    def scan_prefix(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) under `prefix` in key order, from `start`. Raises CorruptionError (or
        IOErrorBS) if the scan cannot read the whole range: never a short answer; StoreClosed once the
        directory is closed, even between two keys of a batch already read.

        Read in batches of SCAN_BATCH keys, each on a fresh RocksDB iterator that is dropped before the
        batch is handed out: a paused scan holds no iterator. One held between `next()` calls kept the
        RocksDB handle alive: after close the scan went on returning keys and RocksDB's LOCK stayed held,
        so no open of the store in this process succeeded until the iterator was collected; and a failed
        handle could not be replaced (resume) while any scan was paused. The price is that a scan is not
        one point-in-time view: a key written or deleted ahead of the scan's position while it runs may
        be seen or not, as with a scan that began a moment later (every key present for the whole scan
        is seen once, in order)."""
        seek = start or prefix
        while True:
            batch, more = self._scan_batch(prefix, seek)
            for kv in batch:
                yield kv
                if self._closed:
                    raise self._closed_error()
            if not more:
                return
            seek = batch[-1][0] + b"\x00"  # the first key after the last one read (bytewise order)

    def _scan_batch(self, prefix: bytes, seek: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Up to SCAN_BATCH (key, value) from `seek` under `prefix`, and whether the range may go on."""
        if self._closed:
            raise self._closed_error()
        out: list[tuple[bytes, bytes]] = []
        it = None
        try:
            it = self._db.iter()
            it.seek(seek)
            while it.valid():
                k = it.key()
                if not k.startswith(prefix):
                    return out, False
                if len(out) == SCAN_BATCH:
                    return out, True
                out.append((k, it.value()))
                it.next()
            it.status()  # invalid because the table ended, or because a read failed: this tells which
            return out, False
        except Exception as exc:
            self._fail(exc, f"directory scan of prefix {prefix[:1]!r}")
        finally:
            # dropped here, never kept by a traceback or a paused caller: a live iterator keeps RocksDB's
            # handle and LOCK (a repair after a failed open could not open it)
            it = None  # noqa: F841

    def write(self, batch: DirectoryBatch, *, force_sync: bool = False) -> None:
        if batch.empty:
            return
        if self._failed is not None:
            self.resume()
        try:
            self._db.write(batch._wb, self._wo)
            if force_sync or self._sync:
                self._db.flush_wal(True)
        except Exception as exc:  # rocksdict raises plain Exception carrying RocksDB's status text
            self._failed_now(exc, "directory write failed")

    def _failed_now(self, exc: BaseException, what: str) -> NoReturn:
        """A write or flush failed. RocksDB then refuses every later write with the same error (a
        background error that only DB::Resume() clears, and rocksdict has no Resume): after the first
        ENOSPC a store failed every write, even a delete, until it was closed (issue 13). So the next
        write reopens the handle first (resume). A write racing close() is refused as the store's other
        calls are then (StoreClosed), and leaves nothing to resume."""
        if self._closed and not isinstance(exc, BlockstoreError):
            raise self._closed_error() from exc
        err = exc if isinstance(exc, BlockstoreError) else translate_rocksdb_error(exc, what, self.path)
        self._failed = err
        self._resume_tried = (time.monotonic(), _free_bytes(self.path))
        if err is exc:
            raise err
        raise err from exc

    def resume(self) -> None:
        """Make the directory take writes again after a failed write or flush; a no-op otherwise. The
        handle is closed and reopened: the reopen replays the WAL, so every write RocksDB acknowledged is
        there and the torn record of a failed one is dropped (RocksDB's point-in-time WAL recovery).
        Readers go on meanwhile with a read-only handle (it takes no LOCK). Raises NoSpace (or the
        reopen's other error) while the reopen cannot write its files; an attempt is made at once when
        the filesystem has more free space than at the last failure, else at most once a second."""
        failed = self._failed
        if failed is None or self.read_only:
            return
        free = _free_bytes(self.path)
        when, free_then = self._resume_tried
        if free <= free_then and time.monotonic() - when < 1.0:
            raise type(failed)(*failed.args)  # nothing was freed since the last try: don't reopen again
        stale = self._db
        try:
            self._db = Rdict(self.path, self._opts, access_type=AccessType.read_only())
        except Exception:  # readers get an error from the closed handle until the reopen below
            try:
                stale.close()
            except Exception:
                pass  # RocksDB reports the error that stopped it; the handle is closed all the same
        # Not closed under a reader still in a call on it (it would fail, or raise DbClosedError): the
        # failed handle goes, and its LOCK with it, when the last reference to it does.
        del stale
        deadline = time.monotonic() + 0.5
        while True:
            try:
                db = Rdict(self.path, self._opts)
                break
            except Exception as exc:
                if "lock hold by current process" not in str(exc):  # still full, most likely
                    self._failed_now(exc, "the directory cannot take writes again yet "
                                          "(reopening it after a failed write)")
                if time.monotonic() < deadline:
                    time.sleep(0.005)  # a reader's call on the failed handle is ending
                    continue
                self._failed = IOErrorBS(errno.EBUSY, "the directory cannot take writes again yet: a call of "
                                         f"another thread still holds the handle that failed; write again ({exc})")
                self._resume_tried = (0.0, -1)  # not a matter of space: try again at the next write
                raise type(self._failed)(*self._failed.args) from None
        self._db = db  # a read-only handle in use by a reader closes when the reader is done with it
        self._failed = None

    # ---- typed ----
    def get_meta(self, name: str) -> int | None:
        raw = self.get(meta_key(name))
        if raw is None:
            return None
        if len(raw) != _U64.size:
            store = os.path.dirname(os.path.abspath(self.path))
            raise CorruptionError(f"directory counter {name!r} has {len(raw)} bytes, not {_U64.size} (damaged); run "
                                  f"`blockstore fsck --repair {store}`, which sets it from the block files")
        return cast(int, _U64.unpack(raw)[0])

    def get_locations(self, suffixes: Sequence[bytes]) -> list[Location | None]:
        raws = self.multi_get([location_key(s) for s in suffixes])
        return [None if r is None else Location.decode(r) for r in raws]

    def load_blocks(self) -> dict[int, BlockEntry]:
        out = {}
        for k, v in self.scan_prefix(TAG_BLOCK):
            if len(k) != 9:
                raise CorruptionError(f"block table key {k!r} is not 9 bytes")
            bid = int.from_bytes(k[1:9], "big")
            out[bid] = BlockEntry.decode(bid, v)
        return out

    def block_records(self, block_id: int) -> Iterator[tuple[int, bytes]]:
        """(offset, key suffix) of every live record in a block, in offset order."""
        for k, v in self.scan_prefix(reverse_prefix(block_id)):
            yield int.from_bytes(k[9:17], "big"), v

    def namespaces(self) -> dict[str, int]:
        out = {}
        for k, v in self.scan_prefix(TAG_NS):
            try:
                out[k[1:].decode()] = int.from_bytes(v, "little")
            except UnicodeDecodeError as exc:
                raise CorruptionError(f"namespace name {k[1:]!r} is not UTF-8") from exc
        return out

    def size_on_disk(self, path: str) -> int:
        total = 0
        for root, _dirs, files in os.walk(path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total

    def flush(self) -> None:
        if self._failed is not None:
            self.resume()
        try:
            self._db.flush()
            self._db.flush_wal(True)
        except Exception as exc:
            self._failed_now(exc, "directory flush failed")

    def close(self) -> None:
        self._closed = True  # before the handle goes: a call racing it raises StoreClosed (_fail)
        for _ in range(30_000):  # another thread still in a call: rocksdict refuses ("Already borrowed") until it ends
            try:
                self._db.close()
            except Exception as exc:
                if "borrowed" in str(exc):  # swallowed, RocksDB's LOCK stayed held: no reopen in the process
                    time.sleep(0.001)
                    continue
            break
        if self._shadow is not None:
            shutil.rmtree(self._shadow, ignore_errors=True)  # links only: rmtree never follows them
            self._shadow = None


def _refuse_special_files(path: str) -> None:
    """A FIFO or device among the directory's files (CURRENT, IDENTITY, rocksdict-config.json...) is damage:
    RocksDB's open of it waited forever for a writer, so every open and fsck hung."""
    try:
        names = os.listdir(path)
    except OSError:
        return  # the open says what is wrong
    for name in names:
        try:
            mode = os.stat(os.path.join(path, name)).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            store = os.path.dirname(os.path.abspath(path))
            raise CorruptionError(f"the directory {path!r} is damaged ({name} is not a regular file: "
                                  f"{stat.filemode(mode)}); {repair_hint(store)}")


_RO_OPEN_ATTEMPTS = 6  # a read-only open that meets a file the writer has just deleted (_open_read_only)


def _open_read_only(path: str, opts: Options) -> tuple[Rdict, str | None]:
    """A read-only open, and the shadow folder it needed (None: none). rocksdict rewrites its
    rocksdict-config.json at every open, read-only ones too, so on a read-only file system (a snapshot, a
    backup mounted ro) every read-only open failed with EROFS, and fsck reported the intact directory as one
    that "cannot be opened". There the open goes through a temporary folder of links to the directory's files,
    with its own copy of that config (RocksDB opens by name and writes nothing else in read-only mode but its
    LOG, which then goes to the temporary folder).

    A writer opening, flushing or closing meanwhile deletes the tables, WAL and MANIFEST it has just
    replaced, between this open's read of CURRENT and its open of the files that named them: "No such file
    or directory" for a file that was there a moment before (18 of 713 opens beside a writer that opened, put
    and closed in a loop, each called the directory damaged). Such an open is tried again; a file that stays
    missing is damage."""
    for attempt in range(1, _RO_OPEN_ATTEMPTS + 1):
        try:
            return Rdict(path, opts, access_type=AccessType.read_only()), None
        except Exception as exc:
            if "os error 30" in str(exc):  # EROFS
                break
            if "No such file or directory" not in str(exc) or attempt == _RO_OPEN_ATTEMPTS:
                raise
            time.sleep(0.002 * attempt)
    shadow = tempfile.mkdtemp(prefix="blockstore-ro-directory-")
    try:
        for name in os.listdir(path):
            if name == "rocksdict-config.json":
                shutil.copyfile(os.path.join(path, name), os.path.join(shadow, name))
            elif name != "LOCK" and not name.startswith("LOG"):
                os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(shadow, name))
        return Rdict(shadow, opts, access_type=AccessType.read_only()), shadow
    except BaseException:
        shutil.rmtree(shadow, ignore_errors=True)
        raise


def _keep_unnamed_tables(path: str, strict_wal: bool, block_files: Callable[[], Iterable[int]] | None) -> None:
    """A writable RocksDB open changes the directory for good: it deletes every table file (*.sst) its MANIFEST
    does not name, and starts a new MANIFEST and WAL past the old ones. A MANIFEST cut short (or an old copy put
    back) names fewer tables than the folder holds, and a WAL cut short holds fewer writes: that open deleted
    the directory's own data, or made putting the WAL back useless (tests/test_review_session26.py). So a
    read-only open looks first (it changes nothing). A directory that does not name every block file on disk
    lost edits (blocks are named, synced, before their files exist): refused here, every file as it was, so
    undoing the damage restores the store and `fsck --repair` salvages from all the tables (RepairDB); the
    store's own check (blocklife.py) came only after the writable open. Otherwise tables it does not name were
    left by a flush or compaction a crash cut short (their rows are in the WAL or the tables they were made
    from): they are moved to STORE/lost+found/ (never deleted: nothing proves them dead) and the open goes on."""
    try:
        probe = Directory(path, read_only=True, sync=False, create=False, strict_wal=strict_wal)
    except BlockstoreError:
        return  # the writable open meets the same damage and says so itself
    try:
        named = {os.path.basename(f["name"]) for f in probe._db.live_files()}
        blocks_named = set(probe.load_blocks()) if block_files is not None else set()
    except Exception:  # rocksdict raises plain Exception with RocksDB's message
        return
    finally:
        probe.close()
    store = os.path.dirname(os.path.abspath(path))
    orphans = sorted(set(block_files()) - blocks_named) if block_files is not None else []
    if orphans:
        raise CorruptionError(
            f"{store}: {len(orphans)} block file(s) the directory does not name "
            f"({', '.join(f'{b:016x}.blk' for b in orphans[:8])}): the directory lost writes (a WAL or MANIFEST-* "
            f"cut short, an old copy put back); nothing was changed; {repair_hint(store)}")
    unnamed = sorted(set(n for n in os.listdir(path) if n.endswith(".sst")) - named)
    if not unnamed:
        return
    aside = os.path.join(store, "lost+found", f"directory-tables-{time.time_ns()}")
    why = "table files the directory's MANIFEST does not name (a flush or compaction cut short, or lost edits)"
    try:  # a full disk or a read-only file system: NoSpace / IOErrorBS, and what moved stays moved (re-done next open)
        os.makedirs(aside)
        for name in unnamed:
            os.rename(os.path.join(path, name), os.path.join(aside, name))
        fsync_dir(path, aside, os.path.dirname(aside))
        with open(os.path.join(os.path.dirname(aside), "fsck-log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "file": os.path.basename(aside), "why": why, "from": unnamed}) + "\n")
    except OSError as exc:
        raise error_for_os(exc, f"{store}: moving {len(unnamed)} unnamed table file(s) to {aside}") from exc
    _log.warning("%s: moved %d table file(s) to %s: %s", store, len(unnamed), aside, why)


def _free_bytes(path: str) -> int:
    """Bytes free to an unprivileged writer on the filesystem holding `path` (-1 if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def salvage(path: str) -> list[tuple[bytes, bytes]]:
    """Whatever RocksDB's own repair (RepairDB) can read back from a damaged directory at `path`, which
    it rewrites in place: pass a copy. fsck --repair takes namespace names, block partitions, counters
    and affinity groups from it before rebuilding the rest from the block files. [] if nothing can be read."""
    try:
        Rdict.repair(path, Options(raw_mode=True))
        db = Rdict(path, Options(raw_mode=True), access_type=AccessType.read_only())
    except Exception as exc:  # rocksdict raises plain Exception with RocksDB's message; a full disk is not "nothing"
        if isinstance(err := translate_rocksdb_error(exc, "salvaging the directory", path), NoSpace):
            raise err from exc  # (the rebuild went on without the salvage: every namespace lost its name)
        return []
    out: list[tuple[bytes, bytes]] = []
    try:
        it = db.iter()
        it.seek_to_first()
        while it.valid():
            out.append((bytes(it.key()), bytes(it.value())))
            it.next()
    except Exception:
        pass  # keep what was read before the damage
    finally:
        db.close()
    return out
