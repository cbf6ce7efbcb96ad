"""The engine's side of the object-store tier (docs/remote.md): the remote flag of sealed blocks, dropping
a local copy only once its object is confirmed, the read fallback's fetcher, and `durability="remote"`'s
wait for confirmation.

The engine never imports the tier (blockstore.remote): the tier registers a seal observer, confirms blocks
with `mark_remote` and hands a fetcher for the read path; everything here works on the block table.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence

from blockstore import logs
from blockstore.directory import BLOCK_SEALED, BlockEntry, DirectoryBatch
from blockstore.errors import CorruptionError, InvalidArgument, NotFound, RemoteNotConfirmed
from blockstore.records import BLOCK_HEADER_SIZE, FOOTER_SIZE, ScanStop
from blockstore.writer import WriteEngine

_log = logs.get("tiering")

# fetch(block id, its remote name, [(start, end)] byte ranges of the block file) -> the bytes of each range
BlockFetcher = Callable[[int, bytes, Sequence[tuple[int, int]]], Sequence[bytes | bytearray | memoryview]]

MAX_REMOTE_NAME = 1024


class Tiering:
    """Remote flags and remote durability for one writable (or read-only) store's engine."""

    def __init__(self, engine: WriteEngine, *, remote_seal_seconds: float, remote_timeout: float) -> None:
        self.engine = engine
        self.seal_observers: list[Callable[[int], None]] = []
        engine.seal_observers = self.seal_observers
        self.fetcher: BlockFetcher | None = None
        self.remote_seal_seconds = remote_seal_seconds
        self.remote_timeout = remote_timeout
        self._cv = threading.Condition()
        self._changes = 0  # bumped by every confirmation and seal: a waiter wakes only on news
        self._unconfirmed: set[int] = set()  # blocks in the table not confirmed remote (remote waits)
        self._newest = 0  # the highest block id committed to the table
        # unconfirmed blocks that left the table -> the newest block id when that was seen: compaction may
        # have moved their records to any block up to it, which a write they held must wait for too
        self._vanished: dict[int, int] = {}
        self._closed = False  # the store closed: a remote wait can no longer be confirmed through it
        self.seal_observers.append(self._note_seal)

    def _note_seal(self, _block_id: int) -> None:
        self._notify()

    def store_closed(self) -> None:
        """At the store's close: wake the remote waits, which end at once instead of at remote_timeout."""
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        with self._cv:
            self._changes += 1
            self._cv.notify_all()

    # ---- the remote flag ----

    def mark_remote(self, block_id: int, name: bytes) -> bool:
        """Record that the object `name` holds sealed block `block_id` (one synced directory write).
        False if the block is gone (compaction emptied it: nothing to record). Idempotent."""
        if not isinstance(name, (bytes, bytearray)) or not name or len(name) > MAX_REMOTE_NAME:
            raise InvalidArgument(f"remote name must be 1 to {MAX_REMOTE_NAME} bytes, got {name!r:.80}")
        try:
            bytes(name).decode()
        except UnicodeDecodeError:
            raise InvalidArgument(f"remote name must be an object key (UTF-8), got {name!r:.80}") from None
        eng = self.engine
        eng.check_open(write=True)
        # with the leader slot held: a group copies the entry it changes and writes the copy back, so a
        # flag set beside a group in flight would be overwritten by the group's older copy
        with eng.slot.exclusive():
            eng.settle_failed_commit()  # else a failed group settled later puts its copy (no flag) of the entry back
            with eng.state_lock:
                e = eng.table.get(block_id)
            if e is None:
                return False
            if e.state != BLOCK_SEALED:
                raise InvalidArgument(f"block {block_id:016x} is not sealed: only a sealed block's object is final")
            if e.remote_name == bytes(name):
                return True
            e = e.copy()
            e.remote_name = bytes(name)
            b = DirectoryBatch()
            b.put_block(e)
            eng.dir.write(b, force_sync=True)
            with eng.state_lock:
                eng.table[block_id] = e
        self._notify()
        return True

    def remote_name(self, block_id: int) -> bytes:
        """The confirmed object of a block (b"" if none, or if the table does not name the block)."""
        with self.engine.state_lock:
            e = self.engine.table.get(block_id)
        return b"" if e is None else e.remote_name

    def has_local_copy(self, block_id: int) -> bool:
        return self.engine.blocks.exists(block_id)

    def drop_local_copy(self, block_id: int) -> int:
        """Delete a sealed block's local file once its object is confirmed (the block stays in the table;
        reads fetch from the object). Returns the bytes freed (0 if already dropped). Refuses a block
        that is not flagged remote: nothing deletes data it cannot prove is kept elsewhere."""
        eng = self.engine
        eng.check_open(write=True)
        with eng.slot.exclusive():
            with eng.state_lock:
                e = eng.table.get(block_id)
            if e is None:
                raise NotFound(f"block {block_id:016x} is not in the block table")
            if not e.remote_name:
                raise InvalidArgument(f"block {block_id:016x} has no confirmed remote copy: its local file is the "
                                      "only one and is kept (mark_block_remote comes after the upload)")
            try:
                fd = eng.backend.open_ro(eng.blocks.path(block_id))
            except NotFound:
                return 0
            try:
                size = eng.backend.size(fd)
            finally:
                eng.backend.close(fd)
            # the footer's sequence numbers, read while the file is here: eviction's floor needs them, and
            # without a local file it would count the block as holding anything (refusing every eviction)
            eng._footer_seqs(block_id)
            eng.blocks.delete(block_id)  # now, or when the last reader lets go of it
        _log.info("%s: dropped the local copy of block %016x (%d bytes; its object is %r)", eng.path, block_id,
                  size, e.remote_name)
        return size

    def restore_local_copy(self, block_id: int, data: bytes | bytearray | memoryview) -> bool:
        """Put a dropped block's file back from its object's bytes (the read fallback's "keep it locally
        again"). The bytes must be that block's sealed file (its header names the block and this store,
        its footer the block and its committed end, the size matches the table); written to a temporary
        name, synced, renamed, the folder synced. False if the block is gone or its file is there."""
        eng = self.engine
        eng.check_open(write=True)
        view = memoryview(data).cast("B")
        with eng.slot.exclusive():
            with eng.state_lock:
                e = eng.table.get(block_id)
            if e is None:
                return False
            if not e.remote_name:
                raise InvalidArgument(f"block {block_id:016x} is not flagged remote: it was never dropped")
            if eng.blocks.exists(block_id):
                return False
            self._check_block_bytes(block_id, e.data_end, view)
            path = eng.blocks.path(block_id)
            tmp = path + ".restore"  # not a block file's name: an open ignores what a crash leaves of it
            fd = eng.backend.open(tmp, True)
            try:
                eng.backend.truncate(fd, 0)
                eng.backend.pwrite(fd, bytes(view), 0)
                # every record must scan and verify, as a read would: a bad copy written here would
                # shadow the intact object (reads go local again) and look like local damage to fsck
                scan = eng.backend.scan(fd, BLOCK_HEADER_SIZE, e.data_end, True)
                if scan.stop != ScanStop.END or not all(r.payload_ok for r in scan.records):
                    raise CorruptionError(f"block {block_id:016x}: the bytes given do not verify (a record "
                                          f"at or after offset {scan.next_offset} is damaged); not restored")
                eng.backend.sync(fd)
            except BaseException:
                eng.backend.close(fd)
                eng.backend.unlink(tmp)
                raise
            eng.backend.close(fd)
            os.rename(tmp, path)
            eng.backend.dir_sync(eng.blocks.folder)
        _log.info("%s: restored the local copy of block %016x from %r", eng.path, block_id, e.remote_name)
        return True

    def _check_block_bytes(self, block_id: int, data_end: int, view: memoryview) -> None:
        be = self.engine.backend
        if len(view) != data_end + FOOTER_SIZE:
            raise CorruptionError(f"block {block_id:016x}: {len(view)} bytes given, its sealed file has "
                                  f"{data_end + FOOTER_SIZE}")
        if data_end < BLOCK_HEADER_SIZE:
            raise CorruptionError(f"block {block_id:016x}: its committed end {data_end} is inside its header")
        header = be.decode_block_header(bytes(view[:64]))
        footer = be.decode_footer(bytes(view[data_end:]))
        if header.block_id != block_id or header.store_id != self.engine.store_id \
                or footer.block_id != block_id or footer.data_end != data_end:
            raise CorruptionError(f"block {block_id:016x}: the bytes given are another block's file")

    # ---- remote durability ----

    def adopt_table(self, *, remote_durability: bool) -> None:
        """After the open loaded the block table: every block not confirmed yet, and the newest id. Only
        `remote` mode waits, so only it tracks them (pruned at each wait; else the set would keep the id of
        every block ever made)."""
        if not remote_durability:
            return
        eng = self.engine
        with eng.state_lock:
            self._note_entries(eng.table)
        eng.table_observer = self._note_entries

    def _note_entries(self, entries: dict[int, BlockEntry]) -> None:
        """The entries a commit put in the table (the state lock is held): a block enters the table only
        this way, so a write that returned is in a block noted here, at or below `_newest`."""
        for bid, e in entries.items():
            if not e.remote_name:
                self._unconfirmed.add(bid)
            self._newest = max(self._newest, bid)

    def _pending(self, up_to: int) -> tuple[list[int], bool, int]:
        """Blocks with id <= up_to not confirmed remote yet, and whether one of them is still open. Costs
        the number of unconfirmed blocks, not the size of the table. Also the horizon: up_to, raised past
        the blocks that moves out of a vanished block may have filled."""
        eng = self.engine
        with eng.state_lock:
            pend = []
            for bid in list(self._unconfirmed):
                e = eng.table.get(bid)
                if e is None:  # deleted: its records died, or were moved to a block committed since
                    self._vanished[bid] = self._newest
                if e is None or e.remote_name:
                    self._unconfirmed.discard(bid)
            up_to = self._horizon(up_to)
            pend = [e for bid in self._unconfirmed if bid <= up_to and (e := eng.table.get(bid)) is not None]
            self._prune_vanished()
        pend.sort(key=lambda e: e.block_id)
        return [e.block_id for e in pend], any(e.state != BLOCK_SEALED for e in pend), up_to

    def _horizon(self, up_to: int) -> int:
        """The highest block a record of a block <= up_to may be in now: moves out of vanished blocks
        followed (a moved record may move again; moves only go to newer blocks)."""
        for bid in sorted(self._vanished):
            if bid <= up_to:
                up_to = max(up_to, self._vanished[bid])
        return up_to

    def _prune_vanished(self) -> None:
        """Forget a vanished block once every block its records may be in is confirmed: its horizon below
        the lowest unconfirmed block and below every vanished block still kept (a chain through it)."""
        floor = min(self._unconfirmed, default=1 << 64)
        for bid in sorted(self._vanished, reverse=True):
            if self._vanished[bid] < floor:
                del self._vanished[bid]
            else:
                floor = min(floor, bid)

    def newest_block(self) -> int:
        """The highest block id committed to the table so far: a write that returned is at or below it."""
        with self.engine.state_lock:
            return self._newest

    def check_attached(self) -> None:
        """A remote-mode write needs something that uploads sealed blocks (a seal observer besides ours)."""
        if not self.seal_observers[1:]:
            raise InvalidArgument("durability='remote' acknowledges a write only once the remote tier confirms "
                                  "its block, and no remote tier is attached (blockstore.remote.RemoteTier)")

    def wait_confirmed(self, up_to: int) -> None:
        """Return once every block with id <= up_to (a write that just returned locally is in one of them)
        is sealed and confirmed remote, or deleted. Open ones are sealed after remote_seal_seconds, so the
        wait is bounded by that plus the uploads; RemoteNotConfirmed after remote_timeout."""
        start = time.monotonic()
        seal_at, deadline = start + self.remote_seal_seconds, start + self.remote_timeout
        while True:
            with self._cv:
                seen = self._changes
            pend, still_open, horizon = self._pending(up_to)
            if not pend:
                return
            if self._closed:  # a waiter woken by close: before, it slept out remote_timeout (30 s) for nothing
                raise RemoteNotConfirmed(
                    errno.ECANCELED, f"{self.engine.path}: the store was closed before the object store confirmed "
                    f"block(s) {', '.join(f'{b:016x}' for b in pend[:8])}: the write is durable locally and queued "
                    "for upload (the next remote tier on this store sends it), not acknowledged as remote")
            now = time.monotonic()
            if still_open and now >= seal_at and self.engine.seal_open_blocks(horizon):
                continue
            if now >= deadline:
                raise RemoteNotConfirmed(
                    errno.ETIMEDOUT, f"{self.engine.path}: the object store did not confirm block(s) "
                    f"{', '.join(f'{b:016x}' for b in pend[:8])} within {self.remote_timeout} s: the write is durable "
                    "locally and queued for upload, not acknowledged as remote (see the remote tier's status())")
            until = min(deadline, seal_at) if still_open else deadline
            with self._cv:
                if self._changes == seen:
                    self._cv.wait(max(0.0, until - now))
