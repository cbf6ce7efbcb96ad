"""Raw-disk ceilings: what the disk does for the same bytes with no store in the way.

The benchmarks that report a store figure as a ratio to the disk (throughput, lmcache_peer, gpu_path)
measure their ceilings with these functions, in the same repeat as the store figure:

  raw_write        (a) pwritev of N x 1 MiB into one file, no sync; (b) durable: fdatasync every 32 MiB
  raw_read         (c) warm / (d) cold sequential preadv into page-aligned buffers, optionally xxh3 per MiB
  read_files_cold  the store's own files read cold the same way (what the on-disk layout costs)

and `Settle` runs before every timed phase so that each starts from the same state of the machine.
Record i of a write is `source[i]` (`Payloads`: a pool of random page-aligned 1 MiB payloads).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import xxhash

from blockstore.reader import aligned_buffer

MiB = 1 << 20
RECORD = MiB
BATCH = 64  # records per put_many/get_many call, and per raw pwritev/preadv: the same unit of work
DURABLE_BATCH = 32  # raw durable write: fdatasync after every 32 x 1 MiB
POOL = 64  # distinct payloads, reused round-robin: 64 MiB of sources instead of N MiB


class RecordSource(Protocol):
    """Record i's bytes (1 MiB); any i >= 0, since `Settle`'s ballast runs past the records measured."""

    def __getitem__(self, i: int, /) -> memoryview: ...


class Payloads:
    """POOL random page-aligned 1 MiB payloads; record i is payload i % POOL. Page-aligned because
    that is what a KV-cache producer hands over (and unaligned sources would slow both sides)."""

    def __init__(self) -> None:
        arena = aligned_buffer(POOL * RECORD)
        arena[:] = os.urandom(POOL * RECORD)
        self.views = [arena[i * RECORD : (i + 1) * RECORD] for i in range(POOL)]

    def __getitem__(self, i: int) -> memoryview:
        return self.views[i % POOL]


def time_batches(n: int, per_call: int, op: Callable[[range], None]) -> float:
    """Seconds to run `op` over records [0, n) in consecutive ranges of `per_call` records.
    The one timing loop of every figure, raw or store, so all pay the same loop overhead."""
    t0 = time.perf_counter()
    for start in range(0, n, per_call):
        op(range(start, min(start + per_call, n)))
    return time.perf_counter() - t0


class Settle:
    """Run before every timed phase, so that each starts from the same state of the machine.

    1. os.sync(): write back what the previous phase left dirty, or its writeback runs inside the
       next timed phase (on a 1 GiB write that alone moves a result by tens of percent).
    2. Before a phase that writes (and so allocates page cache), write and delete a ballast file
       slightly larger than the phase's data. This VM (Firecracker, nested PVM, free page reporting)
       hands guest memory that has been free for a few seconds back to the host, and touching it
       again costs more than the copy itself: a 1 GiB buffered write measured 0.6-1.3 GB/s on such
       pages and 3.6-3.9 GB/s on pages freed a moment before (bench/README.md). Deleting the ballast
       frees host-backed pages that the phase then reuses, raw and store alike, as on a machine
       whose RAM stays backed. `--no-recycle` turns this off.
    """

    def __init__(self, work: str, payloads: RecordSource, records: int, recycle: bool) -> None:
        self.ballast = os.path.join(work, "ballast.bin")
        self.payloads = payloads
        self.records = records + records // 32 + 32  # + record header pages, directory, slack
        self.recycle = recycle

    def __call__(self, writes: bool) -> None:
        os.sync()
        if writes and self.recycle:
            raw_write(self.ballast, self.payloads, self.records, durable=False)
            os.unlink(self.ballast)  # dirty, never synced: deleting it costs no I/O


def pwritev_all(fd: int, bufs: Sequence[memoryview], offset: int) -> None:
    n = os.pwritev(fd, bufs, offset)
    if n != sum(len(b) for b in bufs):  # never short for a regular file below 2 GiB, but be sure
        raise OSError(f"short pwritev: {n} bytes")


def preadv_all(fd: int, bufs: Sequence[memoryview], offset: int) -> None:
    n = os.preadv(fd, bufs, offset)
    if n != sum(len(b) for b in bufs):
        raise OSError(f"short preadv: {n} bytes")


def raw_write(path: str, payloads: RecordSource, n: int, durable: bool) -> float:
    """(a) buffered sequential write, no sync; (b) durable: fdatasync after every DURABLE_BATCH."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:

        def write(r: range) -> None:
            pwritev_all(fd, [payloads[i] for i in r], r.start * RECORD)
            if durable:
                os.fdatasync(fd)

        return time_batches(n, DURABLE_BATCH if durable else BATCH, write)
    finally:
        os.close(fd)


def raw_read(path: str, n: int, dst: list[memoryview], *, cold: bool, verify: bool) -> float:
    """(c) warm / (d) cold sequential read into page-aligned buffers, optionally xxh3 of each MiB
    (the least work a store that verifies what it returns must do)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drops only clean pages: Settle synced

        def read(r: range) -> None:
            bufs = dst[: len(r)]
            preadv_all(fd, bufs, r.start * RECORD)
            if verify:
                for b in bufs:
                    xxhash.xxh3_64_intdigest(b)

        return time_batches(n, BATCH, read)
    finally:
        os.close(fd)


def read_files_cold(paths: list[str], dst: list[memoryview]) -> float:
    """Diagnostic ceiling: plain sequential cold read of these files (a store's block files), no
    store code involved. Separates what the on-disk layout costs (many 64 MiB files instead of one
    file) from what the store's read path costs."""
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for fd in fds:
            offset = 0
            while n := os.preadv(fd, dst, offset):
                offset += n
        return time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)
