"""The uploader's durable local record, in its own RocksDB (never the engine's directory): which blocks
are uploaded, which publication number each block reserved, and the cursor below which every sealed
block is settled. A crash between any two steps leaves a record the next run finishes idempotently."""

from __future__ import annotations

import errno
import json
import threading
from typing import Any

from rocksdict import Options, WriteBatch

from blockstore.errors import IOErrorBS, NoSpace
from blockstore.remote.synced_write import SyncedDB, put_synced, write_synced

_CURSOR = b"cursor"  # every block id <= cursor is uploaded, deleted, or was never sealed here
_NEXT_SEQ = b"next_seq"  # the next publication number of this node's index objects
_UPLOADED = b"up/"
_RESERVED = b"res/"
# mk/<mark number, 8 bytes big-endian> -> block id: the order in which blocks were first marked uploaded, so
# a reader (remote GC) reads only the marks made since its last look (block ids do not give that order:
# blocks of different partitions seal, and so upload, out of id order; a crash's mark comes later still)
_MARKS = b"mk/"


def _bid(block_id: int) -> bytes:
    return block_id.to_bytes(8, "big")


class Ledger:
    def __init__(self, path: str) -> None:
        opts = Options()
        opts.create_if_missing(True)
        try:
            self._db = SyncedDB(path, opts)  # reopened after a failed durable write (synced_write.py)
        except Exception as exc:  # rocksdict raises a bare Exception carrying RocksDB's status text
            text = str(exc)
            if "No space" in text or "Disk quota" in text:
                raise NoSpace(errno.ENOSPC, f"open the remote tier's ledger {path!r}: the disk is full ({text})") from exc
            raise IOErrorBS(errno.EIO, f"open the remote tier's ledger {path!r}: {text}") from exc
        self._uploaded_count: int | None = None
        self._marks_lock = threading.Lock()  # a mark's number and its write go together (see uploaded_since)
        self._next_mark: int | None = None

    def close(self) -> None:
        self._db.close()

    def _put(self, key: bytes, value: Any) -> None:
        put_synced(self._db, key, json.dumps(value).encode())  # what the ledger says must survive a power loss

    def _get(self, key: bytes) -> Any:
        raw = self._db.get(key)
        return None if raw is None else json.loads(raw)

    @property
    def cursor(self) -> int:
        got = self._get(_CURSOR)
        return -1 if got is None else int(got)

    def set_cursor(self, block_id: int) -> None:
        self._put(_CURSOR, block_id)

    def next_seq(self) -> int | None:
        got = self._get(_NEXT_SEQ)
        return None if got is None else int(got)

    def uploaded(self, block_id: int) -> dict[str, Any] | None:
        got = self._get(_UPLOADED + _bid(block_id))
        return None if got is None else dict(got)

    def reservation(self, block_id: int) -> dict[str, Any] | None:
        got = self._get(_RESERVED + _bid(block_id))
        return None if got is None else dict(got)

    def reserve_many(self, seqs: dict[int, int], next_seq: int) -> None:
        """Before any PUT of a pass: each new block's publication number, in one synced write, so a
        retry after a crash reuses them (and readers' cursors, which follow them, skip nothing)."""
        batch = WriteBatch()
        for block_id, seq in seqs.items():
            batch.put(_RESERVED + _bid(block_id), json.dumps({"seq": seq}).encode())
        batch.put(_NEXT_SEQ, json.dumps(next_seq).encode())
        write_synced(self._db, batch)

    def mark_uploaded(self, block_id: int, record: dict[str, Any]) -> None:
        """Not synced: a mark lost to a power cut only turns the next pass into a retry, whose HEADs
        find both objects and send nothing (a process kill loses nothing: the WAL is written). A block's
        first mark also gets the next mark number (uploaded_since)."""
        with self._marks_lock:
            fresh = self._db.get(_UPLOADED + _bid(block_id)) is None
            batch = WriteBatch()
            batch.put(_UPLOADED + _bid(block_id), json.dumps(record).encode())
            batch.delete(_RESERVED + _bid(block_id))
            if fresh:
                n = self._mark_count()
                batch.put(_MARKS + n.to_bytes(8, "big"), _bid(block_id))
            self._db.write(batch)
            if fresh:
                self._next_mark = n + 1
                if self._uploaded_count is not None:
                    self._uploaded_count += 1

    def _mark_count(self) -> int:
        """The next mark number: found once per process (the last mk/ key), then kept in memory."""
        if self._next_mark is None:
            last = -1
            for k in self._keys(_MARKS):  # one per block; read once per process, like uploaded_count
                last = int.from_bytes(k[len(_MARKS):], "big")
            self._next_mark = last + 1
        return self._next_mark

    def next_mark(self) -> int:
        """The number the next first mark will get: read it before uploaded_blocks() to follow on with
        uploaded_since() (a mark made in between shows in both, harmlessly)."""
        with self._marks_lock:
            return self._mark_count()

    def uploaded_since(self, mark: int) -> tuple[dict[int, dict[str, Any]], int]:
        """The blocks first marked uploaded at mark number `mark` or later, and the number to pass next
        time: a caller that keeps what it read costs the new marks only. Marks made before mark numbers
        existed have none: read uploaded_blocks() once first (mark 0 then still returns only numbered ones)."""
        with self._marks_lock:  # a number is only ever seen with its mark written
            out: dict[int, dict[str, Any]] = {}
            nxt = mark
            for k, v in self._db.items(from_key=_MARKS + mark.to_bytes(8, "big")):
                assert isinstance(k, bytes) and isinstance(v, bytes)  # this DB holds bytes keys and values only
                if not k.startswith(_MARKS):
                    break
                rec = self.uploaded(int.from_bytes(v, "big"))
                if rec is not None:
                    out[int.from_bytes(v, "big")] = rec
                nxt = int.from_bytes(k[len(_MARKS):], "big") + 1
            return out, nxt

    def uploaded_count(self) -> int:
        """How many blocks are marked uploaded: counted once per process, then kept up to date by
        mark_uploaded (a status() per pass must not read every mark ever made)."""
        if self._uploaded_count is None:
            self._uploaded_count = sum(1 for _ in self._keys(_UPLOADED))
        return self._uploaded_count

    def _keys(self, prefix: bytes) -> Any:
        for k in self._db.keys(from_key=prefix):
            assert isinstance(k, bytes)
            if not k.startswith(prefix):
                return
            yield k

    def uploaded_blocks(self) -> dict[int, dict[str, Any]]:
        out = {}
        for k, v in self._db.items(from_key=_UPLOADED):
            assert isinstance(k, bytes) and isinstance(v, bytes)  # this DB holds bytes keys and values only
            if not k.startswith(_UPLOADED):
                break
            out[int.from_bytes(k[len(_UPLOADED):], "big")] = json.loads(v)
        return out
