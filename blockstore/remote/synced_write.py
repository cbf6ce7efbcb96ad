"""The durable write of the remote tier's own RocksDBs (the uploader's ledger, the reclaim list, the pool's
index): one write batch that has reached the disk when the call returns.

The batch goes to the WAL unsynced, then `flush_wal(True)` syncs the WAL, as the engine's directory does
(directory.py, since 2d3a964). A write with `WriteOptions.sync` holds the GIL through its fsync in
rocksdict, stopping every thread of the process (the store's readers included) for the disk's sync latency;
`flush_wal` releases it. Equally durable: the call returns only once the WAL holding the batch is synced.

A sync that fails leaves the batch readable in this process, durable or not, and RocksDB then refuses every
later write on that handle ("Writer has previous error"; its close raises the same) until it is reopened.
Acting on such a batch is what must not happen: the ledger's publication numbers, read back from memory,
named index objects in the bucket that a power loss then left the ledger unaware of (the next block took
the same number). So `SyncedDB`, the handle these databases use, settles a failed write as the engine's
directory does (`settle_failed_commit`): the next use closes and reopens the database first. The reopen
replays the WAL and writes what it holds to synced tables, so what is read from then on is on disk: the
batch if its bytes made it, else the state before it. A reopen that fails (the disk still failing) is
raised to that use, and the next use tries again: nothing is read from the unsure handle.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from blockstore.errors import IOErrorBS

_UNSYNCED = WriteOptions()
_log = logging.getLogger("blockstore.remote")


class SyncedDB:
    """An Rdict (every attribute passes through) reopened before its next use after a durable write failed."""

    def __init__(self, path: str, opts: Options) -> None:
        self.path, self._opts = path, opts
        self._unsure: BaseException | None = None  # set by a failed write_synced until the reopen
        self._settle_lock = threading.Lock()
        self._db = Rdict(path, opts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)

    def _current(self) -> Rdict:
        if self._unsure is not None:
            self._settle()
        return self._db

    def sync_failed(self, exc: BaseException) -> None:
        """`write_synced` failed on this handle: the next use reopens it."""
        self._unsure = exc

    def _settle(self) -> None:
        with self._settle_lock:
            failed = self._unsure
            if failed is None:
                return
            try:
                self._db.close()  # raises the writer's error again; the handle is closed all the same
            except Exception:  # noqa: BLE001, S110 - that error is the one being settled
                pass
            try:
                self._db = Rdict(self.path, self._opts)
            except Exception as exc:
                raise IOErrorBS(errno.EIO, f"the remote tier's database {self.path!r} could not be reopened after "
                                f"a failed durable write ({failed}): {exc}; nothing is read from it until it is") from exc
            self._unsure = None
            _log.warning("%s: reopened after a failed durable write (%s): what it holds now is on disk", self.path, failed)

    def close(self) -> None:
        try:
            self._db.close()
        except Exception:
            if self._unsure is None:
                raise
            # the failed write's error again: the handle is closed all the same


def write_synced(db: Any, batch: WriteBatch) -> None:
    """Apply `batch` atomically and return once it is durable (its WAL synced); the GIL is free during the sync.
    On failure a `SyncedDB` is marked to be reopened before its next use (the module's note)."""
    try:
        db.write(batch, _UNSYNCED)
        db.flush_wal(True)
    except Exception as exc:
        mark = getattr(db, "sync_failed", None)
        if mark is not None:
            mark(exc)
        raise


def put_synced(db: Any, key: bytes, value: bytes) -> None:
    """One key, as `write_synced`."""
    batch = WriteBatch()
    batch.put(key, value)
    write_synced(db, batch)
