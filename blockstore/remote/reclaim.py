"""Remote GC: the object of a block its node no longer holds is deleted from the bucket, but only once no
pool can still name it. A durable reclaim list (its own RocksDB beside the uploader's ledger) walks each
such block through four steps, each one synced before the next is taken, so a kill -9 anywhere only
repeats a step:

  gone       the block was uploaded (uploader ledger) and has left `block_table()` (compaction moved its
             live records out and deleted it, or every record died)
  reserved   every live key it held is now in a block whose index is published (checked key by key
             through `Store.locate_many`), and a gc number and the marker's content are recorded
  published  the "superseded" marker `gc/<node>/<gc no.>-<block>` is in the bucket; every pool drops
             the old pointers on its next poll (after it has ingested the moved records' new places)
  done       `grace_s` after publication: the data object (and its index object) are deleted

The grace rule: `grace_s` must exceed the longest time a pool may go between polls plus the longest read
(the client's timeout times its attempts), so a read that started before a pool dropped the pointer has
ended before the object goes. A pool later than that finds the object missing, re-polls and reads the
record from its new place (pool.py): a miss at worst, never wrong bytes."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rocksdict import Options, Rdict, WriteBatch

from blockstore import hooks
from blockstore.errors import InvalidArgument
from blockstore.records import Kind
from blockstore.remote.errors import RemoteError, RemoteUnavailable
from blockstore.remote.layout import GC, BlockIndex, Superseded, gc_key, index_key, index_name, name_seq
from blockstore.remote.synced_write import SyncedDB, write_synced
from blockstore.remote.uploader import Uploader

RECLAIM_DIR = "remote-reclaim"  # under the store's folder, beside the uploader's remote-ledger
_NEXT_GC = b"next_gc"
_LIVE = b"r/"  # + block id: a block on its way (state gone / reserved / published)
_DONE = b"d/"  # + block id: its object is deleted; never looked at again
_FLAGGED = b"f/"  # + block id: uploaded per the store's flag, its ledger mark cut by a crash (see _uploaded)


def _is_key(flag: bytes) -> bool:
    """Whether a block's remote flag is an object key (UTF-8); a damaged one is not."""
    try:
        flag.decode()
    except UnicodeDecodeError:
        return False
    return True


def _bid(block_id: int) -> bytes:
    return block_id.to_bytes(8, "big")


@dataclass
class ReclaimStatus:
    """Where each block on the reclaim list stands."""

    waiting: dict[int, str] = field(default_factory=dict)  # block id -> why its marker is not published
    published: list[int] = field(default_factory=list)  # marker out, object kept until the grace ends
    deleted: list[str] = field(default_factory=list)  # objects deleted by this pass
    done_blocks: int = 0
    last_error: str | None = None


class Reclaimer:
    def __init__(self, uploader: Uploader, *, grace_s: float, max_poll_interval_s: float,
                 path: str | None = None, clock: Callable[[], float] = time.time) -> None:
        s = uploader.objects.settings
        longest_read = s.timeout_s * (s.retries + 1)
        if not grace_s > max_poll_interval_s + longest_read:
            raise InvalidArgument(
                f"grace_s={grace_s} must exceed the longest poll interval ({max_poll_interval_s} s) plus the "
                f"longest read ({s.timeout_s} s x {s.retries + 1} attempts = {longest_read} s)")
        self.uploader, self.store, self.objects = uploader, uploader.store, uploader.objects
        self.node_id = uploader.node_id
        self.grace_s = grace_s
        self.clock = clock  # wall time: publication times must survive a restart
        opts = Options()
        opts.create_if_missing(True)
        # reopened after a failed durable write (synced_write.py)
        self._db = SyncedDB(path or os.path.join(self.store.path, RECLAIM_DIR), opts)
        self._lock = threading.Lock()
        self.last_error: str | None = None
        # the uploader ledger's marks, read whole on the first pass, then only those made since
        # (Ledger.uploaded_since): a pass costs the new uploads, not every upload ever made
        self._marks: dict[int, dict[str, Any]] | None = None
        self._mark_no = 0

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ the durable list

    def _get(self, key: bytes) -> Any:
        raw = self._db.get(key)
        return None if raw is None else json.loads(raw)

    def _write(self, puts: dict[bytes, Any], deletes: tuple[bytes, ...] = ()) -> None:
        batch = WriteBatch()
        for k, v in puts.items():
            batch.put(k, json.dumps(v).encode())
        for k in deletes:
            batch.delete(k)
        write_synced(self._db, batch)

    def _on_list(self) -> dict[int, dict[str, Any]]:
        out = {}
        for k, v in self._db.items(from_key=_LIVE):
            assert isinstance(k, bytes) and isinstance(v, bytes)  # this DB holds bytes keys and values only
            if not k.startswith(_LIVE):
                break
            out[int.from_bytes(k[len(_LIVE):], "big")] = json.loads(v)
        return out

    def _done_count(self) -> int:
        n = 0
        for k in self._db.keys(from_key=_DONE):
            assert isinstance(k, bytes)
            if not k.startswith(_DONE):
                break
            n += 1
        return n

    # ------------------------------------------------------------------ one pass

    def run_once(self) -> ReclaimStatus:
        """Find blocks gone since the last pass, publish the markers that are safe, delete the objects whose
        grace has ended. Stops at the first request the store will not take (`last_error` says it); the
        list keeps every block's step, so the next pass goes on from there. Never raises RemoteUnavailable."""
        with self._lock:
            st = ReclaimStatus()
            try:
                uploaded = self._uploaded()
                self._find_gone(uploaded)
                self._publish(uploaded, st)
                self._delete_expired(uploaded, st)
                self.last_error = None
            except RemoteUnavailable as exc:
                self.last_error = str(exc)
            live = self._on_list()
            st.published = sorted(b for b, r in live.items() if r["state"] == "published")
            st.waiting = {b: st.waiting.get(b, r["state"]) for b, r in live.items() if r["state"] != "published"}
            st.done_blocks, st.last_error = self._done_count(), self.last_error
            return st

    def _uploaded(self) -> dict[int, dict[str, Any]]:
        """Block id -> {data_key, index_key} of every block whose index is published: the uploader ledger's
        marks, plus blocks the store flags remote whose mark a crash cut (the uploader flags first, then
        marks, and trusts the flag after): their names come from the flag and the ledger's reservation, and
        are remembered here, since once such a block leaves the table nothing else would name it."""
        uploaded = self._ledger_marks()
        for k, v in self._db.items(from_key=_FLAGGED):
            assert isinstance(k, bytes) and isinstance(v, bytes)  # this DB holds bytes keys and values only
            if not k.startswith(_FLAGGED):
                break
            uploaded.setdefault(int.from_bytes(k[len(_FLAGGED):], "big"), json.loads(v))
        found = {}
        for e in self.store.block_table():
            res = None if not e.remote_name or e.block_id in uploaded else self.uploader.ledger.reservation(e.block_id)
            if res is not None and _is_key(e.remote_name):  # a damaged flag names nothing to reclaim
                found[e.block_id] = {"data_key": e.remote_name.decode(),
                                     "index_key": index_key(index_name(self.node_id, int(res["seq"]), e.block_id))}
        if found:
            self._write({_FLAGGED + _bid(b): r for b, r in found.items()})
            uploaded.update(found)
        return uploaded

    def _ledger_marks(self) -> dict[int, dict[str, Any]]:
        """Block id -> ledger mark of every uploaded block, kept between passes (what _uploaded adds from
        the store's flags is as permanent, and stays in it too)."""
        ledger = self.uploader.ledger
        if self._marks is None:
            self._mark_no = ledger.next_mark()
            self._marks = ledger.uploaded_blocks()
        else:
            new, self._mark_no = ledger.uploaded_since(self._mark_no)
            self._marks.update(new)
        return self._marks

    def _find_gone(self, uploaded: dict[int, dict[str, Any]]) -> None:
        """Uploaded blocks missing from the block table (read after the ledger: a block is in the table
        before it can be uploaded), new to the list, go on it in one synced write."""
        present = {e.block_id for e in self.store.block_table()}
        on_list = self._on_list()
        new = {b: rec for b, rec in uploaded.items()
               if b not in present and b not in on_list and self._db.get(_DONE + _bid(b)) is None}
        if new:
            self._write({_LIVE + _bid(b): {"state": "gone", "data_key": r["data_key"], "index_key": r["index_key"]}
                         for b, r in new.items()})

    def _publish(self, uploaded: dict[int, dict[str, Any]], st: ReclaimStatus) -> None:
        """Reserved markers first, in gc-number order (a pool's cursor follows those numbers), then the
        gone blocks that have become safe, each reserved and published in turn."""
        on_list = self._on_list()
        reserved = sorted((r["gc_seq"], b) for b, r in on_list.items() if r["state"] == "reserved")
        for _seq, b in reserved:
            self._put_marker(b, on_list[b])
        for b in sorted(b for b, r in on_list.items() if r["state"] == "gone"):
            rec = on_list[b]
            try:
                ready = self._safe_marker(b, rec, uploaded)
            except RemoteError as exc:  # its old index unreadable: this block waits, the others go on
                ready = f"its index object could not be read: {exc}"
            if isinstance(ready, str):
                st.waiting[b] = ready
                continue
            seq = self._next_gc()
            rec = {**rec, "state": "reserved", "gc_seq": seq, "marker": ready.encode().decode()}
            self._write({_LIVE + _bid(b): rec, _NEXT_GC: seq + 1})
            hooks.fire("remote.gc_reserved", b)
            self._put_marker(b, rec)

    def _put_marker(self, block_id: int, rec: dict[str, Any]) -> None:
        """PUT (an identical re-PUT after a crash is harmless), then mark published with the time the grace
        starts from."""
        self.objects.put(gc_key(self.node_id, int(rec["gc_seq"]), block_id), rec["marker"].encode())
        hooks.fire("remote.gc_marker_put", block_id)
        self._write({_LIVE + _bid(block_id): {**rec, "state": "published", "published_at": self.clock()}})

    def _safe_marker(self, block_id: int, rec: dict[str, Any],
                     uploaded: dict[int, dict[str, Any]]) -> Superseded | str:
        """The marker if every live key the old object held is now dead here or in an uploaded block (its
        index published); else why not yet. One GET of the old index, one lookup per namespace."""
        old = BlockIndex.decode(self.objects.get(rec["index_key"]))
        keys = [(e.ns, e.key) for e in old.entries if e.kind != Kind.TOMBSTONE]
        after = ""
        by_ns: dict[str, list[bytes]] = {}
        for ns, k in keys:
            by_ns.setdefault(ns, []).append(k)
        for ns, ks in by_ns.items():
            for k, loc in zip(ks, self.store.locate_many(ks, ns=ns)):
                if loc is None:
                    continue  # dead since: nothing to keep
                up = uploaded.get(loc.block_id)
                if up is None:
                    return f"key {k!r} moved to block {loc.block_id}, not uploaded yet"
                after = max(after, up["index_key"])
        return Superseded(self.node_id, block_id, rec["data_key"], rec["index_key"], after, keys)

    def _next_gc(self) -> int:
        """A fresh list (new node, wiped disk) continues after the last marker this node id published."""
        got = self._get(_NEXT_GC)
        if got is not None:
            return int(got)
        names = self.objects.list_after(f"{GC}{self.node_id}/", None)
        return 1 + max((name_seq(n) for n in names), default=-1)

    def _delete_expired(self, uploaded: dict[int, dict[str, Any]], st: ReclaimStatus) -> None:
        """Objects whose marker has been out for `grace_s`. The node's newest index object stays: a fresh
        ledger numbers its next index after it (the marker, which stays, drops its pointers anyway)."""
        newest_index = max((r["index_key"] for r in uploaded.values()), default="")
        now = self.clock()
        expired = [(b, rec) for b, rec in sorted(self._on_list().items())
                   if rec["state"] == "published" and now - float(rec["published_at"]) >= self.grace_s]
        # never an object the store itself still reads from (a block whose local copy was dropped)
        flags = [e.remote_name for e in self.store.block_table() if e.remote_name] if expired else []
        if not all(_is_key(f) for f in flags):  # a damaged flag could name any of them: nothing goes until fsck
            st.waiting.update({b: "a block's remote flag does not decode (run blockstore fsck)" for b, _r in expired})
            return
        named = {f.decode() for f in flags}
        for b, rec in expired:
            if rec["data_key"] in named:
                st.waiting[b] = "its object is still named by a block of this store"
                continue
            self.objects.delete(rec["data_key"])
            st.deleted.append(rec["data_key"])
            hooks.fire("remote.gc_data_deleted", b)
            if rec["index_key"] != newest_index:
                self.objects.delete(rec["index_key"])
                st.deleted.append(rec["index_key"])
            self._write({_DONE + _bid(b): {"data_key": rec["data_key"]}}, (_LIVE + _bid(b),))


def adopt_published(store_path: str, markers: dict[str, Superseded], *, clock: Callable[[], float] = time.time,
                    path: str | None = None) -> int:
    """For a node restored from the bucket (restoring.py): the markers its lost disk had published, whose
    objects are still there, go on the new reclaim list as published now, so a Reclaimer on the restored
    store deletes them once `grace_s` has passed from here (the old publication time was lost with the disk;
    restarting the grace only waits longer) instead of leaving them in the bucket for good. `markers`: gc
    key -> its marker. Returns how many were added (a block already on the list or done is left alone)."""
    opts = Options()
    opts.create_if_missing(True)
    db = Rdict(path or os.path.join(store_path, RECLAIM_DIR), opts)
    try:
        batch, added, now = WriteBatch(), 0, clock()
        for key, m in markers.items():
            if db.get(_LIVE + _bid(m.block_id)) is not None or db.get(_DONE + _bid(m.block_id)) is not None:
                continue
            # no "marker": it is in the bucket already and is never put again (only a reserved one is)
            rec = {"state": "published", "data_key": m.data_key, "index_key": m.index_key, "gc_seq": name_seq(key),
                   "published_at": now}
            batch.put(_LIVE + _bid(m.block_id), json.dumps(rec).encode())
            added += 1
        write_synced(db, batch)
        return added
    finally:
        db.close()
