"""The durable write of the remote tier's own RocksDBs (the uploader's ledger, the reclaim list, the pool's
index): one write batch that has reached the disk when the call returns.

The batch goes to the WAL unsynced, then `flush_wal(True)` syncs the WAL, as the engine's directory does
(directory.py, since 2d3a964). A write with `WriteOptions.sync` holds the GIL through its fsync in
rocksdict, stopping every thread of the process (the store's readers included) for the disk's sync latency;
`flush_wal` releases it. Equally durable: the call returns only once the WAL holding the batch is synced.
One difference, on failure only: a sync that fails after the write leaves the batch readable in this process
(a synced write whose sync fails is not applied), durable or not; the caller got the error, and the WAL is
written in order, so a later write that does sync makes this batch durable with it: no later step is ever
durable without the ones before it. A reopen replays whatever the WAL holds.
"""

from __future__ import annotations

from rocksdict import Rdict, WriteBatch, WriteOptions

_UNSYNCED = WriteOptions()


def write_synced(db: Rdict, batch: WriteBatch) -> None:
    """Apply `batch` atomically and return once it is durable (its WAL synced); the GIL is free during the sync."""
    db.write(batch, _UNSYNCED)
    db.flush_wal(True)


def put_synced(db: Rdict, key: bytes, value: bytes) -> None:
    """One key, as `write_synced`."""
    batch = WriteBatch()
    batch.put(key, value)
    write_synced(db, batch)
