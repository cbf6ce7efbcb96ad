"""The automatic remote tier: a store's sealed blocks uploaded in the background as they seal, retried with
backoff while the object store is unreachable, local copies dropped under capacity pressure once their
objects are confirmed, and reads of dropped blocks served from the objects (docs/remote.md).

    tier = RemoteTier(store, make_object_store(settings), "node-a", local_capacity_bytes=64 << 30)
    ...                     # puts; with durability="remote" each returns once its block is confirmed
    tier.status()           # what is pending, the last error, when the next retry is
    tier.close()            # seals what is open, uploads it (bounded wait), stops

It uses the Store's public seams only: add_seal_observer (wakes the uploader), mark_block_remote (the
uploader, after each index PUT), drop_local_copy, set_block_fetcher."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blockstore.directory import BLOCK_SEALED
from blockstore.errors import BlockstoreError, CorruptionError, InvalidArgument, NotFound, StoreClosed
from blockstore.records import FOOTER_SIZE
from blockstore.remote.objects import ObjectStore
from blockstore.remote.uploader import Uploader
from blockstore.store import Store

_log = logging.getLogger("blockstore.remote")

_RECENT_BLOCKS = 4096  # blocks whose last read time the tier remembers (bounded memory)
_CAPACITY_CHECK_S = 1.0


@dataclass
class TierStatus:
    """What the tier has done and what waits (`pending_blocks`: sealed, not confirmed remote yet)."""

    running: bool
    uploaded_blocks: int
    pending_blocks: list[int]
    pending_bytes: int
    last_error: str | None
    failures_in_a_row: int
    next_retry_s: float | None  # seconds until the next attempt while failing, else None
    local_bytes: int  # bytes of block files on the local disk
    dropped_blocks: int  # blocks whose local copy was dropped (their reads go to the object store)
    over_capacity_bytes: int  # local bytes above local_capacity_bytes that no confirmed block could free


def _object_key(block_id: int, name: bytes) -> str:
    """The object key a block's remote flag names; CorruptionError if the flag is not one (a damaged block
    entry: the tier writes UTF-8 keys only)."""
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise CorruptionError(f"block {block_id:016x}: its remote flag {name!r:.80} is not an object key (a damaged "
                              "block entry); run `blockstore fsck`") from None


class RemoteTier:
    """Runs an Uploader on its own thread for `store`. `local_capacity_bytes`: drop the oldest confirmed
    blocks' local copies while the store's block files exceed it (None: keep every local copy).
    `poll_s`: a pass at least this often even without a seal; retries back off from `retry_min_s`,
    doubling, to `retry_max_s`."""

    def __init__(self, store: Store, objects: ObjectStore, node_id: str, *, local_capacity_bytes: int | None = None,
                 poll_s: float = 5.0, retry_min_s: float = 0.2, retry_max_s: float = 10.0,
                 restore_after_reads: int | None = None, ledger_path: str | None = None) -> None:
        if local_capacity_bytes is not None and (isinstance(local_capacity_bytes, bool)
                                                 or not isinstance(local_capacity_bytes, int)
                                                 or local_capacity_bytes < 0):
            raise InvalidArgument(f"local_capacity_bytes must be an int >= 0 or None, got {local_capacity_bytes!r}")
        for name, value in (("poll_s", poll_s), ("retry_min_s", retry_min_s), ("retry_max_s", retry_max_s)):
            # bounded: inf (or an int too large for a float) passed, and the tier's thread then died at its first
            # wait with OverflowError, silently: nothing was ever uploaded
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
                raise InvalidArgument(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
        if retry_min_s > retry_max_s:
            raise InvalidArgument(f"retry_min_s ({retry_min_s}) must not exceed retry_max_s ({retry_max_s})")
        if restore_after_reads is not None and (isinstance(restore_after_reads, bool)
                                                or not isinstance(restore_after_reads, int) or restore_after_reads < 1):
            raise InvalidArgument(f"restore_after_reads must be an int >= 1 or None, got {restore_after_reads!r}")
        policy = getattr(store.compactor, "policy", None)
        if getattr(policy, "max_copies", 0):
            # A pool keeps one pointer per key (the last index it read): with copies it may point at a copy's
            # block, and remote GC's marker for that block would then drop a live key from every pool
            # (tests/test_review_copies.py, xfail). Until markers carry the surviving place: refused.
            raise InvalidArgument("the remote tier does not support copies of shared records yet: open the store "
                                  "with compaction max_copies=0 (the default)")
        self.restore_after_reads = restore_after_reads
        # when each block was last read (bounded: the most recent _RECENT_BLOCKS): capacity drops the
        # blocks read least recently first; and how often each dropped block was fetched since its drop
        self._last_read: OrderedDict[int, float] = OrderedDict()
        self._fetches: dict[int, int] = {}
        self._restore: set[int] = set()
        self._stat_lock = threading.Lock()
        self.store, self.objects = store, objects
        self.local_capacity_bytes = local_capacity_bytes
        self.poll_s, self.retry_min_s, self.retry_max_s = poll_s, retry_min_s, retry_max_s
        self.uploader = Uploader(store, objects, node_id, ledger_path=ledger_path)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._closed = False
        self._failures = 0
        self._retry_at: float | None = None
        self._error: str | None = None
        self._over = 0
        self._next_capacity_check = 0.0
        try:
            self.uploader.confirm_uploaded()
        except BaseException:
            self.uploader.close()
            raise
        store.set_block_fetcher(self._fetch)
        store.add_seal_observer(self._on_seal)
        store.add_read_observer(self._on_read)
        self._thread = threading.Thread(target=self._run, name=f"remote-tier-{node_id}", daemon=True)
        self._thread.start()

    def __enter__(self) -> RemoteTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the store's seams ----

    def _on_seal(self, _block_id: int) -> None:
        self._wake.set()  # on the writer's thread: only wake the uploader

    def _fetch(self, block_id: int, name: bytes, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        got = self.objects.get_ranges(_object_key(block_id, name), ranges)
        if self.restore_after_reads is not None:
            with self._stat_lock:
                if len(self._fetches) > _RECENT_BLOCKS:
                    self._fetches.clear()  # bounded memory: counting starts over
                n = self._fetches[block_id] = self._fetches.get(block_id, 0) + 1
                if n >= self.restore_after_reads and len(self._restore) < _RECENT_BLOCKS:
                    self._restore.add(block_id)
                    self._wake.set()  # the tier's thread fetches the whole object, off the read path
        return got

    def _on_read(self, _suffixes: Sequence[bytes], locs: Sequence[Any]) -> None:
        now = time.monotonic()
        with self._stat_lock:
            for loc in locs:
                if loc is not None:
                    self._last_read[loc.block_id] = now
                    self._last_read.move_to_end(loc.block_id)
            while len(self._last_read) > _RECENT_BLOCKS:
                self._last_read.popitem(last=False)

    # ---- the background pass ----

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                st = self.uploader.run_once()
                error = st.last_error
                if error is None:
                    self._restore_hot()
                    self._enforce_capacity()
            except StoreClosed:
                _log.warning("%s: remote tier: the store was closed under it (close the tier first); stopping",
                             self.store.path)
                return
            except BlockstoreError as exc:  # not the store being unreachable (that is last_error): logged too
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - this thread is the only uploader: it must outlive any failure
                # (a ledger write on a full disk raised rocksdict's bare Exception, and the thread died: nothing was
                # uploaded again and no local copy dropped until a restart); retried with backoff like the rest
                error = f"{type(exc).__name__}: {exc}"
                if self._error != error:
                    _log.error("%s: remote tier: unexpected failure of a pass", self.store.path, exc_info=True)
            if error is None:
                self._failures, self._retry_at, self._error = 0, None, None
                self._wake.wait(self.poll_s)
                continue
            self._failures += 1
            # the exponent capped: 2 ** 1024 is past a float, and the thread died of OverflowError after ~1024
            # failures in a row (hours of an unreachable bucket), never to upload again
            delay = min(self.retry_max_s, self.retry_min_s * 2.0 ** min(self._failures - 1, 64))
            if self._failures == 1 or self._error != error:
                _log.warning("%s: remote tier: uploads pending (%s); retrying in %.1f s", self.store.path, error, delay)
            self._error, self._retry_at = error, time.monotonic() + delay
            self._stop.wait(delay)  # not woken by seals: an unreachable store is not asked again sooner

    def _restore_hot(self) -> None:
        """Keep locally again the dropped blocks read `restore_after_reads` times since their drop, while
        the capacity has room for them without dropping another (no thrashing)."""
        with self._stat_lock:
            todo, self._restore = sorted(self._restore), set()
        if not todo:
            return
        local = set(self.store.blocks.list_files())
        table = {e.block_id: e for e in self.store.block_table()}
        used = sum(e.data_end for bid, e in table.items() if bid in local)
        for bid in todo:
            e = table.get(bid)
            if e is None or not e.remote_name or bid in local:
                continue
            if self.local_capacity_bytes is not None and used + e.data_end > self.local_capacity_bytes:
                continue
            if self.store.restore_local_copy(bid, self.objects.get(_object_key(bid, e.remote_name))):
                used += e.data_end
                with self._stat_lock:
                    self._fetches.pop(bid, None)
                    self._last_read[bid] = time.monotonic()
                    self._last_read.move_to_end(bid)

    def _enforce_capacity(self) -> None:
        """Drop confirmed blocks' local copies, those read least recently first (then the oldest), while
        the block files exceed the capacity."""
        cap = self.local_capacity_bytes
        if cap is None or time.monotonic() < self._next_capacity_check:
            return
        # at most once a second: the check lists blocks/ and copies the block table (a cost that grows
        # with the store), so the disk may overshoot the capacity by about a second of writes
        self._next_capacity_check = time.monotonic() + _CAPACITY_CHECK_S
        local = set(self.store.blocks.list_files())
        table = [e for e in self.store.block_table() if e.block_id in local]
        used = sum(e.data_end for e in table)
        with self._stat_lock:
            last = dict(self._last_read)
        table.sort(key=lambda e: (last.get(e.block_id, 0.0), e.block_id))
        for e in table:
            if used <= cap:
                break
            if e.state == BLOCK_SEALED and e.remote_name and self._object_holds(e) and self._drop(e.block_id):
                used -= e.data_end
                with self._stat_lock:
                    self._fetches.pop(e.block_id, None)
        self._over = max(0, used - cap)

    def _drop(self, block_id: int) -> int:
        """Bytes freed by dropping the block's local copy; 0 if compaction deleted the block since the
        table was copied (not an error: its file goes with it)."""
        try:
            return self.store.drop_local_copy(block_id)
        except NotFound:
            return 0

    def _object_holds(self, e: Any) -> bool:
        """Whether the object the block's flag names is in the bucket with the sealed file's size (one HEAD
        per drop): the flag is read from the directory, and a damaged or forged one must not cost the only
        copy of the block's records."""
        size = self.objects.size(e.remote_name.decode(errors="replace"))
        if size == e.data_end + FOOTER_SIZE:
            return True
        _log.warning("%s: block %016x is flagged remote as %r, but the bucket holds %s: its local copy is kept",
                     self.store.path, e.block_id, e.remote_name, "no such object" if size is None else f"{size} bytes")
        return False

    # ---- what callers see ----

    def status(self) -> TierStatus:
        if self._closed:  # its ledger is closed: rocksdict raised a bare DbClosedError
            raise StoreClosed(f"{self.store.path}: the remote tier is closed")
        st = self.uploader.status()
        local = set(self.store.blocks.list_files())
        table = self.store.block_table()
        retry_at = self._retry_at
        return TierStatus(
            running=self._thread.is_alive(), uploaded_blocks=st.uploaded_blocks, pending_blocks=st.pending_blocks,
            pending_bytes=st.pending_bytes, last_error=self._error or st.last_error,
            failures_in_a_row=self._failures,
            next_retry_s=None if retry_at is None else max(0.0, retry_at - time.monotonic()),
            local_bytes=sum(e.data_end for e in table if e.block_id in local),
            dropped_blocks=sum(1 for e in table if e.remote_name and e.block_id not in local),
            over_capacity_bytes=self._over)

    def drain(self, timeout: float = 30.0) -> bool:
        """Seal the open blocks and wait until every sealed block is uploaded; whether it got there."""
        if not self.store.read_only:
            self.store.seal_open_blocks()
        deadline = time.monotonic() + timeout
        while True:
            self._wake.set()
            if not self.uploader.pending():
                return True
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.05)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> bool:
        """Stop the tier (after `drain(timeout)` unless drain=False) and detach it from the store. Whether
        nothing was left pending; what is left is uploaded by the next tier on this store."""
        if self._stop.is_set():
            return True
        try:
            done = self.drain(timeout) if drain else not self.uploader.pending()
        except StoreClosed:
            # the store was closed first (a `with blockstore.open(...)` block around the tier): nothing more can be
            # sealed or uploaded from it, but the tier must still stop and release its ledger, or no tier could
            # open that ledger again in this process (RocksDB's lock) once the store is reopened
            done = False
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.store.remove_seal_observer(self._on_seal)
        self.store.remove_read_observer(self._on_read)
        self.store.set_block_fetcher(None)
        self.uploader.close()
        self._closed = True
        return done
