"""Sealed blocks to the object store, each once: data object first, then its key index, then the
ledger. Blocks are found through `Store.block_table()` from a cursor and uploaded in block order; a
failure stops the pass (the block stays pending, later ones wait) so one node's index objects are
published in the order their names sort, which is what other nodes' list-after cursors rely on."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from blockstore import hooks
from blockstore.directory import BLOCK_SEALED
from blockstore.records import BLOCK_HEADER_SIZE, FOOTER_SIZE, Kind, ScanStop
from blockstore.remote.errors import RemoteError, RemoteUnavailable
from blockstore.remote.layout import (
    INDEX,
    BlockIndex,
    IndexEntry,
    check_node_id,
    data_key,
    index_key,
    index_name,
    object_name,
)
from blockstore.remote.ledger import Ledger
from blockstore.remote.objects import ObjectStore
from blockstore.store import Store

_log = logging.getLogger("blockstore.remote")
LEDGER_DIR = "remote-ledger"  # under the store's folder; the engine ignores folders it does not own
_KV_TOMBSTONE_META = b"\x01"  # keys.TOMBSTONE_META[SPACE_KV]: a KV key's tombstone (the others are chunks')


@dataclass
class UploadStatus:
    """What is uploaded and what is still pending (the object store may be unreachable)."""

    uploaded_blocks: int
    pending_blocks: list[int]
    pending_bytes: int
    last_error: str | None = None
    uploaded_bytes_this_pass: int = 0
    published: list[str] = field(default_factory=list)


class Uploader:
    def __init__(self, store: Store, objects: ObjectStore, node_id: str, *, ledger_path: str | None = None) -> None:
        self.store = store
        self.objects = objects
        self.node_id = check_node_id(node_id)
        self.ledger = Ledger(ledger_path or os.path.join(store.path, LEDGER_DIR))
        self._lock = threading.Lock()  # one pass at a time: publication order is the block order
        self.last_error: str | None = None

    def close(self) -> None:
        self.ledger.close()

    def pending(self) -> list[Any]:
        """Sealed blocks after the cursor that are not uploaded yet, in block order (one table snapshot).
        A block the store flags remote is uploaded (the flag is set after its index PUT), whatever the
        ledger says: a crash between the flag and the ledger's mark must not upload it twice."""
        cur = self.ledger.cursor
        return [e for e in self.store.block_table(after=cur) if e.state == BLOCK_SEALED and not self._settled(e)]

    def _settled(self, e: Any) -> bool:
        return bool(e.remote_name) or self.ledger.uploaded(e.block_id) is not None

    def confirm_uploaded(self) -> list[int]:
        """Flag in the store every block the ledger says is uploaded but the store does not know of (a
        crash between the ledger's mark and the flag; or blocks uploaded before the flag existed), so
        remote durability's waits and capacity drops see them. Returns the blocks flagged."""
        if self.store.read_only:
            return []
        done = []
        for e in self.store.block_table():
            if e.state != BLOCK_SEALED:
                continue
            rec = self.ledger.uploaded(e.block_id)
            if e.remote_name and rec is None:
                self._mark_from_flag(e.block_id, e.remote_name.decode(errors="replace"))
            elif not e.remote_name and rec is not None and self._same_file(e, rec) \
                    and self.store.mark_block_remote(e.block_id, str(rec["data_key"]).encode()):
                done.append(e.block_id)
        return done

    def _same_file(self, e: Any, rec: dict[str, Any]) -> bool:
        """Whether the ledger's mark is of this block's sealed file (its size). Else the mark is of another
        file under this id (recovery cut the block after its upload, or the id was handed out again):
        flagged, its local copy could be dropped for an object that does not hold it, so it stays local
        (a remote wait on it times out: honest)."""
        if rec.get("size") == e.data_end + FOOTER_SIZE:
            return True
        _log.warning("%s: block %016x: the ledger's upload mark is of a file of %s bytes, the block's has %d: "
                     "not flagged remote", self.store.path, e.block_id, rec.get("size"), e.data_end + FOOTER_SIZE)
        return False

    def _mark_from_flag(self, block_id: int, dkey: str) -> None:
        """A crash between the store's flag and the ledger's mark (H4's request): complete the ledger from
        the flag (the data key) and the reservation (the index key), so its record of uploads is whole."""
        res = self.ledger.reservation(block_id)
        if res is None:
            return  # uploaded before this ledger (a wiped disk): nothing names its index here
        try:
            file_xxh3 = int(dkey.rsplit("-", 1)[1], 16)
        except (IndexError, ValueError):  # not a name this uploader gives: a damaged flag, left to fsck
            _log.warning("%s: block %016x is flagged remote as %r, not a data object's name: the ledger is not "
                         "completed from it", self.store.path, block_id, dkey)
            return
        self.ledger.mark_uploaded(block_id, {
            "data_key": dkey, "index_key": index_key(index_name(self.node_id, int(res["seq"]), block_id)),
            "file_xxh3": file_xxh3})

    def status(self) -> UploadStatus:
        pend = self.pending()
        return UploadStatus(self.ledger.uploaded_count(), [e.block_id for e in pend],
                            sum(e.data_end for e in pend), self.last_error)

    def run_once(self) -> UploadStatus:
        """Upload every pending block in order; stop at the first one the store will not take (it and
        the rest stay pending: `status()` names them). Never raises RemoteUnavailable."""
        with self._lock:
            sent = 0
            published: list[str] = []
            # Index PUTs (and the ledger marks) run on one worker, in submission order, overlapping the
            # next block's data PUT: at most one data and one index request in flight, and each index
            # still goes after its own data and after every earlier index.
            indexes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="remote-index")
            failed: list[BaseException] = []
            try:
                order = self._in_publication_order(self.pending())
                fresh = self._reserve([e.block_id for e in order])
                inflight: list[Future[None]] = []
                for e in order:
                    # at most one index PUT still running while the next data PUT goes: the data of
                    # later blocks never runs far ahead of what is published (nor of a kill's leftovers)
                    while len(inflight) > 1:
                        inflight.pop(0).result()
                    if failed:
                        break
                    if not self.store.has_block(e.block_id):
                        continue  # deleted since the snapshot (compaction emptied it): nothing to keep
                    sent += self._upload(e.block_id, e.data_end, published, failed, indexes, inflight,
                                         retry=e.block_id not in fresh)
                indexes.shutdown(wait=True)
                if failed:
                    raise failed[0]
                self.last_error = None
            except RemoteUnavailable as exc:
                self.last_error = str(exc)
            finally:
                indexes.shutdown(wait=True)
            self._advance_cursor()
            st = self.status()
            st.uploaded_bytes_this_pass, st.published = sent, published
            return st

    def _reserve(self, block_ids: list[int]) -> set[int]:
        """Publication numbers for the blocks that have none, in one synced ledger write for the whole
        pass (not one per block); returns those blocks: their names were never used, so no HEAD."""
        new = [b for b in block_ids if self.ledger.reservation(b) is None]
        if new:
            first = self._first_free_seq()
            self.ledger.reserve_many({b: first + i for i, b in enumerate(new)}, first + len(new))
        return set(new)

    def _in_publication_order(self, pending: list[Any]) -> list[Any]:
        """Blocks that reserved a publication number before a crash go first, in that order: publishing
        a later number before them would let a reader's cursor step over them."""
        def order(e: Any) -> tuple[int, int]:
            res = self.ledger.reservation(e.block_id)
            return (int(res["seq"]) if res is not None else 1 << 62, e.block_id)
        return sorted(pending, key=order)

    def _advance_cursor(self) -> None:
        """Move the cursor to just below the lowest block that is not settled (open or pending)."""
        table = self.store.block_table(after=self.ledger.cursor)
        unsettled = [e.block_id for e in table if e.state != BLOCK_SEALED or not self._settled(e)]
        top = max((e.block_id for e in table), default=self.ledger.cursor)
        new = (min(unsettled) - 1) if unsettled else top
        if new > self.ledger.cursor:
            self.ledger.set_cursor(new)

    def _read_sealed(self, block_id: int, data_end: int) -> tuple[bytes, list[IndexEntry], dict[str, int]]:
        """The sealed file's bytes, its KV records and KV tombstones, and the namespaces (name -> id) of all
        its records, read under a hold so the file outlives a concurrent deletion; records come from the
        engine's own scanner (records.py format)."""
        s = self.store
        names = {s.namespace_id(n): n for n in s.namespaces()}
        with s.hold_blocks([block_id]):
            path = s.blocks.path(block_id)
            with open(path, "rb") as f:
                data = f.read()
            fd = s.backend.open_ro(path)
            try:
                scanned = s.backend.scan(fd, BLOCK_HEADER_SIZE, data_end, False)
            finally:
                s.backend.close(fd)
        if scanned.stop != ScanStop.END:  # a sealed block that does not scan to its end is not uploaded
            raise RemoteError(f"block {block_id}: invalid record at {scanned.next_offset}: run fsck; not uploaded")
        entries = []
        used: dict[str, int] = {}
        for r in scanned.records:
            i = r.info
            if i.ns not in names:
                raise RemoteError(f"block {block_id}: record at {r.offset} names unknown namespace id {i.ns}")
            used[names[i.ns]] = i.ns
            if i.kind == Kind.CHUNK or (i.kind == Kind.TOMBSTONE and bytes(r.meta) != _KV_TOMBSTONE_META):
                continue  # chunk records are not indexed: a restore (restore.py) brings them back
            entries.append(IndexEntry(names[i.ns], bytes(r.key), i.kind, r.offset, i.payload_off, i.record_len,
                                      i.payload_len, i.seq, i.payload_xxh3))
        return data, entries, used

    def _first_free_seq(self) -> int:
        """A fresh ledger (new node, or a wiped disk under the same node id) continues after the last
        index this node id published, so readers' cursors never skip what it publishes next."""
        seq = self.ledger.next_seq()
        if seq is not None:
            return seq
        names = self.objects.list_after(f"{INDEX}{self.node_id}/", None)
        return 1 + max((int(n.rsplit("/", 1)[1].split("-", 1)[0], 16) for n in names), default=-1)

    def _upload(self, block_id: int, data_end: int, published: list[str], failed: list[BaseException],
                indexes: ThreadPoolExecutor, inflight: list[Future[None]], *, retry: bool) -> int:
        """One block: PUT data here, then hand its index PUT and ledger mark to the index worker. On a
        retry (its number was reserved by an earlier, interrupted pass) each PUT is skipped if a HEAD
        finds it already done."""
        res = self.ledger.reservation(block_id)
        assert res is not None
        data, entries, namespaces = self._read_sealed(block_id, data_end)
        file_xxh3 = xxhash.xxh3_64_intdigest(data)
        dkey = data_key(object_name(self.node_id, block_id, file_xxh3))
        ikey = index_key(index_name(self.node_id, int(res["seq"]), block_id))
        sent = 0
        if not retry or self.objects.size(dkey) != len(data):
            self.objects.put(dkey, data)
            sent = len(data)
        hooks.fire("remote.data_put", block_id)
        index = BlockIndex(self.node_id, block_id, dkey, file_xxh3, len(data), entries, namespaces).encode()
        mark = {"data_key": dkey, "index_key": ikey, "file_xxh3": file_xxh3, "size": len(data)}

        def publish() -> None:
            if failed:
                return  # an earlier index failed: publishing this one would let a cursor skip it
            try:
                if not retry or self.objects.size(ikey) is None:
                    self.objects.put(ikey, index)
                hooks.fire("remote.index_put", block_id)
                # the store's flag first (one synced directory write): a crash before the ledger's mark
                # then only makes the next pass skip the block (pending() trusts the flag)
                if not self.store.read_only:
                    self.store.mark_block_remote(block_id, dkey.encode())
                hooks.fire("remote.flagged", block_id)
                self.ledger.mark_uploaded(block_id, mark)
                published.append(ikey)
            except BaseException as exc:  # handed to run_once, which reports it
                failed.append(exc)
        inflight.append(indexes.submit(publish))
        return sent
