"""The one module that talks to the C core (`blockstore._native`, built from native/ by cffi).

Everything else calls these Python functions. cffi releases the GIL around every call in
out-of-line API mode, so the blocking calls here (appends, reads, scans, syncs) let other Python
threads run. Work is batched per call: one call per batch of records, never one per record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from blockstore import _native  # type: ignore[attr-defined]
from blockstore.backend import refuse_special_file
from blockstore.errors import error_for_code
from blockstore.records import (
    AppendRecord,
    BlockHeader,
    Footer,
    Placement,
    ReadRequest,
    RecordInfo,
    ScannedRecord,
    ScanResult,
    ScanStop,
)

ffi = _native.ffi
lib = _native.lib

_SCAN_CAP = 4096
# a C core built before bs_read_files (an older build in place) still loads: read_files falls back
_HAS_READ_FILES = hasattr(lib, "bs_read_files")
_HAS_LAYER_READ = hasattr(lib, "bs_layer_read")
_SCAN_ARENA = 8 << 20


class _Pinned:
    """Buffers lent to C for one call, released when the call ends, error or not.

    Releasing explicitly matters: if a cffi buffer object outlives the call inside an exception's
    traceback cycle, the garbage collector may release it after the memory it views (seen as a
    segfault in memory_dealloc), so every call that lends buffers goes through this."""

    def __init__(self) -> None:
        self._held: list[object] = []

    def lend(self, buf, writable: bool = False):  # type: ignore[no-untyped-def]
        c = ffi.from_buffer(buf, require_writable=writable)
        self._held.append(c)
        return c

    def __enter__(self) -> _Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self._held:
            ffi.release(c)
        self._held.clear()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise error_for_code(rc, what, lib.bs_last_errno())


def _info(c) -> RecordInfo:  # type: ignore[no-untyped-def]
    return RecordInfo(
        c.kind, c.flags, c.key_len, c.meta_len, c.payload_off, c.ns,
        c.payload_len, c.record_len, c.seq, c.payload_xxh3,
    )


def _read_flags(verify: bool, willneed: bool) -> int:
    return (lib.BS_READ_VERIFY if verify else 0) | (lib.BS_READ_WILLNEED if willneed else 0)


def _file_reads(files: Sequence[tuple[int, Sequence[ReadRequest]]], pinned: _Pinned):  # type: ignore[no-untyped-def]
    """The arrays `bs_read_files` (and a layer job) take: every request of every file as one
    bs_read_item array, its destination lent through `pinned`; each file's fd; each file's request count."""
    items = ffi.new("bs_read_item[]", max(sum(len(reqs) for _, reqs in files), 1))
    at = 0
    for _, reqs in files:
        for r in reqs:
            it = items[at]
            it.offset, it.len, it.expect_xxh3 = r.offset, r.length, r.expect_xxh3
            it.dst = pinned.lend(r.dst, writable=True)
            at += 1
    fds = ffi.new("int[]", [fd for fd, _ in files] or [0])
    counts = ffi.new("size_t[]", [len(reqs) for _, reqs in files] or [0])
    return items, fds, counts


class LayerJobs:
    """Reads of several layers' records (each layer: (fd, its requests sorted by offset) per file, as
    `read_files` takes them), done by reader threads in C (native/layers.c): each reader thread makes ONE
    call, `run()`, that claims parts (one file of a layer each) layer after layer in order; a layer is
    published by the reader of its last part; `wait(i)` blocks (GIL released) until layer i is done and
    gives its per-request statuses per file, or None if it was cancelled. The destination buffers stay lent
    until `close()`, which cancels what is unclaimed: call it after the reader threads have returned."""

    def __init__(self, layers: Sequence[Sequence[tuple[int, Sequence[ReadRequest]]]], max_gap: int, verify: bool,
                 willneed: bool = False) -> None:
        self._pinned = _Pinned()
        self._keep: list[object] = []
        self._shapes = [[len(reqs) for _, reqs in files] for files in layers]
        self._jobs = ffi.new("bs_layer_job[]", max(len(layers), 1))
        self._queue = ffi.new("bs_layer_queue *")
        for job, files in zip(self._jobs, layers):
            items, fds, counts = _file_reads(files, self._pinned)
            self._keep += [items, fds, counts]
            job.fds, job.counts, job.files, job.items = fds, counts, len(files), items
            job.parts_left = len(files)  # a part a file: the reader of the last one publishes the layer
            if not files:
                job.state = lib.BS_LAYER_DONE
        self._n = len(layers)
        self._args = (max_gap, _read_flags(verify, willneed))

    def run(self) -> None:
        """One reader: returns when no layer is left to claim, or after a failure (raised by `wait`)."""
        _check(lib.bs_layer_read(self._jobs, self._n, self._queue, *self._args), "read layers")

    def done(self, index: int) -> bool:
        """Whether layer `index` is read, every request of it without failure (no wait)."""
        return int(lib.bs_layer_poll(self._jobs + index)) == lib.BS_LAYER_DONE

    def wait(self, index: int) -> list[list[int]] | None:
        """Layer `index`'s per-request statuses per file once it is done (an item not read after a
        whole-call failure reads as that failure's code); None if it was cancelled."""
        job = self._jobs[index]
        state = lib.bs_layer_wait(self._jobs + index)
        if state == lib.BS_LAYER_CANCELLED:
            return None
        out, at = [], 0
        for n in self._shapes[index]:
            out.append([int(job.items[at + i].status) or int(job.rc) for i in range(n)])
            at += n
        return out

    def errno(self, index: int) -> int:
        """The errno the reader of a failed layer saw."""
        return int(self._jobs[index].err)

    def cancel(self) -> None:
        """Readers claim no more parts; a layer with an unclaimed part reads as cancelled (unless a part of
        it failed)."""
        lib.bs_layer_cancel(self._jobs, self._n, self._queue)

    def close(self) -> None:
        self.cancel()
        self._pinned.__exit__()


class NativeBackend:
    """I/O and format operations implemented by the C core."""

    name = "native"

    # ---- checksums ----
    def xxh3(self, buf) -> int:  # type: ignore[no-untyped-def]
        with _Pinned() as p:
            b = p.lend(buf)
            return int(lib.bs_xxh3(b, len(b)))

    def xxh3_many(self, bufs: Sequence) -> list[int]:  # type: ignore[type-arg]
        n = len(bufs)
        with _Pinned() as p:
            keep = [p.lend(b) for b in bufs]
            ptrs = ffi.new("uint8_t *[]", keep)
            lens = ffi.new("uint64_t[]", [len(k) for k in keep])
            out = ffi.new("uint64_t[]", n)
            lib.bs_xxh3_many(n, ptrs, lens, out)
            return list(out)

    def last_errno(self) -> int:
        """errno behind the last failed operation of this thread (0 if it was not an OS error)."""
        return int(lib.bs_last_errno())

    # ---- format ----
    def decode_record(self, buf) -> RecordInfo:  # type: ignore[no-untyped-def]
        out = ffi.new("bs_record_info *")
        with _Pinned() as p:
            _check(lib.bs_record_decode(p.lend(buf), len(buf), out), "decode record header")
        return _info(out)

    def encode_block_header(self, h: BlockHeader) -> bytes:
        c = ffi.new("bs_block_header *", {
            "flags": h.flags, "block_id": h.block_id, "store_id": h.store_id,
            "created_ns": h.created_ns, "partition_hash": h.partition_hash,
        })
        out = ffi.new("uint8_t[]", 64)
        _check(lib.bs_block_header_encode(c, out, 64), "encode block header")
        return bytes(ffi.buffer(out, 64))

    def decode_block_header(self, buf) -> BlockHeader:  # type: ignore[no-untyped-def]
        c = ffi.new("bs_block_header *")
        with _Pinned() as p:
            _check(lib.bs_block_header_decode(p.lend(buf), len(buf), c), "decode block header")
        return BlockHeader(c.block_id, c.store_id, c.created_ns, c.partition_hash, c.format_version, c.flags)

    def encode_footer(self, f: Footer) -> bytes:
        c = ffi.new("bs_footer *", {
            "flags": f.flags, "block_id": f.block_id, "data_end": f.data_end,
            "record_count": f.record_count, "min_seq": f.min_seq, "max_seq": f.max_seq,
        })
        out = ffi.new("uint8_t[]", 64)
        _check(lib.bs_footer_encode(c, out, 64), "encode footer")
        return bytes(ffi.buffer(out, 64))

    def decode_footer(self, buf) -> Footer:  # type: ignore[no-untyped-def]
        c = ffi.new("bs_footer *")
        with _Pinned() as p:
            _check(lib.bs_footer_decode(p.lend(buf), len(buf), c), "decode footer")
        return Footer(c.block_id, c.data_end, c.record_count, c.min_seq, c.max_seq, c.format_version, c.flags)

    # ---- files ----
    def open(self, path: str, create: bool) -> int:
        fd = ffi.new("int *")
        _check(lib.bs_file_open(os.fsencode(path), int(create), fd), f"open {path}")
        return int(fd[0])

    def open_ro(self, path: str) -> int:
        refuse_special_file(path)
        fd = ffi.new("int *")
        _check(lib.bs_file_open_ro(os.fsencode(path), fd), f"open {path}")
        return int(fd[0])

    def close(self, fd: int) -> None:
        _check(lib.bs_file_close(fd), "close")

    def sync(self, fd: int) -> None:
        _check(lib.bs_file_sync(fd), "fdatasync")

    def dir_sync(self, path: str) -> None:
        _check(lib.bs_dir_sync(os.fsencode(path)), f"fsync directory {path}")

    def truncate(self, fd: int, length: int) -> None:
        _check(lib.bs_file_truncate(fd, length), "ftruncate")

    def unlink(self, path: str) -> None:
        _check(lib.bs_file_unlink(os.fsencode(path)), f"unlink {path}")

    def size(self, fd: int) -> int:
        out = ffi.new("uint64_t *")
        _check(lib.bs_file_size(fd, out), "fstat")
        return int(out[0])

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        buf = ffi.new("uint8_t[]", length)
        got = ffi.new("size_t *")
        _check(lib.bs_file_pread(fd, buf, length, offset, got), "pread")
        return bytes(ffi.buffer(buf, got[0]))

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        with _Pinned() as p:
            _check(lib.bs_file_pwrite(fd, p.lend(data), len(data), offset), "pwrite")

    def drop_cache(self, fd: int) -> None:
        _check(lib.bs_fadvise_dontneed(fd), "posix_fadvise")

    # ---- hot paths ----
    def append(self, fd: int, offset: int, records: Sequence[AppendRecord], sync: bool) -> tuple[list[Placement], int]:
        n = len(records)
        items = ffi.new("bs_append_item[]", n)
        have_all = all(r.payload_xxh3 is not None for r in records)
        with _Pinned() as p:
            for i, r in enumerate(records):
                it = items[i]
                it.kind = r.kind
                it.ns = r.ns
                it.key = p.lend(r.key)
                it.key_len = len(r.key)
                it.meta = p.lend(r.meta)
                it.meta_len = len(r.meta)
                payload = p.lend(r.payload)
                it.payload = payload
                it.payload_len = len(payload)
                it.seq = r.seq
                if have_all:
                    it.payload_xxh3 = r.payload_xxh3
            end = ffi.new("uint64_t *")
            flags = (lib.BS_APPEND_HAVE_CHECKSUMS if have_all else 0) | (lib.BS_APPEND_SYNC if sync else 0)
            _check(lib.bs_append(fd, offset, items, n, flags, end), "append records")
        placements = [
            Placement(items[i].offset, items[i].payload_off, items[i].record_len, items[i].payload_xxh3, items[i].flags)
            for i in range(n)
        ]
        return placements, int(end[0])

    def read_many(self, fd: int, reqs: Sequence[ReadRequest], max_gap: int, verify: bool,
                  willneed: bool = False) -> list[int]:
        """Fill each request's dst; returns per-request status codes (0 ok, else a BS_E* code).
        Requests must be sorted by offset."""
        n = len(reqs)
        items = ffi.new("bs_read_item[]", n)
        with _Pinned() as p:
            for i, r in enumerate(reqs):
                it = items[i]
                it.offset = r.offset
                it.len = r.length
                it.dst = p.lend(r.dst, writable=True)
                it.expect_xxh3 = r.expect_xxh3
            rc = lib.bs_read_many(fd, items, n, max_gap, _read_flags(verify, willneed))
        _check(rc, "read records")
        return [items[i].status for i in range(n)]

    def read_files(self, files: Sequence[tuple[int, Sequence[ReadRequest]]], max_gap: int, verify: bool,
                   willneed: bool = False) -> list[list[int]]:
        """read_many over several files in ONE C call (`bs_read_files`): (fd, its requests sorted by
        offset) per file; per-request status codes per file. The GIL is released once for all of
        it, so a reader thread issues no Python between one file's reads and the next. A C core
        built before bs_read_files existed gets one read_many per file (same results)."""
        if not _HAS_READ_FILES:
            return [self.read_many(fd, reqs, max_gap, verify, willneed) for fd, reqs in files]
        with _Pinned() as p:
            items, fds, counts = _file_reads(files, p)
            flags = _read_flags(verify, willneed)
            rc = lib.bs_read_files(fds, counts, len(files), items, max_gap, flags)
        _check(rc, "read records")
        out, at = [], 0
        for _, reqs in files:
            out.append([items[at + i].status for i in range(len(reqs))])
            at += len(reqs)
        return out

    @property
    def has_layer_readers(self) -> bool:
        """Whether this C core has the blend loader's C readers (`bs_layer_read`); an older build lacks them."""
        return _HAS_LAYER_READ

    def layer_jobs(self, layers: Sequence[Sequence[tuple[int, Sequence[ReadRequest]]]], max_gap: int, verify: bool,
                   willneed: bool = False) -> LayerJobs | None:
        """Layers of reads for reader threads in C (`LayerJobs`); None from a C core built without them."""
        return LayerJobs(layers, max_gap, verify, willneed) if _HAS_LAYER_READ else None

    def scan(self, fd: int, start: int, end: int, verify_payload: bool) -> ScanResult:
        entries = ffi.new("bs_scan_entry[]", _SCAN_CAP)
        arena = ffi.new("uint8_t[]", _SCAN_ARENA)
        n_out = ffi.new("size_t *")
        next_out = ffi.new("uint64_t *")
        stop_out = ffi.new("int *")
        flags = lib.BS_SCAN_VERIFY_PAYLOAD if verify_payload else 0
        records: list[ScannedRecord] = []
        off = start
        while True:
            _check(
                lib.bs_scan_block(fd, off, end, flags, entries, _SCAN_CAP, arena, _SCAN_ARENA, n_out, next_out, stop_out),
                "scan block",
            )
            for i in range(n_out[0]):
                e = entries[i]
                info = _info(e.info)
                km = bytes(ffi.buffer(arena + e.arena_off, info.key_len + info.meta_len))
                ok = None if e.payload_status == 1 else e.payload_status == 0
                records.append(ScannedRecord(e.offset, info, km[: info.key_len], km[info.key_len :], ok))
            off = int(next_out[0])
            if stop_out[0] != lib.BS_SCAN_MORE:
                return ScanResult(records, ScanStop(stop_out[0]), off)


class FaultInjector:
    """Test-only control of the C core's fault-injecting file layer (native/fault_io.c).

    Faults: `arm` fails the nth operation of some kinds (once, or from then on) with an errno;
    `arm_torn` tears the nth write at a 512-byte sector (then fails it, or reports a short write).
    Power loss: `crash` cuts the live files back to what was synced (or tears their unsynced tails);
    `power_image` writes that state into another directory and leaves the live files alone, and
    `arm_images` takes such images just before and just after the nth operation."""

    WRITE = 1
    READ = 2
    SYNC = 4
    OPEN = 8
    OTHER = 16  # ftruncate, unlink
    ALL = 31
    TEAR_EIO = 1
    TEAR_SHORT = 2

    def install(self) -> None:
        lib.bs_fault_install()

    def uninstall(self) -> None:
        lib.bs_fault_uninstall()

    def arm(self, op_mask: int, nth: int, err: int, persistent: bool = False) -> None:
        lib.bs_fault_arm(op_mask, nth, err, int(persistent))

    def op_count(self) -> int:
        return int(lib.bs_fault_op_count())

    def fired(self) -> int:
        """Operations the armed fault has failed or torn since it was armed."""
        return int(lib.bs_fault_fired())

    def arm_torn(self, nth: int, *, short: bool = False, err: int = 0, seed: int = 1) -> None:
        """Tear the nth write from now at a sector boundary: it fails with `err` (EIO if 0) after a
        prefix reached the file, the next sector garbled; or, with `short`, it reports the prefix as
        a short write. Counts writes only (`op_count`)."""
        lib.bs_fault_arm_torn(nth, self.TEAR_SHORT if short else self.TEAR_EIO, err, seed)

    def crash(self, torn_seed: int = 0) -> None:
        _check(lib.bs_fault_crash(torn_seed), "simulated crash")

    def power_image(self, root: str | os.PathLike[str], dst: str | os.PathLike[str], torn_seed: int = 0) -> None:
        """Write into `dst` (new) the tree under `root` as a power loss now would leave it. Spell
        `root` as the store's path: tracked files are matched by the path the store opened them by."""
        _check(lib.bs_fault_power_image(os.fsencode(root), os.fsencode(dst), torn_seed), "power image")

    def arm_images(self, op_mask: int, nth: int, root: str | os.PathLike[str], dst: str | os.PathLike[str],
                   torn_seed: int = 0) -> None:
        """Take power images of `root` at the nth operation of `op_mask` from now: `dst`/before and
        `dst`/after (and, with a seed, `dst`/before-torn and `dst`/after-torn). `dst` must exist."""
        lib.bs_fault_arm_images(op_mask, nth, os.fsencode(root), os.fsencode(dst), torn_seed)

    def images_taken(self) -> int:
        return int(lib.bs_fault_images_taken())

    def image_op_count(self) -> int:
        """Operations of the images' mask counted since `arm_images` (or `arm_image_points`)."""
        return int(lib.bs_fault_image_op_count())

    def arm_image_points(self, op_mask: int, points: Sequence[int], seeds: Sequence[int],
                         root: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        """Take one power image of `root` just before each of the operations `points` (1-based, strictly
        increasing, counted from now over `op_mask`): `dst`/p00000, p00001, ... (`dst` must exist), torn
        where the matching seed is not 0. Empty `points`: just count (`image_op_count`)."""
        pts = [int(p) for p in points]
        if any(b <= a for a, b in zip(pts, pts[1:])) or any(p < 1 for p in pts) or len(seeds) != len(pts):
            raise ValueError("points must be strictly increasing and >= 1, with one seed each")
        arr = ffi.new("uint64_t[]", pts or [0])
        sds = ffi.new("uint64_t[]", [int(s) & (2**64 - 1) for s in seeds] or [0])
        lib.bs_fault_arm_image_points(op_mask, arr, sds, len(pts), os.fsencode(root), os.fsencode(dst))

    def track(self, root: str | os.PathLike[str] | None, shadow: str | os.PathLike[str] | None = None) -> None:
        """The strict model of directory entries for images under `root` (native/fault_io.c): what is
        under `root` now is durable; from here on a name (file or directory, made by anyone) survives a
        power loss only as of its parent directory's last fsync through this layer, and an unlinked
        durable file comes back until then (kept as a hard link in `shadow`: an existing directory
        outside `root` on the same file system). Spell paths as os.path.realpath does. None: off."""
        if root is None or shadow is None:
            _check(lib.bs_fault_power_track(ffi.NULL, ffi.NULL), "power track")
        else:
            _check(lib.bs_fault_power_track(os.fsencode(root), os.fsencode(shadow)), "power track")

    def snapshot_dir(self, path: str | os.PathLike[str]) -> None:
        """Directory `path` (RocksDB's) is durable as it is now, as a whole: images take it from here
        (in torn images with a random part of its newest WAL's tail). Only under the tracked root."""
        _check(lib.bs_fault_power_snapshot(os.fsencode(path)), "power snapshot")

    def unmodelled(self) -> int:
        """Durable entries images could not reproduce (renamed over outside the layer)."""
        return int(lib.bs_fault_power_unmodelled())
