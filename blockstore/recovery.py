"""Crash recovery (docs/format.md §4): runs when a writer opens a store that was not closed cleanly,
or that has blocks left in state `open`.

Cost is bounded by what a crash can have touched: only blocks in state `open`, sealed blocks whose
footer does not verify, and in cache mode the blocks the crashed session created (a power cut can take
any unsynced page of them) are scanned; every other block costs one 64-byte footer read. Nothing is
scanned after a clean close.

Nothing here deletes a block file the directory does not name: since blocks are named in the
directory (synced) before their files exist, such a file means the directory lost writes, and the
store's open refuses (Store._refuse_unnamed_block_files) before recovery runs (invariant 4).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from blockstore import hooks, logs
from blockstore.backend import Backend
from blockstore.blocks import BlockFiles, seal_block_file, write_block_header
from blockstore.directory import BLOCK_OPEN, BLOCK_SEALED, BlockEntry, Directory, DirectoryBatch, Location
from blockstore.errors import CorruptionError
from blockstore.keys import block_key, chunk_session_key, location_key, reverse_key
from blockstore.records import BLOCK_HEADER_SIZE, BlockHeader, Footer, Kind


class RecoveringStore(Protocol):
    """What recovery needs of the store it recovers: public attributes only (a blockstore.Store is one),
    so recovery does not import the store."""

    @property
    def path(self) -> str: ...
    @property
    def store_id(self) -> int: ...
    @property
    def durability(self) -> str: ...
    @property
    def dir(self) -> Directory: ...
    @property
    def blocks(self) -> BlockFiles: ...
    @property
    def backend(self) -> Backend: ...

_log = logs.get("recovery")


def recover(store: RecoveringStore, *, full: bool = True) -> dict[str, Any]:
    """Bring directory and blocks back into agreement. `full=False` only handles blocks left open."""
    report: dict[str, Any] = {
        "scanned_blocks": [], "truncated_bytes": 0, "dropped_entries": 0,
        "missing_blocks": [], "forgotten_blocks": [], "max_seq": 0,
    }
    d, files = store.dir, store.blocks.list_files()
    entries = d.load_blocks()
    # In cache mode nothing the crashed session wrote was synced before its close: any page of its
    # blocks may be gone after a power cut, so each is verified (sync mode syncs before it acknowledges).
    # The crashed session's mode is the last writer's (the MANIFEST's), not this opener's: a cache-mode
    # open after a sync session's crash took damage to that session's blocks for unsynced pages and dropped
    # acknowledged records, silently and for good (tests/test_review_session26.py).
    session_first = d.get_meta("session_first_block") or 0
    promised = getattr(store, "last_durability", None) or store.durability
    recent_unsynced = promised == "cache" and full
    for bid, e in sorted(entries.items()):
        recent = recent_unsynced and bid >= session_first
        if bid not in files:
            _missing_block(store, e, recent, report)
            continue
        if e.state == BLOCK_OPEN or (full and (recent or not _footer_ok(store, files[bid], e))):
            _recover_block(store, e, files[bid], report, recent=recent)
    if report["max_seq"] >= (d.get_meta("next_seq") or 1):
        b = DirectoryBatch()
        b.put_meta("next_seq", report["max_seq"] + 1)
        d.write(b, force_sync=True)
    if full:
        store.backend.dir_sync(store.blocks.folder)
    lost = report["dropped_entries"] or report["missing_blocks"]
    _log.log(logging.WARNING if lost else logging.INFO, "%s: recovered %s: %s", store.path,
             "after an unclean stop" if full else "the blocks a clean close left open", describe(report))
    return report


def describe(report: dict[str, Any]) -> str:
    """What a recovery report says, in words (for the log and for tools)."""
    scanned = report["scanned_blocks"]
    parts = [f"scanned {len(scanned)} block(s)" + (f" ({', '.join(f'{b:016x}' for b in scanned[:8])}"
                                                  + (", ...)" if len(scanned) > 8 else ")") if scanned else "")]
    parts.append(f"cut {report['truncated_bytes']} byte(s) of unacknowledged or torn tail")
    parts.append(f"dropped {report['dropped_entries']} directory entr(ies) naming records that were lost")
    if report["forgotten_blocks"]:
        parts.append(f"forgot {len(report['forgotten_blocks'])} block(s) whose files a crash left uncreated or lost")
    if report["missing_blocks"]:
        parts.append(f"{len(report['missing_blocks'])} block file(s) missing with live records "
                     "(reads of them raise CorruptionError; run `blockstore fsck --repair`)")
    return "; ".join(parts)


def _footer_ok(store: RecoveringStore, path: str, e: BlockEntry) -> bool:
    fd = store.backend.open_ro(path)
    try:
        f = store.blocks.read_footer(fd)
    finally:
        store.backend.close(fd)
    return f is not None and f.block_id == e.block_id and f.data_end == e.data_end


def _drop_location(batch: DirectoryBatch, suffix: bytes, loc: Location | None) -> None:
    batch.delete(location_key(suffix))
    if loc is not None and loc.kind == Kind.CHUNK:
        skey = chunk_session_key(suffix, loc)
        if skey is not None:  # an unreadable meta only leaves a stale session entry (fsck reports it)
            batch.delete(skey)


def _missing_block(store: RecoveringStore, e: BlockEntry, recent: bool, report: dict[str, Any]) -> None:
    """A block the directory names has no file. Legitimate only when nothing in it was committed (a
    crash between naming the block and creating its file) or, in cache mode, when the crashed session
    created it (a power cut may lose what was never synced): then the directory forgets it. Otherwise
    the file was lost by damage: its entries stay, reads of its records raise CorruptionError, and
    `blockstore fsck --repair` decides (an open does not turn damage into silent misses)."""
    if e.remote_name and e.state == BLOCK_SEALED:
        return  # the remote tier dropped its local copy once its object was confirmed: reads fetch from it
    if e.data_end <= BLOCK_HEADER_SIZE or e.total_records == 0 or recent:
        _forget_block(store, e, report)
        return
    report["missing_blocks"].append(e.block_id)
    _log.warning("%s: block %016x holds %d live record(s) but its file is missing; reads of them raise "
                 "CorruptionError; run `blockstore fsck --repair %s`", store.path, e.block_id,
                 e.live_records, store.path)


def _drop_place(batch: DirectoryBatch, suffix: bytes, loc: Location, block_id: int, offset: int,
                staged: dict[bytes, Location | None], promoted: list[tuple[bytes, Location, int]]) -> None:
    """The value stops naming the place (block_id, offset): a key with copies keeps its other places
    (each in a block whose counters already count it), one without loses its entry. `staged`: values
    this batch already changed (a key may have two places in one block). A dropped primary's promoted
    copy is listed in `promoted` (suffix, new value, the dropped offset): its block takes the key's
    logical bytes (`_give_logical`)."""
    if loc.copies:
        rest = loc.without(block_id, offset)
        batch.put_location(suffix, rest)
        staged[suffix] = rest
        if (loc.block_id, loc.offset) == (block_id, offset):
            promoted.append((suffix, rest, offset))
    else:
        _drop_location(batch, suffix, loc)
        staged[suffix] = None


def _give_logical(store: RecoveringStore, batch: DirectoryBatch, block_id: int,
                  promoted: list[tuple[bytes, Location, int]]) -> int:
    """A key's logical bytes count once, in its primary's block (docs/copies.md): each copy promoted to
    primary by this batch gives its block the key's bytes. Another block's entry is read as the directory
    holds it now and written in this batch (a block recovered later recounts from scratch). Returns the
    bytes owed to `block_id` itself: a promoted place there at an offset the caller's pass already
    counted as a copy (one at a later offset is counted as the primary when the pass reaches it)."""
    own = 0
    others: dict[int, int] = {}
    for suffix, rest, dropped_off in promoted:
        nbytes = len(suffix) - 5 + rest.payload_len
        if rest.block_id == block_id:
            if rest.offset < dropped_off:
                own += nbytes
        else:
            others[rest.block_id] = others.get(rest.block_id, 0) + nbytes
    for bid, nbytes in others.items():
        raw = store.dir.get(block_key(bid))
        if raw is None:
            continue
        entry = BlockEntry.decode(bid, bytes(raw))
        entry.live_logical_bytes += nbytes
        batch.put_block(entry)
    return own


def _current(store: RecoveringStore, suffix: bytes, staged: dict[bytes, Location | None]) -> Location | None:
    return staged[suffix] if suffix in staged else store.dir.get_locations([suffix])[0]


def _forget_block(store: RecoveringStore, e: BlockEntry, report: dict[str, Any]) -> None:
    """The block file is gone and nothing acknowledged depended on it: the directory stops naming it."""
    batch = DirectoryBatch()
    staged: dict[bytes, Location | None] = {}
    promoted: list[tuple[bytes, Location, int]] = []
    for off, suffix in store.dir.block_records(e.block_id):
        loc = _current(store, suffix, staged)
        if loc is not None and loc.holds(e.block_id, off):
            _drop_place(batch, suffix, loc, e.block_id, off, staged, promoted)
            report["dropped_entries"] += 1
        batch.delete(reverse_key(e.block_id, off))
    # every place in this block was dropped: only promotions to other blocks remain to count
    _give_logical(store, batch, e.block_id, [p for p in promoted if p[1].block_id != e.block_id])
    batch.delete_block(e.block_id)
    store.dir.write(batch, force_sync=True)
    report["forgotten_blocks"].append(e.block_id)


def _header_ok(store: RecoveringStore, fd: int, e: BlockEntry) -> bool:
    """Whether the block file's header parses and names this block of this store."""
    try:
        h = store.backend.decode_block_header(store.backend.pread(fd, 64, 0))
    except CorruptionError:
        # a header that does not parse: nothing in the block can be trusted. An I/O error is not that:
        # it propagates (the next open retries) instead of dropping every record the block holds, as it
        # did before (found by tests/test_faults.py, recovery-eio)
        return False
    return bool(h.block_id == e.block_id and h.store_id == store.store_id)


def _recover_block(store: RecoveringStore, e: BlockEntry, path: str, report: dict[str, Any], *, recent: bool = False) -> None:
    """Cut the block after its last committed record that verifies, drop the entries naming what was
    cut, seal it. `recent`: a cache-mode block of the crashed session, whose unsynced pages a power cut
    may have taken (then its committed records may be lost too, like any recent put)."""
    b = store.backend
    fd = b.open(path, False)
    try:
        size = b.size(fd)
        header_ok = _header_ok(store, fd, e)
        valid: dict[int, Any] = {}
        valid_end = BLOCK_HEADER_SIZE
        # Records past the block's committed end were appended by a group whose directory batch never
        # committed (a crash, or a failed sync or write after the append): nothing acknowledged them and
        # nothing names them. Kept, they would outrank the directory in a rebuild from blocks (a failed
        # delete's tombstone, a failed put's value; found by tests/test_faults.py): they are tail too.
        committed_end = max(e.data_end, BLOCK_HEADER_SIZE)
        if header_ok and size > BLOCK_HEADER_SIZE:
            res = b.scan(fd, BLOCK_HEADER_SIZE, min(size, committed_end), True)
            for r in res.records:
                if not r.payload_ok:
                    break  # a torn payload: the tail starts here
                valid[r.offset] = r
                valid_end = r.offset + r.info.record_len
        hooks.fire("recovery.scanned", e.block_id)
        if valid_end < committed_end and not recent and (header_ok or e.total_records):
            # Committed data that does not verify, in a block whose data was synced before its directory
            # batch: damage, not a crash. Cutting here would drop acknowledged records after it; leave
            # the block as it is and let fsck --repair evacuate what verifies.
            raise CorruptionError(
                f"{store.path}: block {e.block_id:016x} has committed records that do not verify "
                f"(at offset {valid_end}, committed up to {committed_end}); "
                f"run `blockstore fsck --repair {store.path}`")
        batch = DirectoryBatch()
        live_bytes = live_records = live_logical = 0
        staged: dict[bytes, Location | None] = {}
        promoted: list[tuple[bytes, Location, int]] = []
        for off, suffix in list(store.dir.block_records(e.block_id)):
            loc = _current(store, suffix, staged)
            rec = valid.get(off)
            names_it = loc is not None and loc.holds(e.block_id, off)  # its primary or one of its copies
            if rec is not None and names_it and loc.seq == rec.info.seq:  # type: ignore[union-attr]
                live_bytes += rec.info.record_len
                live_records += 1
                if (loc.block_id, loc.offset) == (e.block_id, off):  # type: ignore[union-attr]
                    live_logical += rec.info.key_len + rec.info.payload_len  # once per key: its primary's block
                continue
            if names_it:
                _drop_place(batch, suffix, loc, e.block_id, off, staged, promoted)  # type: ignore[arg-type]
                report["dropped_entries"] += 1
            batch.delete(reverse_key(e.block_id, off))
        live_logical += _give_logical(store, batch, e.block_id, promoted)
        recs = list(valid.values())
        seqs = [r.info.seq for r in recs]
        report["max_seq"] = max([report["max_seq"], *seqs])
        if not header_ok:
            write_block_header(b, fd, BlockHeader(e.block_id, store.store_id, e.created_ns or time.time_ns(), 0))
        report["truncated_bytes"] += max(0, size - valid_end)
        footer = Footer(e.block_id, valid_end, len(recs), min(seqs, default=0), max(seqs, default=0))
        seal_block_file(b, fd, footer, sync=True)
        ne = BlockEntry(
            e.block_id, BLOCK_SEALED, e.partition,
            written_bytes=sum(r.info.record_len for r in recs),
            live_bytes=live_bytes, live_records=live_records, total_records=len(recs),
            tombstones=sum(1 for r in recs if r.info.kind == Kind.TOMBSTONE),
            data_end=valid_end, created_ns=e.created_ns, last_append_ns=e.last_append_ns,
            sealed_ns=time.time_ns(), live_logical_bytes=live_logical,
            # the confirmed object still holds the file as it was: the flag stays only if nothing was cut
            remote_name=e.remote_name if valid_end == committed_end else b"",
        )
        batch.put_block(ne)
        store.dir.write(batch, force_sync=True)
        report["scanned_blocks"].append(e.block_id)
    finally:
        b.close(fd)
