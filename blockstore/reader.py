"""The read path: from directory locations to verified payloads in caller (or page-aligned) memory.

One directory multi-get, then per block one backend call that coalesces neighbouring records into one
`preadv` straight into the destination buffers and verifies each payload's xxh3 before it is returned
(invariant 1). Blocks are pinned for the length of a read, so a deletion waits for the reader; a block
deleted between the lookup and the pin (compaction moved its records) makes the read look again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from blockstore import foreground, hooks
from blockstore.backend import Backend
from blockstore.blocks import BlockFiles, block_file_name
from blockstore.directory import BLOCK_RECLAIMING, BlockEntry, Directory, Location
from blockstore.errors import (
    BlockstoreError,
    ChecksumMismatch,
    CorruptionError,
    InvalidArgument,
    IOErrorBS,
    NotFound,
    error_for_code,
)
from blockstore.keys import block_key, key_suffix
from blockstore.records import PAGE, Buffer, ReadRequest

_log = logging.getLogger("blockstore")

READ_ATTEMPTS = 16  # lookups a read retries when its records' block vanished under it (compaction moved them)
# blocks a read holds (pinned, a descriptor open each) at once: a get_many over more is read in groups of this
# many, one read_files call each, so its descriptors stay within the fd cache's bound (BlockFiles'
# max_read_fds) and the process's open-file limit however many blocks it spans (all at once, as before, a
# get_many over 700 blocks failed with EMFILE under a 512-file limit: tests/test_review_session25.py)
READ_BLOCKS_AT_ONCE = 128
_SMALL_ARENA = 64 << 10
_TIMED_READS = 1024  # the most recent reads' (end, seconds) kept for pacing background work

ReadObserver = Callable[[Sequence[bytes], Sequence[Location | None]], None]


def aligned_buffer(size: int) -> memoryview:
    """Page-aligned anonymous memory (reads into it run ~2x faster than into a bytearray). Small
    buffers are a page-aligned slice of a bytearray instead: an mmap per small read cost ~15 us, more
    than the read of a chunk record itself (bench/scaling.py)."""
    if size <= _SMALL_ARENA:
        raw = bytearray(size + PAGE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(raw))
        start = -addr % PAGE
        return memoryview(raw)[start : start + size]
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def _destinations(keys: Sequence[bytes], locs: Sequence[Location | None],
                  out: Sequence[Buffer] | None) -> list[memoryview | None]:
    """Where each located payload goes: a slice of one page-aligned arena, or the caller's buffer."""
    dsts: list[memoryview | None] = [None] * len(keys)
    if out is None:
        total = sum(-(-loc.payload_len // PAGE) * PAGE for loc in locs if loc is not None)
        arena = aligned_buffer(total)
        pos = 0
        for i, loc in enumerate(locs):
            if loc is not None:
                dsts[i] = arena[pos : pos + loc.payload_len]
                pos += -(-loc.payload_len // PAGE) * PAGE
        return dsts
    for i, loc in enumerate(locs):
        if loc is not None:
            view = memoryview(out[i])
            if view.readonly or not view.c_contiguous:
                raise InvalidArgument(f"out[{i}] must be a writable C-contiguous buffer")
            view = view.cast("B")
            if len(view) < loc.payload_len:
                raise InvalidArgument(
                    f"out[{i}] has {len(view)} bytes; the record for key {keys[i]!r} has {loc.payload_len}"
                )
            dsts[i] = view[: loc.payload_len]
    return dsts


def choose_places(locs: Sequence[Location | None]) -> list[Location | None]:
    """The place each record of one request is read from: a record with copies (docs/copies.md) is read
    where the request goes anyway. Greedy: the blocks of records without copies are touched; a record
    with a place in a touched block reads it there; of the rest, the block that holds a place of most of
    them is touched next (ties: the primary's), until every record has its place."""
    if not any(loc is not None and loc.copies for loc in locs):
        return list(locs)
    out = list(locs)
    touched = {loc.block_id for loc in locs if loc is not None and not loc.copies}
    pending = [i for i, loc in enumerate(locs) if loc is not None and loc.copies]
    places = {i: locs[i].places() for i in pending}  # type: ignore[union-attr]
    while pending:
        rest = []
        for i in pending:
            here = next((p for p in places[i] if p.block_id in touched), None)
            if here is None:
                rest.append(i)
            else:
                out[i] = here
        if not rest:
            break
        votes = Counter(p.block_id for i in rest for p in places[i])
        touched.add(max(votes, key=lambda b: votes[b]))  # the first counted wins a tie: a primary
        pending = rest
    return out


class Reader:
    """Reads records of one store. Thread-safe. `block_named(bid)`: whether the block table still names
    a block (a missing file of a named block is damage; of an unnamed one, a deletion that raced us)."""

    def __init__(self, *, path: str, directory: Directory, blocks: BlockFiles, backend: Backend,
                 read_gap: int, read_ahead: bool, on_corrupt: Literal["raise", "miss"],
                 block_named: Callable[[int], bool]) -> None:
        self.path = path
        self.directory = directory
        self.blocks = blocks
        self.backend = backend
        self.read_gap = read_gap
        self.read_ahead = read_ahead
        self.on_corrupt = on_corrupt
        self.block_named = block_named
        self.observers: list[ReadObserver] = []
        # the remote tier's read fallback (tiering.py): a block's confirmed object name (b"": none), and the
        # fetcher of byte ranges of a block file from it (None: no tier attached)
        self.remote_name_of: Callable[[int], bytes] = lambda _bid: b""
        self.fetch: Callable[[int, bytes, Sequence[tuple[int, int]]], Sequence[Buffer]] | None = None
        self._grouping = threading.local()  # .reads: this thread's reads inside request() (else unset)
        self.timed: deque[tuple[float, float]] = deque(maxlen=_TIMED_READS)  # (perf_counter at end, seconds)

    def read(self, nid: int, space: int, keys: Sequence[bytes], out: Sequence[Buffer] | None,
             located: Sequence[Location | None] | None = None, read_from: list[Location | None] | None = None,
             ) -> list[Any]:
        """The payloads of `keys` (key space `space` of namespace id `nid`): a memoryview each, or with
        `out` each payload's length, written into out[i]; None for a miss. `located`: the keys' locations
        if the caller has just looked them up (saves the second lookup). `read_from`, if given, is filled
        with the location each payload was read at: a record whose block vanished under the read is looked
        up again and may then be a newer version than `located` said (its meta with it). Each read is timed
        (`timed`): compaction paces itself by what the foreground sees."""
        foreground.READS.append(None)  # background work steps aside while a read is in flight (foreground.py)
        t0 = time.perf_counter()
        try:
            return self._read(nid, space, keys, out, located, read_from=read_from)
        finally:
            t1 = time.perf_counter()
            self.timed.append((t1, t1 - t0))
            foreground.READS.pop()

    def recent_reads(self, since: float) -> list[float]:
        """Durations (seconds) of the reads that ended after perf_counter() time `since`, oldest first."""
        timed = list(self.timed)  # one C-level copy: appends from other threads cannot interleave
        return [dt for end, dt in timed if end > since]

    def _read(self, nid: int, space: int, keys: Sequence[bytes], out: Sequence[Buffer] | None,
              located: Sequence[Location | None] | None = None, *, attempt: int = 0,
              read_from: list[Location | None] | None = None) -> list[Any]:
        suffixes = [key_suffix(nid, space, k) for k in keys]
        found = list(located) if located is not None else self.directory.get_locations(suffixes)
        if attempt == 0:
            self._observe(suffixes, found)
        locs = choose_places(found)
        hooks.fire("read.located")
        if out is not None and len(out) != len(keys):
            raise InvalidArgument(f"out has {len(out)} buffers for {len(keys)} keys")
        dsts = _destinations(keys, locs, out)
        by_block: dict[int, list[int]] = {}
        first_of: dict[bytes, int] = {}
        duplicates: list[tuple[int, int]] = []  # (index, index of the same key read once)
        for i, loc in enumerate(locs):
            if loc is None:
                continue
            if suffixes[i] in first_of:
                duplicates.append((i, first_of[suffixes[i]]))
                continue
            first_of[suffixes[i]] = i
            by_block.setdefault(loc.block_id, []).append(i)
        results, vanished = self._read_in_groups(keys, locs, dsts, by_block, out is not None, found)
        if read_from is not None:
            read_from[:] = locs
        if vanished and attempt < READ_ATTEMPTS:
            # compaction moved these records and emptied their block between our lookup and our pin:
            # look again (each round is a fresh lookup; a record is found unless moved every time)
            moved: list[Location | None] = []
            again = self._read(nid, space, [keys[i] for i in vanished],
                              None if out is None else [out[i] for i in vanished], attempt=attempt + 1, read_from=moved)
            for k, (i, r) in enumerate(zip(vanished, again)):
                results[i] = r
                if read_from is not None:
                    read_from[i] = moved[k]
        for i, j in duplicates:
            if results[j] is not None:
                if out is not None:
                    memoryview(out[i]).cast("B")[: results[j]] = memoryview(out[j]).cast("B")[: results[j]]
                results[i] = results[j]
            if read_from is not None:  # the payload copied is the one key j read: perhaps re-read, newer
                read_from[i] = read_from[j]
        return results

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Observers see every read this thread makes inside the block as one request (a caller whose
        request reads chunk records and KV records in two calls, or in several batches): one co-access
        observation, delivered when the outermost block exits. Nested blocks join the outer one."""
        if getattr(self._grouping, "reads", None) is not None:
            yield
            return
        self._grouping.reads = ([], [])
        try:
            yield
        finally:
            suffixes, locs = self._grouping.reads
            self._grouping.reads = None
            if suffixes:
                self._notify(suffixes, locs)

    def _observe(self, suffixes: Sequence[bytes], locs: Sequence[Location | None]) -> None:
        grouped = getattr(self._grouping, "reads", None)
        if grouped is not None:
            grouped[0].extend(suffixes)
            grouped[1].extend(locs)
            return
        self._notify(suffixes, locs)

    def _notify(self, suffixes: Sequence[bytes], locs: Sequence[Location | None]) -> None:
        for observe in self.observers:
            try:
                observe(suffixes, locs)
            except Exception:  # an observer (affinity learning) must never fail a read
                _log.exception("read observer failed")

    def _read_in_groups(self, keys: Sequence[bytes], locs: Sequence[Location | None], dsts: list[memoryview | None],
                        by_block: dict[int, list[int]], lengths: bool,
                        found: Sequence[Location | None]) -> tuple[list[Any], list[int]]:
        """(results, indexes whose block vanished under the read). `found`: the keys' whole values (a record
        with copies is read at one place, `locs`; the others are tried when that one does not verify)."""
        results: list[Any] = [None] * len(keys)
        vanished: list[int] = []
        dropped: list[tuple[int, bytes, list[int]]] = []
        groups = list(by_block.items())
        for at in range(0, len(groups), READ_BLOCKS_AT_ONCE):
            self._read_blocks(dict(groups[at : at + READ_BLOCKS_AT_ONCE]), keys, locs, dsts, lengths, results,
                              vanished, dropped, found)
        for bid, name, idxs in dropped:
            self._read_dropped(bid, name, idxs, keys, locs, dsts, results, lengths)
        return results, vanished

    def _read_blocks(self, by_block: dict[int, list[int]], keys: Sequence[bytes], locs: Sequence[Location | None],
                     dsts: list[memoryview | None], lengths: bool, results: list[Any], vanished: list[int],
                     dropped: list[tuple[int, bytes, list[int]]], found: Sequence[Location | None]) -> None:
        """Read up to READ_BLOCKS_AT_ONCE blocks' records (pinned, one read_files call) into `results`; a block
        deleted since the lookup goes to `vanished`, one dropped to the remote tier to `dropped`."""
        files: list[tuple[int, list[int], list[ReadRequest]]] = []  # (block, record indexes, their reads)
        with self.blocks.pinned(by_block):
            for bid, idxs in by_block.items():
                idxs.sort(key=lambda i: locs[i].offset)  # type: ignore[union-attr]
                try:
                    fd = self.blocks.read_fd(bid)
                except NotFound:
                    if not self.block_named(bid):
                        vanished.extend(idxs)  # compaction deleted it after our lookup: look again
                        continue
                    name = self.remote_name_of(bid)
                    if name:  # the remote tier dropped its local copy: fetched below, from the object named
                        # now (compaction may delete the block meanwhile; GC keeps its object a grace period)
                        dropped.append((bid, name, idxs))
                        continue
                    if self._deleted_since_snapshot(bid):
                        vanished.extend(idxs)
                        continue
                    # The block table still names the block (a deletion leaves the table before its
                    # file goes), so its file is missing by damage: corruption, not a miss. A record with
                    # copies is read at another place, as when its payload does not verify (docs/copies.md).
                    lost = [i for i in idxs if not self._read_elsewhere(found[i], locs[i], dsts[i])]  # type: ignore[arg-type]
                    for i in idxs:
                        if i not in lost:
                            results[i] = locs[i].payload_len if lengths else dsts[i]  # type: ignore[union-attr]
                    if lost and self.on_corrupt == "raise":
                        raise CorruptionError(
                            f"read of key {keys[lost[0]]!r}: block file {block_file_name(bid)} is missing; "
                            f"run `blockstore fsck {self.path}` (--repair drops the records it held)") from None
                    continue
                files.append((fd, idxs, [ReadRequest(locs[i].payload_offset, locs[i].payload_len,  # type: ignore[union-attr]
                                                     dsts[i], locs[i].payload_xxh3) for i in idxs]))  # type: ignore[union-attr,arg-type]
            # every block's reads in one call: a cold read announces all of its blocks' ranges before the
            # first read (bs_read_files), so the disk has them in flight at once instead of one block's
            # at a time, and the GIL is released once
            statuses = self.backend.read_files([(fd, reqs) for fd, _idxs, reqs in files], self.read_gap, True,
                                               self.read_ahead)
            for (_fd, idxs, _reqs), sts in zip(files, statuses):
                for i, st in zip(idxs, sts):
                    if st == 0 or self._read_elsewhere(found[i], locs[i], dsts[i]):  # type: ignore[arg-type]
                        results[i] = locs[i].payload_len if lengths else dsts[i]  # type: ignore[union-attr]
                    elif self.on_corrupt == "raise":
                        bid = locs[i].block_id  # type: ignore[union-attr]
                        err = error_for_code(st, f"read of key {keys[i]!r} in block {bid:016x}",
                                             self.backend.last_errno())
                        if isinstance(err, ChecksumMismatch):
                            err = ChecksumMismatch(f"{err}: payload does not match its checksum; not returned")
                        if isinstance(err, CorruptionError):  # what to do, as a missing block file says
                            err = type(err)(f"{err}; run `blockstore fsck {self.path}` (--repair copies what "
                                            "verifies out of the damaged block)")
                        raise err

    def _read_elsewhere(self, value: Location | None, here: Location, dst: memoryview) -> bool:
        """Whether another place of a record with copies (docs/copies.md) reads back verified, into `dst`. The
        place chosen for the request did not: the read raised ChecksumMismatch (a miss with on_corrupt="miss")
        while a good copy was there, and GC could then drop that copy (the key lost for good)."""
        if value is None or not value.copies:
            return False
        for place in value.places():
            if (place.block_id, place.offset) == (here.block_id, here.offset):
                continue
            try:
                dst[:] = self.read_locations([place])[0]
            except (CorruptionError, NotFound, IOErrorBS):
                continue
            _log.warning("the record at %016x:%d does not verify; read from its copy at %016x:%d (run blockstore "
                         "fsck --repair %s)", here.block_id, here.offset, place.block_id, place.offset, self.path)
            return True
        return False

    def _deleted_since_snapshot(self, bid: int) -> bool:
        """Whether a read-only open's directory, a snapshot as of its opening, names a block that the writer
        deleted since (GC moved its records, or they all died): then lookups move to a fresh read-only view
        (the read looks again there, seeing what the writer has committed since). The missing file read as
        damage: CorruptionError, "run fsck (--repair drops the records it held)", though fsck found nothing
        and the records were live in other blocks. A block the fresh view still names is damage."""
        if not self.directory.read_only:
            return False
        try:
            fresh = Directory(self.directory.path, read_only=True, sync=False, create=False)
        except BlockstoreError:
            return False  # the directory cannot be read now: the damage is reported as before
        try:
            raw = fresh.get(block_key(bid))
            named = raw is not None and BlockEntry.decode(bid, raw).state != BLOCK_RECLAIMING
        except BlockstoreError:
            named = True
        if named:
            fresh.close()
            return False
        # not closed: another thread may be reading through the old view (a read-only handle holds no
        # lock, and goes when its last reference does); the store closes the one it opened with
        self.directory = fresh
        return True

    def _read_dropped(self, bid: int, name: bytes, idxs: list[int], keys: Sequence[bytes],
                      locs: Sequence[Location | None],
                      dsts: list[memoryview | None], results: list[Any], lengths: bool) -> None:
        """The records `idxs` of a block whose local copy the remote tier dropped, from its object,
        verified as a local read is; a mismatch raises (or, on_corrupt="miss", leaves a miss)."""
        if self.fetch is None:
            raise IOErrorBS(errno.ENOENT, f"read of key {keys[idxs[0]]!r}: the local copy of block {bid:016x} was "
                            f"dropped once its object {name!r} was confirmed, and no remote tier "
                            "is attached to read it (blockstore.remote.RemoteTier, or Store.set_block_fetcher)")
        try:
            verified = self._read_remote(bid, name, [locs[i] for i in idxs],  # type: ignore[misc]
                                         [dsts[i] for i in idxs])  # type: ignore[misc]
        except CorruptionError:  # an object cut or replaced in the bucket: no byte of it verified
            if self.on_corrupt == "raise":
                raise
            verified = [False] * len(idxs)
        for i, ok in zip(idxs, verified):
            if ok:
                results[i] = locs[i].payload_len if lengths else dsts[i]  # type: ignore[union-attr]
            elif self.on_corrupt == "raise":
                raise ChecksumMismatch(f"read of key {keys[i]!r} in block {bid:016x} (fetched from its remote "
                                       "copy): payload does not match its checksum; not returned")

    def _read_remote(self, bid: int, name: bytes, locs: Sequence[Location], dsts: Sequence[memoryview]) -> list[bool]:
        """Read these records (sorted by offset) of a block whose local copy was dropped from its object:
        neighbours closer than read_gap coalesced into one ranged GET, as the local path coalesces its
        preadv; each payload checked against its xxh3 before it is copied to its destination. Whether
        each verified. The fetcher's own failures (the object store unreachable) propagate."""
        runs: list[tuple[int, int, list[int]]] = []
        for i, loc in enumerate(locs):
            start, end = loc.payload_offset, loc.payload_offset + loc.payload_len
            if runs and start - runs[-1][1] <= self.read_gap:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end), runs[-1][2] + [i])
            else:
                runs.append((start, end, [i]))
        assert self.fetch is not None
        got = self.fetch(bid, name, [(s, e) for s, e, _m in runs])
        ok = [False] * len(locs)
        for (start, end, members), raw in zip(runs, got):
            view = memoryview(raw).cast("B")
            if len(view) != end - start:
                raise CorruptionError(f"block {bid:016x}: its remote copy gave {len(view)} bytes for [{start}, {end})")
            for i in members:
                loc = locs[i]
                payload = view[loc.payload_offset - start : loc.payload_offset - start + loc.payload_len]
                if self.backend.xxh3(payload) == loc.payload_xxh3:
                    dsts[i][:] = payload
                    ok[i] = True
        return ok

    def read_locations(self, locs: Sequence[Location]) -> list[memoryview]:
        """Read and verify the payloads at these places; raises on corruption whatever on_corrupt says
        (a relocation must never copy bad bytes)."""
        by_block: dict[int, list[int]] = {}
        for i, loc in enumerate(locs):
            by_block.setdefault(loc.block_id, []).append(i)
        dsts = [aligned_buffer(loc.payload_len) for loc in locs]
        with self.blocks.pinned(by_block):
            for bid, idxs in by_block.items():
                foreground.step_aside()  # compaction's reads: on the background thread, the foreground's go first
                idxs.sort(key=lambda i: locs[i].offset)
                name = self.remote_name_of(bid)
                if name and not self.blocks.exists(bid):
                    if self.fetch is None:
                        raise IOErrorBS(errno.ENOENT, f"block {bid:016x}'s local copy was dropped and no remote "
                                        "tier is attached to read it")
                    verified = self._read_remote(bid, name, [locs[i] for i in idxs], [dsts[i] for i in idxs])
                    if not all(verified):
                        raise ChecksumMismatch(f"read of block {bid:016x} (from its remote copy): a payload does "
                                               "not match its checksum")
                    continue
                fd = self.blocks.read_fd(bid)
                reqs = [ReadRequest(locs[i].payload_offset, locs[i].payload_len, dsts[i], locs[i].payload_xxh3)
                        for i in idxs]
                for i, st in zip(idxs, self.backend.read_many(fd, reqs, self.read_gap, True)):
                    if st != 0:
                        raise error_for_code(st, f"read of block {bid:016x} offset {locs[i].offset}",
                                             self.backend.last_errno())
        return dsts
