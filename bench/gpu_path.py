"""GPU path: batched reads from blockstore into pinned host memory and on to the GPU, overlapped, as
ratios to the disk and host->GPU ceilings measured in the same run on the same disk and GPU.

The data: N records of M MiB (default 384 x 8 MiB = 3 GiB; --quick 48 x 8 MiB = 384 MiB), each the
size of a KV chunk ([K/V, 8 layers, 256 tokens, 8 heads, 128] float16 = 8 MiB), every record distinct
random bytes. They are written once per run, as one raw file (the disk ceiling's) and with put_many into
a store (durability "cache", default block size), then os.sync(). Every repeat re-reads them.

Figures (GB/s = 1e9 bytes of payload per second; each a mean of its two runs in a repeat, see ORDER):

  disk_cold           ceiling (a), disk: posix_fadvise(DONTNEED) on the raw file, then sequential
                      preadv of all its bytes, 64 MiB per call, into one 64 MiB pinned host buffer
  disk_warm           the same with the file in the page cache (read once untimed first)
  disk_cold_par,      ceiling (a) as --readers sequential streams: each thread, with its own descriptor,
  disk_warm_par       reads one contiguous 1/N of the raw file in 64 MiB preadv calls (pinned buffers)
  h2d                 ceiling (b), host->GPU: pinned host memory -> device copy_(non_blocking=True) of
                      64 MiB chunks on a side CUDA stream, back to back, max(total, 2 GiB) bytes,
                      synchronize + perf_counter (the CUDA-event time is kept too)
  store_cold          the blockstore path, overlapped: store.drop_page_cache(), then get_many of one
                      batch (64 MiB of records) per call into one of 3 pinned host slots
                      (out=buffers: the C read fills them, GIL released), and the H2D copy of that batch
                      enqueued on a side CUDA stream; the read of batch i+1 runs while the DMA engine
                      copies batch i. A slot is reused once its copy's CUDA event has completed.
                      Ends when the last copy has landed. The records land in a device arena of the
                      total size (what a KV-cache load fills).
  store_cold_serial   the same with one slot and no overlap: read batch, copy it, wait for the copy
  store_warm(_serial) the same with the store's block files in the page cache
  store_cold_par,     the overlapped path with --readers (default 2) reader threads, each claiming the
  store_warm_par      next batch and a free slot (readers + 1 slots), so that many get_many calls are in
                      flight; this thread enqueues each filled slot's copy and frees the slot with the
                      copy's CUDA event
  raw_cold_pipeline,  diagnostic: the overlapped pipeline with the raw file's preadv in place of
  raw_warm_pipeline   get_many (what the pipeline reaches with no store code)
  store_files_cold    diagnostic: the store's block files read cold with plain preadv, no store code
                      (splits the cold loss into on-disk layout and read path, as throughput.py does)

Ratios (per repeat, then median and spread over repeats):

  store_cold_vs_ceiling = store_cold / min(max(disk_cold, disk_cold_par), h2d)     target >= 0.8
  store_warm_vs_ceiling = store_warm / min(max(disk_warm, disk_warm_par), h2d)     target >= 0.8
  store_cold_par_vs_ceiling, store_warm_par_vs_ceiling: the same for the *_par paths, target >= 0.8
      (the disk ceiling is the faster of one stream and N streams, whichever path is measured)
  overlap_gain_cold/warm = store_x / store_x_serial          (what the overlap buys)
  par_gain_cold/warm = store_x_par / store_x                 (what more reads in flight buy)
  disk_cold_par_vs_disk_cold, disk_warm_par_vs_disk_warm     (what N streams get from the disk)
  store_cold_vs_raw_pipeline, raw_cold_pipeline_vs_disk_cold, store_files_cold_vs_disk_cold,
  store_cold_vs_store_files_cold (and the warm pipeline pair): diagnostic splits of the cold ratio into
      pipeline vs store and on-disk layout vs read path

The bottleneck is the lower ceiling; the overlapped and serial passes also report where their time
went: read_s (wall time inside get_many / preadv), copy_gpu_s (the copies' own time by CUDA events),
wait_s (wall time the CPU waited for a slot's copy or the last copy); in the *_par figures read_s and
wait_s are summed over the reader threads. Every pass that lands records on the GPU is verified: the device arena is zeroed before the pass and, after it, a checksum of every
record on the GPU (sum of the int64 words times fixed odd weights, mod 2^64) must equal the one computed
on the CPU when the record was generated; a mismatch fails the run.

ORDER: in every repeat the cold group runs disk_cold, disk_cold_par, store_files_cold, raw_cold_pipeline,
store_cold, store_cold_par, store_cold_serial, then the same backwards (ABBA), and the warm group likewise
(no store_files); h2d at the start and end of each repeat. os.sync() before every timed phase.

Without CUDA (no torch, or torch without a GPU) the disk and store part still runs: the host buffers
are page-aligned anonymous memory instead of pinned, records stay in the host slots (each batch is
verified there: untimed with one reader, overlapping the other readers' reads in *_par), there is no
serial variant, the ratios are to the disk ceilings alone, and the JSON says `"gpu": null` with the reason.

LMCache: the run probes, in a subprocess, whether LMCache's local-disk backend can be imported here
(--lmcache-site DIR adds an unpacked lmcache wheel to that probe's path) and records the result; no
LMCache figure is measured by this script (bench/README.md, "gpu_path.py", says why).

Results: bench/results/gpu_path.json (--quick: gpu_path_quick.json) with every per-repeat time;
stdout ends with a table and, as its last line, a one-line JSON summary.

    python -m bench.gpu_path --quick --dir /tmp/gpubench
    python -m bench.gpu_path --dir /tmp/gpubench            # on the GPU machine's local disk
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import blockstore
from bench.ceilings import preadv_all, pwritev_all, raw_read, read_files_cold
from bench.common import (
    REPO,
    cpu_busy_s,
    engine_state,
    keys_for,
    machine_info,
    results_path,
    run_quiet,
    spread,
    standard_args,
    write_json,
)
from blockstore.reader import aligned_buffer

MiB = 1 << 20
RECORD_MIB = 8  # a KV chunk: [2, 8 layers, 256 tokens, 8 kv heads, 128] float16
RECORDS, RECORDS_QUICK = 384, 48  # 3 GiB, 384 MiB
REPEATS, REPEATS_QUICK = 5, 3
BATCH_MIB = 64  # bytes of records per get_many call (and per H2D copy)
SLOTS = 3  # pinned host staging slots of the overlapped pipeline (readers + 1 with reader threads)
READERS = 2  # reader threads of the *_par figures
CEIL_CALL = 64 * MiB  # disk ceiling: bytes per preadv call (ceilings.raw_read: 64 x 1 MiB)
H2D_CHUNK = 64 * MiB
H2D_MIN_BYTES = 2 << 30  # the H2D ceiling copies at least this much (a few hundred MiB take ~10 ms)
POOL = 8  # distinct random records; record i is pool[i % POOL] xor a 64-bit key of i (all distinct)
TARGET = 0.8
DEFAULT_DIR = os.path.join(REPO, "bench", ".scratch")

DESCRIPTIONS = {
    "disk_cold": "ceiling: raw file, fadvise DONTNEED, sequential preadv 64 MiB/call into pinned host memory",
    "disk_warm": "ceiling: the same, file in the page cache",
    "h2d": "ceiling: pinned host -> GPU copy_(non_blocking) of 64 MiB chunks on a side stream",
    "store_cold": "drop_page_cache, get_many per batch into pinned slots, H2D of batch i overlapped with read of i+1",
    "store_cold_serial": "the same, one slot: read, copy, wait, no overlap",
    "store_warm": "the overlapped path, block files in the page cache",
    "store_warm_serial": "the serial path, block files in the page cache",
    "raw_cold_pipeline": "diagnostic: the overlapped pipeline reading the raw file with preadv (no store code)",
    "raw_warm_pipeline": "diagnostic: the same, warm",
    "store_files_cold": "diagnostic: the store's block files read cold with plain preadv (64 MiB calls), no store code",
    "disk_cold_par": "ceiling: the raw file read cold as N sequential streams (N threads, one contiguous 1/N each)",
    "disk_warm_par": "ceiling: the same, file in the page cache",
    "store_cold_par": "the overlapped path with N reader threads (get_many of different batches at once)",
    "store_warm_par": "the same, block files in the page cache",
}
# ratio name: (figure, ceilings, target or None). Each ceiling is a tuple of alternatives of which the
# highest counts (the disk read as one stream or as N streams: whichever the disk serves faster); of the
# ceilings, the lowest counts (the bottleneck). Throughput ratio = min(max(...), ...) / figure.
DISK_COLD, DISK_WARM = ("disk_cold", "disk_cold_par"), ("disk_warm", "disk_warm_par")
RATIOS: dict[str, tuple[str, tuple[tuple[str, ...], ...], float | None]] = {
    "store_cold_vs_ceiling": ("store_cold", (DISK_COLD, ("h2d",)), TARGET),
    "store_warm_vs_ceiling": ("store_warm", (DISK_WARM, ("h2d",)), TARGET),
    "store_cold_par_vs_ceiling": ("store_cold_par", (DISK_COLD, ("h2d",)), TARGET),
    "store_warm_par_vs_ceiling": ("store_warm_par", (DISK_WARM, ("h2d",)), TARGET),
    "overlap_gain_cold": ("store_cold", (("store_cold_serial",),), None),
    "overlap_gain_warm": ("store_warm", (("store_warm_serial",),), None),
    "par_gain_cold": ("store_cold_par", (("store_cold",),), None),
    "par_gain_warm": ("store_warm_par", (("store_warm",),), None),
    "disk_cold_par_vs_disk_cold": ("disk_cold_par", (("disk_cold",),), None),
    "disk_warm_par_vs_disk_warm": ("disk_warm_par", (("disk_warm",),), None),
    "store_cold_vs_raw_pipeline": ("store_cold", (("raw_cold_pipeline",),), None),
    "raw_cold_pipeline_vs_disk_cold": ("raw_cold_pipeline", (("disk_cold",),), None),
    "store_warm_vs_raw_pipeline": ("store_warm", (("raw_warm_pipeline",),), None),
    "raw_warm_pipeline_vs_disk_warm": ("raw_warm_pipeline", (("disk_warm",),), None),
    "store_files_cold_vs_disk_cold": ("store_files_cold", (("disk_cold",),), None),
    "store_cold_vs_store_files_cold": ("store_cold", (("store_files_cold",),), None),
}


class ContentMismatch(RuntimeError):
    """Records that landed differ from what was written: the pass measured nothing."""


# ---------------------------------------------------------------------------- records and checksums


def splitmix64(i: int) -> int:
    z = (i * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z  # as a signed int64


def checksums(words: Any, weights: Any) -> Any:
    """Per-row sum of int64 words x weights, mod 2^64 (wrapping int64 arithmetic, so numpy and torch,
    CPU or CUDA, agree bit for bit). `words` is [records, words_per_record] int64 (numpy or torch),
    `weights` [words_per_record] of the same library. Every weight is odd, so any change confined to one
    word (one byte flipped, a short read that left a word stale) always changes the checksum."""
    if isinstance(words, np.ndarray):
        return np.einsum("ij,j->i", words, weights)
    return (words * weights).sum(dim=1)


def mismatches(got: Sequence[int] | np.ndarray, expected: np.ndarray, first: int = 0) -> list[int]:
    """Indices (first + row) of the records whose checksum differs from the expected one."""
    got_a = np.asarray(got, dtype=np.int64)
    want = expected[first : first + len(got_a)]
    return [first + int(i) for i in np.flatnonzero(got_a != want)]


def verify(got: Sequence[int] | np.ndarray, expected: np.ndarray, first: int, what: str) -> int:
    """Raise ContentMismatch unless every checksum matches; returns the number of records verified."""
    bad = mismatches(got, expected, first)
    if bad:
        raise ContentMismatch(f"{what}: {len(bad)} of {len(got)} records differ from what was written "
                              f"(first: record {bad[0]})")
    return len(got)


class Records:
    """N distinct records of `size` bytes: record i is pool[i % POOL] xor splitmix64(i) in every int64
    word (cheap to regenerate, all different). `expected[i]` is its checksum under `weights`."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        if size % 4096:
            raise ValueError("record size must be a multiple of 4096")
        self.n, self.size, self.words = n, size, size // 8
        rng = np.random.default_rng(seed)
        self.pool = np.frombuffer(os.urandom(min(n, POOL) * size), dtype=np.int64).reshape(-1, self.words)
        self.weights = rng.integers(-(2**63), 2**63 - 1, size=self.words, dtype=np.int64) | 1
        self.keys = np.array([splitmix64(i) for i in range(n)], dtype=np.int64)
        self.expected = np.empty(n, dtype=np.int64)

    def fill(self, first: int, out: np.ndarray) -> None:
        """Write records first .. first + len(out) - 1 into out ([k, words] int64) and note checksums."""
        for j in range(out.shape[0]):
            i = first + j
            np.bitwise_xor(self.pool[i % len(self.pool)], self.keys[i], out=out[j])
        self.expected[first : first + out.shape[0]] = checksums(out, self.weights)


# ---------------------------------------------------------------------------- host memory and the GPU


class HostBuf:
    """Host staging memory: pinned (page-locked, torch) when a GPU is used, else page-aligned mmap.
    `view` is a writable byte memoryview, `tensor` the torch uint8 tensor (pinned) or None."""

    def __init__(self, nbytes: int, torch_mod: Any = None) -> None:
        self.nbytes = nbytes
        if torch_mod is not None:
            self.tensor = torch_mod.empty(nbytes, dtype=torch_mod.uint8, pin_memory=True)
            self.array = self.tensor.numpy()
        else:
            self.tensor = None
            self.array = np.frombuffer(aligned_buffer(nbytes), dtype=np.uint8)
        self.array[:] = 0  # touch every page now, not inside a timed read
        self.view = memoryview(self.array).cast("B")

    def records(self, count: int, size: int) -> list[memoryview]:
        return [self.view[j * size : (j + 1) * size] for j in range(count)]


class Gpu:
    """The device side: a side stream for copies, the device arena the records land in, the weights."""

    def __init__(self, torch_mod: Any, total: int, record_size: int, weights: np.ndarray) -> None:
        self.torch = torch_mod
        self.dev = torch_mod.device("cuda", torch_mod.cuda.current_device())
        self.stream = torch_mod.cuda.Stream()
        self.arena = torch_mod.zeros(total, dtype=torch_mod.uint8, device=self.dev)
        self.record_size = record_size
        self.weights = torch_mod.from_numpy(weights).to(self.dev)
        torch_mod.cuda.synchronize()

    def event(self, timing: bool = False) -> Any:
        return self.torch.cuda.Event(enable_timing=timing)

    def copy(self, src: HostBuf, nbytes: int, dst_offset: int) -> None:
        """Enqueue src[:nbytes] -> arena[dst_offset:] on the side stream (asynchronous: src is pinned)."""
        with self.torch.cuda.stream(self.stream):
            self.arena[dst_offset : dst_offset + nbytes].copy_(src.tensor[:nbytes], non_blocking=True)

    def timed_copy(self, src: HostBuf, nbytes: int, dst_offset: int) -> tuple[Any, Any, Any]:
        """copy() between two timing events, then a completion event: (start, end, done)."""
        c0, c1, ev = self.event(True), self.event(True), self.event()
        c0.record(self.stream)
        self.copy(src, nbytes, dst_offset)
        c1.record(self.stream)
        ev.record(self.stream)
        return c0, c1, ev

    def clear(self) -> None:
        self.arena.zero_()  # a pass that lands nothing must not verify against the previous pass
        self.torch.cuda.synchronize()

    def checksums(self, n: int, chunk: int = 16) -> np.ndarray:
        """Checksums of records 0..n-1 as they are in the arena, computed on the GPU."""
        words = self.arena[: n * self.record_size].view(self.torch.int64).view(n, -1)
        out = [checksums(words[i : i + chunk], self.weights) for i in range(0, n, chunk)]
        return self.torch.cat(out).cpu().numpy()

    def h2d(self, src: list[HostBuf], nbytes: int) -> tuple[float, float]:
        """Ceiling (b): nbytes of back-to-back pinned -> device copies of H2D_CHUNK, cycling over the
        src buffers and the arena. (wall seconds by perf_counter, seconds by CUDA events)"""
        chunk = min(H2D_CHUNK, src[0].nbytes, self.arena.numel())
        start, end = self.event(True), self.event(True)
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record(self.stream)
        done, k, off = 0, 0, 0
        while done < nbytes:
            n = min(chunk, nbytes - done)
            if off + n > self.arena.numel():
                off = 0
            self.copy(src[k % len(src)], n, off)
            done, k, off = done + n, k + 1, off + n
        end.record(self.stream)
        self.stream.synchronize()
        wall = time.perf_counter() - t0
        return wall, start.elapsed_time(end) / 1e3


def cuda_or_reason(want_gpu: bool) -> tuple[Any, str | None]:
    """(torch, None) when a CUDA GPU can be used, else (None, why not)."""
    if not want_gpu:
        return None, "--no-gpu given"
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not importable: {exc}"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"
    return torch, None


def gpu_info(torch_mod: Any) -> dict[str, Any]:
    p = torch_mod.cuda.get_device_properties(torch_mod.cuda.current_device())
    smi = run_quiet(["nvidia-smi", "--query-gpu=name,pci.bus_id,pcie.link.gen.current,pcie.link.width.current,"
                "driver_version,memory.total,clocks.max.memory", "--format=csv,noheader"])
    return {
        "name": torch_mod.cuda.get_device_name(),
        "torch": torch_mod.__version__,
        "cuda_runtime": torch_mod.version.cuda,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "sm_count": p.multi_processor_count,
        "compute_capability": f"{p.major}.{p.minor}",
        "nvidia_smi": smi,
    }


# ---------------------------------------------------------------------------- the pipeline


ReadBatch = Callable[[int, int, HostBuf], None]  # (first record, count, slot): fill slot[:count*size]


def pipeline(read_batch: ReadBatch, n: int, per_batch: int, size: int, slots: list[HostBuf],
             gpu: Gpu | None, expected: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """Read records 0..n-1 in batches of `per_batch` into the host slots and, with a GPU, copy each batch
    to its place in the device arena. With several slots the copy of batch i runs on the side stream
    while batch i+1 is read (a slot is refilled once its last copy's event completed); with one slot
    each copy is waited for before the next read (serial). Then verifies every record (untimed):
    on the GPU, all of them in the arena; without a GPU, each batch in its slot right after its read
    (that time is subtracted). Returns the seconds and their split."""
    read_s = wait_s = check_s = 0.0
    verified = 0
    copies: list[tuple[Any, Any]] = []
    done_ev: list[Any] = [None] * len(slots)
    if gpu is not None:
        gpu.clear()
    t0 = time.perf_counter()
    for b, first in enumerate(range(0, n, per_batch)):
        count = min(per_batch, n - first)
        s = b % len(slots)
        slot = slots[s]
        if done_ev[s] is not None:
            tw = time.perf_counter()
            done_ev[s].synchronize()  # the copy that last used this slot has landed (GIL released)
            wait_s += time.perf_counter() - tw
        tr = time.perf_counter()
        read_batch(first, count, slot)
        read_s += time.perf_counter() - tr
        if gpu is None:
            tc = time.perf_counter()
            words = slot.array[: count * size].view(np.int64).reshape(count, -1)
            verified += verify(checksums(words, weights), expected, first, "host slot")
            check_s += time.perf_counter() - tc
            continue
        c0, c1, ev = gpu.timed_copy(slot, count * size, first * size)
        copies.append((c0, c1))
        if len(slots) == 1:  # serial: wait for this copy now
            tw = time.perf_counter()
            ev.synchronize()
            wait_s += time.perf_counter() - tw
        else:
            done_ev[s] = ev
    if gpu is not None:
        tw = time.perf_counter()
        gpu.stream.synchronize()
        wait_s += time.perf_counter() - tw
    seconds = time.perf_counter() - t0 - check_s
    copy_gpu_s = sum(c0.elapsed_time(c1) for c0, c1 in copies) / 1e3
    if gpu is not None:
        verified = verify(gpu.checksums(n), expected, 0, "device arena")
    return {"seconds": seconds, "read_s": read_s, "wait_s": wait_s, "copy_gpu_s": copy_gpu_s,
            "other_s": seconds - read_s - wait_s, "verified_records": verified}


def pipeline_threaded(read_batch: ReadBatch, n: int, per_batch: int, size: int, slots: list[HostBuf],
                      gpu: Gpu | None, expected: np.ndarray, weights: np.ndarray, readers: int) -> dict[str, Any]:
    """The overlapped pipeline with `readers` reader threads: each claims the next batch and a free slot,
    waits for that slot's last copy (its CUDA event), reads into it (the C read releases the GIL) and
    hands it to this thread, which enqueues its copy on the side stream and frees the slot with the
    copy's event. So up to `readers` reads are in flight at once, and copies behind them. read_s and
    wait_s are summed over the readers (they can exceed the wall time). Without a GPU each batch is
    verified here before its slot is freed, overlapping the other readers' reads (not subtracted)."""
    starts = list(range(0, n, per_batch))
    free: queue.Queue[tuple[HostBuf, Any]] = queue.Queue()
    for slot in slots:
        free.put((slot, None))
    ready: queue.Queue[tuple[int, int, HostBuf] | None] = queue.Queue()
    claim = iter(starts)
    lock = threading.Lock()
    read_s, wait_s = [0.0] * readers, [0.0] * readers
    errors: list[BaseException] = []

    def reader(r: int) -> None:
        try:
            while True:
                with lock:
                    first = next(claim, None)
                if first is None:
                    return
                slot, ev = free.get()
                if ev is not None:
                    tw = time.perf_counter()
                    ev.synchronize()
                    wait_s[r] += time.perf_counter() - tw
                count = min(per_batch, n - first)
                tr = time.perf_counter()
                read_batch(first, count, slot)
                read_s[r] += time.perf_counter() - tr
                ready.put((first, count, slot))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
        finally:
            ready.put(None)

    copies: list[tuple[Any, Any]] = []
    verified = 0
    if gpu is not None:
        gpu.clear()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=reader, args=(r,), daemon=True) for r in range(readers)]
    for t in threads:
        t.start()
    finished = 0
    while finished < readers:
        item = ready.get()
        if item is None:
            finished += 1
            continue
        first, count, slot = item
        if gpu is None:
            words = slot.array[: count * size].view(np.int64).reshape(count, -1)
            try:
                verified += verify(checksums(words, weights), expected, first, "host slot")
            except ContentMismatch as exc:
                errors.append(exc)
            free.put((slot, None))
            continue
        c0, c1, ev = gpu.timed_copy(slot, count * size, first * size)
        copies.append((c0, c1))
        free.put((slot, ev))
    for t in threads:
        t.join()
    tw = time.perf_counter()
    if gpu is not None:
        gpu.stream.synchronize()
    last_wait = time.perf_counter() - tw
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if gpu is not None:
        verified = verify(gpu.checksums(n), expected, 0, "device arena")
    return {"seconds": seconds, "read_s": sum(read_s), "wait_s": sum(wait_s) + last_wait,
            "copy_gpu_s": sum(c0.elapsed_time(c1) for c0, c1 in copies) / 1e3,
            "other_s": seconds - max(read_s) - last_wait, "verified_records": verified}


def disk_parallel(path: str, total: int, bufs: list[HostBuf], cold: bool) -> float:
    """Ceiling: the raw file read as len(bufs) sequential streams, each thread with its own descriptor
    reading one contiguous share of the file in CEIL_CALL preadv calls into its own pinned buffer."""
    if cold:
        drop_file(path)
    span = -(-total // len(bufs) // CEIL_CALL) * CEIL_CALL
    errors: list[BaseException] = []

    def stream(r: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                off, end = r * span, min(total, (r + 1) * span)
                while off < end:
                    k = min(CEIL_CALL, end - off)
                    preadv_all(fd, [bufs[r].view[:k]], off)
                    off += k
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(r,)) for r in range(len(bufs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def store_reader(store: Any, keys: list[bytes], size: int) -> ReadBatch:
    """get_many of one batch into the slot's record views (zero-copy, GIL released in the C read)."""
    def read(first: int, count: int, slot: HostBuf) -> None:
        got = store.get_many(keys[first : first + count], out=slot.records(count, size))
        if got.count(size) != count:
            raise RuntimeError(f"get_many of records {first}..{first + count - 1} returned {got}")
    return read


def file_reader(fd: int, size: int) -> ReadBatch:
    """preadv of the raw file's bytes of one batch into the slot (same bytes, same order)."""
    def read(first: int, count: int, slot: HostBuf) -> None:
        preadv_all(fd, [slot.view[: count * size]], first * size)
    return read


# ---------------------------------------------------------------------------- setup and one repeat


def write_data(work: str, recs: Records, per_batch: int) -> tuple[str, str, list[bytes], dict[str, Any]]:
    """The raw file, then the store, of the same records (generated batch by batch), then os.sync()."""
    raw, path = os.path.join(work, "raw.bin"), os.path.join(work, "store")
    keys = keys_for(recs.n)
    buf = np.frombuffer(aligned_buffer(per_batch * recs.size), dtype=np.int64).reshape(per_batch, -1)
    t0 = time.perf_counter()
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for first in range(0, recs.n, per_batch):
            count = min(per_batch, recs.n - first)
            recs.fill(first, buf[:count])
            pwritev_all(fd, [buf[:count].data.cast("B")], first * recs.size)
    finally:
        os.close(fd)
    t1 = time.perf_counter()
    with blockstore.open(path, durability="cache") as store:
        for first in range(0, recs.n, per_batch):
            count = min(per_batch, recs.n - first)
            recs.fill(first, buf[:count])
            store.put_many([(keys[first + j], memoryview(buf[j]).cast("B")) for j in range(count)])
        stats = store.stats().as_dict()
    t2 = time.perf_counter()
    os.sync()
    return raw, path, keys, {"raw_write_s": t1 - t0, "store_put_s": t2 - t1, "sync_s": time.perf_counter() - t2,
                             "store_stats": stats}


def drop_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_repeat(ctx: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]], int]:
    """Every figure of one repeat (seconds, mean of its two runs), the split of each pipeline figure
    (mean of its two runs) and the number of records verified."""
    recs: Records = ctx["recs"]
    n, size, per_batch = recs.n, recs.size, ctx["per_batch"]
    total = n * size
    gpu: Gpu | None = ctx["gpu"]
    slots: list[HostBuf] = ctx["slots"]
    store, raw = ctx["store"], ctx["raw"]
    ceil_dst = ctx["ceil_buf"].records(CEIL_CALL // MiB, MiB)  # 64 x 1 MiB views: ceilings.raw_read's call
    runs: dict[str, list[float]] = {}
    parts: dict[str, list[dict[str, float]]] = {}
    verified = 0
    get = store_reader(store, ctx["keys"], size)
    raw_fd = os.open(raw, os.O_RDONLY)

    def note(name: str, secs: float) -> None:
        runs.setdefault(name, []).append(secs)

    def disk(cold: bool) -> Callable[[], None]:
        def phase() -> None:
            note("disk_cold" if cold else "disk_warm", raw_read(raw, total // MiB, ceil_dst, cold=cold, verify=False))
        return phase

    def store_files() -> None:
        blocks = os.path.join(ctx["store_path"], "blocks")
        files = sorted(os.path.join(blocks, f) for f in os.listdir(blocks))  # block-id (= write) order
        note("store_files_cold", read_files_cold(files, ceil_dst))

    readers: int = ctx["readers"]

    def disk_par(cold: bool) -> Callable[[], None]:
        def phase() -> None:
            note("disk_cold_par" if cold else "disk_warm_par", disk_parallel(raw, total, ctx["par_bufs"], cold))
        return phase

    def piped(name: str, read: ReadBatch, drop: Callable[[], None] | None, nslots: int,
              threads: int = 0) -> Callable[[], None]:
        def phase() -> None:
            nonlocal verified
            if drop is not None:
                drop()
            if threads:
                r = pipeline_threaded(read, n, per_batch, size, slots[:nslots], gpu, recs.expected, recs.weights,
                                      threads)
            else:
                r = pipeline(read, n, per_batch, size, slots[:nslots], gpu, recs.expected, recs.weights)
            note(name, r.pop("seconds"))
            verified += r.pop("verified_records")
            parts.setdefault(name, []).append(r)
        return phase

    def h2d() -> None:
        assert gpu is not None
        wall, ev = gpu.h2d(slots, max(total, H2D_MIN_BYTES))
        scale = total / max(total, H2D_MIN_BYTES)  # as seconds for `total` bytes, like every figure
        note("h2d", wall * scale)
        note("h2d_cuda_events", ev * scale)

    def group(phases: list[Callable[[], None]]) -> None:
        for phase in phases + phases[::-1]:  # A B C D D C B A
            os.sync()
            phase()

    try:
        if gpu is not None:
            h2d()
        k = SLOTS if gpu is not None else 1
        cold = [disk(True), store_files,
                piped("raw_cold_pipeline", file_reader(raw_fd, size), lambda: drop_file(raw), k),
                piped("store_cold", get, store.drop_page_cache, k)]
        if readers > 1:
            cold.insert(1, disk_par(True))
            cold.append(piped("store_cold_par", get, store.drop_page_cache, len(slots), readers))
        if gpu is not None:
            cold.append(piped("store_cold_serial", get, store.drop_page_cache, 1))
        group(cold)
        # warm: make sure both the raw file and the block files are cached (read once untimed)
        raw_read(raw, total // MiB, ceil_dst, cold=False, verify=False)
        pipeline(get, n, per_batch, size, slots[:1], None, recs.expected, recs.weights)
        warm = [disk(False),
                piped("raw_warm_pipeline", file_reader(raw_fd, size), None, k),
                piped("store_warm", get, None, k)]
        if readers > 1:
            warm.insert(1, disk_par(False))
            warm.append(piped("store_warm_par", get, None, len(slots), readers))
        if gpu is not None:
            warm.append(piped("store_warm_serial", get, None, 1))
        group(warm)
        if gpu is not None:
            h2d()
    finally:
        os.close(raw_fd)
    split = {name: {key: statistics.fmean(p[key] for p in ps) for key in ps[0]} for name, ps in parts.items()}
    return {name: statistics.fmean(v) for name, v in runs.items()}, split, verified


# ---------------------------------------------------------------------------- summary


def summarize(runs: list[dict[str, float]], splits: list[dict[str, dict[str, float]]],
              total: int, n: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name in runs[0]:
        secs = [r[name] for r in runs]
        figures[name] = {"gb_per_s": spread([total / s / 1e9 for s in secs]),
                         "records_per_s": spread([n / s for s in secs]),
                         "seconds": spread(secs),
                         "description": DESCRIPTIONS.get(name, "ceiling (b) timed by CUDA events instead of "
                                                                "perf_counter")}
        if name in splits[0]:
            figures[name]["split_s"] = {k: spread([sp[name][k] for sp in splits]) for k in splits[0][name]}
    ratios: dict[str, Any] = {}
    for key, (fig, ceils, target) in RATIOS.items():
        have = [[c for c in alts if c in runs[0]] for alts in ceils]
        have = [alts for alts in have if alts]
        if fig not in runs[0] or not have:
            continue
        # per repeat, in times: the fastest alternative of each ceiling, then the slowest ceiling
        r = spread([max(min(run[c] for c in alts) for alts in have) / run[fig] for run in runs])
        r["vs"] = [" or ".join(alts) for alts in have]
        if target is not None:
            r["target"], r["met"] = target, r["median"] >= target
        ratios[key] = r
    return {"figures": figures, "ratios": ratios, "bottleneck": bottleneck(figures)}


def bottleneck(figures: dict[str, Any]) -> dict[str, Any]:
    """Which ceiling is lower, and where the overlapped and serial passes spent their time."""
    med = {k: f["gb_per_s"]["median"] for k, f in figures.items()}
    out: dict[str, Any] = {}
    for temp in ("cold", "warm"):
        disk = max(med[x] for x in (f"disk_{temp}", f"disk_{temp}_par") if x in med)
        lower = "disk" if "h2d" not in med or disk <= med["h2d"] else "h2d"
        d: dict[str, Any] = {"lower_ceiling": lower, "disk_gb_per_s": disk, "h2d_gb_per_s": med.get("h2d")}
        for fig in (f"store_{temp}", f"store_{temp}_par", f"store_{temp}_serial"):
            if fig in figures and "split_s" in figures[fig]:
                sp = {k: v["median"] for k, v in figures[fig]["split_s"].items()}
                wall = figures[fig]["seconds"]["median"]
                d[fig] = {"read_share": sp["read_s"] / wall, "wait_for_copy_share": sp["wait_s"] / wall,
                          "copy_gpu_busy_share": sp["copy_gpu_s"] / wall, "other_share": sp["other_s"] / wall}
        st = d.get(f"store_{temp}")
        text = f"{temp}: lower ceiling is {lower} (disk {disk:.2f} GB/s"
        text += f", H2D {med['h2d']:.2f} GB/s)" if "h2d" in med else "; no GPU)"
        if st is not None:
            text += (f"; overlapped store pass: {st['read_share']:.0%} of its wall time in get_many, "
                     f"{st['wait_for_copy_share']:.0%} waiting for copies")
            if "h2d" in med:
                text += f", GPU copies busy {st['copy_gpu_busy_share']:.0%} of it"
        if temp == "cold" and "store_files_cold" in med:
            d["layout_share"] = med["store_files_cold"] / med["disk_cold"]
            d["read_path_share"] = med["store_cold"] / med["store_files_cold"]
            text += (f"; the store's block files read cold with plain preadv reach {d['layout_share']:.2f} of the "
                     f"raw file (layout), get_many {d['read_path_share']:.2f} of those (read path)")
        d["text"] = text
        out[temp] = d
    return out


def _vs(r: dict[str, Any]) -> str:
    return f"min({', '.join(r['vs'])})" if len(r["vs"]) > 1 else r["vs"][0]


def table(summary: dict[str, Any]) -> str:
    w = 30
    lines = [f"{'figure':<{w}}{'median':>8}{'min':>8}{'max':>8}{'IQR':>8}   (GB/s)  read/wait/copy s"]
    for name, f in summary["figures"].items():
        g = f["gb_per_s"]
        extra = ""
        if "split_s" in f:
            sp = f["split_s"]
            extra = f"  {sp['read_s']['median']:.3f}/{sp['wait_s']['median']:.3f}/{sp['copy_gpu_s']['median']:.3f}"
        lines.append(f"{name:<{w}}{g['median']:>8.2f}{g['min']:>8.2f}{g['max']:>8.2f}{g['iqr']:>8.2f}{extra}")
    lines.append("")
    lines.append(f"{'ratio':<{w}}{'median':>8}{'min':>8}{'max':>8}{'IQR':>8}   vs")
    for name, r in summary["ratios"].items():
        verdict = ""
        if "target" in r:
            verdict = f"  >= {r['target']} {'met' if r['met'] else 'NOT met'}"
        lines.append(f"{name:<{w}}{r['median']:>8.3f}{r['min']:>8.3f}{r['max']:>8.3f}{r['iqr']:>8.3f}"
                     f"   {_vs(r)}{verdict}")
    lines.append("")
    for temp in ("cold", "warm"):
        lines.append(summary["bottleneck"][temp]["text"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------- LMCache probe

_PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, os, re
out = {}
def err(e):
    return f"{type(e).__name__}: {e}".strip()[:600]
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
except Exception as e:
    out["torch_error"] = err(e)
try:
    dist = md.distribution("lmcache")
    out["lmcache_version"] = dist.version
    root = os.path.join(str(dist.locate_file("")), "lmcache")
    so = [f for f in os.listdir(root) if f.startswith("cuda_ops.") and f.endswith(".so")]
    if so:  # the CUDA extension alone, without the package's Python dependencies
        try:
            spec = importlib.util.spec_from_file_location("cuda_ops", os.path.join(root, so[0]))
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            out["cuda_ops_extension"] = "loads"
        except BaseException as e:
            out["cuda_ops_extension"] = err(e)
    missing = []
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[ <>=!~;\[(]", req, maxsplit=1)[0]
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    out["missing_requirements"] = missing
except md.PackageNotFoundError:
    out["lmcache_version"] = None
for mod in ("lmcache", "lmcache.v1.storage_backend.local_disk_backend"):
    try:
        importlib.import_module(mod)
        out[mod] = "imports"
    except BaseException as e:
        out[mod] = err(e)
print(json.dumps(out))
"""


def lmcache_probe(site: str | None, timeout: float = 180.0) -> dict[str, Any]:
    """Whether LMCache's local-disk backend imports on this machine (a subprocess: LMCache's import starts
    threads and touches CUDA). `site`: a directory holding an unpacked lmcache wheel to try."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "LMCACHE_TRACK_USAGE": "false", "LMCACHE_LOG_LEVEL": "WARNING",
           "VLLM_NO_USAGE_STATS": "1"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=tempfile.gettempdir())
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        found = {"probe_error": f"{type(exc).__name__}: {exc}"[:600]}
    found["site"] = site
    return found


def lmcache_verdict(probe: dict[str, Any], gpu: bool) -> dict[str, Any]:
    disk_mod = "lmcache.v1.storage_backend.local_disk_backend"
    if "skipped" in probe:
        reason = f"not probed ({probe['skipped']})"
    elif probe.get(disk_mod) != "imports":
        reason = f"LMCache's local-disk backend does not import on this machine: {probe.get(disk_mod)}"
        if probe.get("missing_requirements"):
            reason += f" (missing requirements: {', '.join(probe['missing_requirements'])})"
        if probe.get("cuda_ops_extension") not in (None, "loads"):
            reason += f"; its CUDA extension: {probe['cuda_ops_extension']}"
    elif not gpu:
        reason = "LMCache imports, but there is no GPU here for its GPU path"
    else:
        reason = ("LMCache imports here, but this script has no LMCache driver: its local-disk path was "
                  "never runnable on the benchmark's GPU machine (bench/README.md)")
    return {"ran": False, "reason": reason, "probe": probe}


# ---------------------------------------------------------------------------- plots and markdown

PLOT_GROUPS = {
    "cold": ["disk_cold", "disk_cold_par", "h2d", "store_files_cold", "raw_cold_pipeline", "store_cold",
             "store_cold_par", "store_cold_serial"],
    "warm": ["disk_warm", "disk_warm_par", "h2d", "raw_warm_pipeline", "store_warm", "store_warm_par",
             "store_warm_serial"],
}


def plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """A bar chart of the GB/s of each path next to its ceilings, cold and warm, with min/max error bars.
    Writes out_dir/gpu_path.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = doc["figures"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"disk": "#8c8c8c", "h2d": "#c7c7c7", "raw": "#9ecae1", "store": "#3182bd", "par": "#08519c"}
    for ax, (temp, names) in zip(axes, PLOT_GROUPS.items()):
        names = [x for x in names if x in figs]
        med = [figs[x]["gb_per_s"]["median"] for x in names]
        lo = [m - figs[x]["gb_per_s"]["min"] for m, x in zip(med, names)]
        hi = [figs[x]["gb_per_s"]["max"] - m for m, x in zip(med, names)]
        col = [colors["par"] if x.startswith("store") and x.endswith("par") else
               colors["store"] if x.startswith("store") else colors[x.split("_")[0]] for x in names]
        hatch = ["//" if x.endswith("serial") else "" for x in names]
        bars = ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4, color=col, hatch=hatch, edgecolor="black")
        for b, m in zip(bars, med):
            ax.annotate(f"{m:.2f}", (b.get_x() + b.get_width() / 2, m), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ceil = min(max(figs[x]["gb_per_s"]["median"] for x in (f"disk_{temp}", f"disk_{temp}_par") if x in figs),
                   figs["h2d"]["gb_per_s"]["median"] if "h2d" in figs else float("inf"))
        ax.axhline(ceil, color="red", lw=1, ls="--", label=f"min ceiling {ceil:.2f}")
        ax.axhline(TARGET * ceil, color="red", lw=0.8, ls=":", label=f"{TARGET} x min ceiling")
        ax.set_xticks(range(len(names)), [x.replace("_", "\n", 1) for x in names], fontsize=7)
        ax.set_title(f"{temp} (page cache {'dropped' if temp == 'cold' else 'hot'})")
        ax.legend(fontsize=8)
        ax.set_yscale("log" if "h2d" in figs else "linear")
    axes[0].set_ylabel("GB/s (median, min-max over repeats)")
    where = doc["gpu"]["name"] if doc.get("gpu") else "no GPU (host only)"
    fig.suptitle(f"blockstore -> pinned host -> GPU: {doc['config']['records']} x "
                 f"{doc['config']['record_bytes'] // MiB} MiB records, {doc['config']['repeats']} repeats, {where}",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_path.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def summary_markdown(doc: dict[str, Any]) -> str:
    """Markdown: the headline figures and ratios, the machine, and the command that reproduces them."""
    figs, ratios = doc["figures"], doc["ratios"]
    m = doc["machine"]
    gpu = doc.get("gpu")
    lines = ["| figure | median GB/s | min – max | IQR |", "|---|---|---|---|"]
    for name in ["disk_cold", "disk_cold_par", "disk_warm", "disk_warm_par", "h2d", "store_cold", "store_cold_par",
                 "store_cold_serial", "store_warm", "store_warm_par", "store_warm_serial", "raw_cold_pipeline",
                 "raw_warm_pipeline", "store_files_cold"]:
        if name in figs:
            g = figs[name]["gb_per_s"]
            lines.append(f"| {name} | {g['median']:.2f} | {g['min']:.2f} – {g['max']:.2f} | {g['iqr']:.2f} |")
    lines += ["", "| ratio | median | min – max | target |", "|---|---|---|---|"]
    for name, r in ratios.items():
        tgt = f"{r['target']} ({'met' if r['met'] else '**not met**'})" if "target" in r else "—"
        lines.append(f"| {name} (vs {_vs(r)}) | **{r['median']:.3f}** | "
                     f"{r['min']:.3f} – {r['max']:.3f} | {tgt} |")
    lines += ["", f"- Bottleneck: {doc['bottleneck']['cold']['text']}; {doc['bottleneck']['warm']['text']}."]
    lines.append(f"- GPU: {gpu['name']}, torch {gpu['torch']}, CUDA {gpu['cuda_runtime']}" if gpu else
                 f"- GPU: none ({doc.get('gpu_skipped')})")
    lines.append(f"- Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, kernel {m['kernel']}; "
                 f"scratch on {m.get('fs_type_stat', '?')} ({' '.join(m.get('df', []))}); {m['date']}")
    lines.append(f"- Data: {doc['config']['records']} records x {doc['config']['record_bytes'] // MiB} MiB, "
                 f"{doc['config']['repeats']} repeats; every record verified on arrival "
                 f"({doc['verification']['verified_records']} record checks)")
    lines.append(f"- LMCache: not compared — {doc['lmcache']['reason']}")
    lines.append(f"- Reproduce: `{doc['command']}`")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "gpu_path", quick=f"{RECORDS_QUICK} records and {REPEATS_QUICK} repeats (explicit flags still win)",
                  full=f"{RECORDS} records and {REPEATS} repeats", dir_default=DEFAULT_DIR,
                  dir_help="(default bench/.scratch)")
    ap.add_argument("--records", type=int, help=f"number of records (default {RECORDS}, --quick {RECORDS_QUICK})")
    ap.add_argument("--record-mib", type=int, default=RECORD_MIB, help=f"MiB per record (default {RECORD_MIB})")
    ap.add_argument("--batch-mib", type=int, default=BATCH_MIB,
                    help=f"MiB of records per get_many call and per H2D copy (default {BATCH_MIB})")
    ap.add_argument("--repeats", type=int, help=f"repeats (default {REPEATS}, --quick {REPEATS_QUICK})")
    ap.add_argument("--readers", type=int, default=READERS,
                    help=f"reader threads of the *_par figures, and streams of disk_*_par (default {READERS}; "
                         "1 leaves them out)")
    ap.add_argument("--no-gpu", action="store_true", help="measure the disk and store part only, even with a GPU")
    ap.add_argument("--lmcache-site", help="directory with an unpacked lmcache wheel for the LMCache import probe")
    ap.add_argument("--no-lmcache-probe", action="store_true", help="skip the LMCache import probe (tests)")
    args = ap.parse_args(argv)
    args.records = args.records or (RECORDS_QUICK if args.quick else RECORDS)
    args.repeats = args.repeats or (REPEATS_QUICK if args.quick else REPEATS)
    args.json = results_path(args, "gpu_path")
    if min(args.records, args.repeats, args.record_mib, args.batch_mib, args.readers) < 1:
        ap.error("--records, --repeats, --record-mib, --batch-mib and --readers must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    size = args.record_mib * MiB
    n, total = args.records, args.records * size
    per_batch = max(1, args.batch_mib * MiB // size)
    os.makedirs(args.dir, exist_ok=True)
    need = 2 * total + total // 8 + 256 * MiB  # raw file + store (+ header pages, directory) + slack
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(f"{args.dir}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f} GiB")
    torch_mod, skipped = cuda_or_reason(not args.no_gpu)
    if skipped:
        print(f"GPU part skipped: {skipped}", file=sys.stderr)
    engine = engine_state()
    machine = machine_info(args.dir)
    machine["mount"] = run_quiet(["findmnt", "-no", "SOURCE,FSTYPE,OPTIONS", "-T", args.dir])
    machine["memlock_limit"] = run_quiet(["sh", "-c", "ulimit -l"])
    load = os.getloadavg()[0]
    busy0, own0 = cpu_busy_s()
    probe = {"skipped": "--no-lmcache-probe"} if args.no_lmcache_probe else lmcache_probe(args.lmcache_site)
    recs = Records(n, size)
    nslots = max(SLOTS if torch_mod else 1, args.readers + 1 if args.readers > 1 else 1)
    slots = [HostBuf(per_batch * size, torch_mod) for _ in range(nslots)]
    ceil_buf = HostBuf(CEIL_CALL, torch_mod)
    par_bufs = [ceil_buf] + [HostBuf(CEIL_CALL, torch_mod) for _ in range(args.readers - 1)]
    gpu = Gpu(torch_mod, total, size, recs.weights) if torch_mod else None
    if gpu is not None:
        gpu.h2d(slots, 512 * MiB)  # untimed: first copies and kernels (lazy CUDA module loading) out of the way
        gpu.checksums(min(n, 2))
    root = tempfile.mkdtemp(prefix="gpu-path-", dir=args.dir)
    runs: list[dict[str, float]] = []
    splits: list[dict[str, dict[str, float]]] = []
    verified = 0
    t0 = time.perf_counter()
    try:
        raw, path, keys, setup = write_data(root, recs, per_batch)
        print(f"data written: {total / 2**30:.2f} GiB twice ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        with blockstore.open(path, read_only=True) as store:
            ctx = {"recs": recs, "per_batch": per_batch, "gpu": gpu, "slots": slots, "store": store, "raw": raw,
                   "store_path": path, "keys": keys, "ceil_buf": ceil_buf, "par_bufs": par_bufs,
                   "readers": args.readers}
            for rep in range(args.repeats):
                times, split, v = one_repeat(ctx)
                runs.append(times)
                splits.append(split)
                verified += v
                print(f"repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            block_files = len(store.block_table())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    busy1, own1 = cpu_busy_s()
    summary = summarize(runs, splits, total, n)
    pinned = sum(s.nbytes for s in slots) + sum(b.nbytes for b in par_bufs)
    gpu_doc = None
    if torch_mod is not None:
        gpu_doc = {**gpu_info(torch_mod), "pinned_host_bytes": pinned, "device_arena_bytes": total}
    doc = {
        "benchmark": "gpu_path",
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "config": {"records": n, "record_bytes": size, "total_bytes": total, "repeats": args.repeats,
                   "batch_records": per_batch, "batch_bytes": per_batch * size, "slots": len(slots),
                   "parallel_readers": args.readers if args.readers > 1 else None,
                   "disk_ceiling_call_bytes": CEIL_CALL, "h2d_chunk_bytes": H2D_CHUNK,
                   "h2d_bytes": max(total, H2D_MIN_BYTES) if gpu else None, "block_files": block_files,
                   "sink": "gpu" if gpu else "host (no GPU)",
                   "host_memory": "pinned (torch pin_memory)" if gpu else "page-aligned mmap, not pinned",
                   "order": "per repeat: h2d; cold group A B C D D C B A; warm group likewise; h2d. Each "
                            "figure the mean time of its two runs",
                   "data": "written once per run (raw file, then store, durability cache), os.sync(); "
                           "repeats re-read it",
                   "gb": "1e9 bytes of payload"},
        "gpu": gpu_doc,
        "gpu_skipped": skipped,
        "machine": {**machine, "loadavg_at_start": load,
                    "cpu_s_not_this_process": round((busy1 - busy0) - (own1 - own0), 1),
                    "pinned_host_bytes": pinned if gpu else 0},
        "engine": engine,
        "setup": setup,
        "wall_s": round(time.perf_counter() - t0, 1),
        **summary,
        "verification": {"verified_records": verified, "mismatches": 0,
                         "how": "checksum (sum of int64 words x odd weights mod 2^64) of every record after "
                                "every pipeline pass, on the GPU arena (or each host batch without a GPU), "
                                "against the checksum computed when the record was generated"},
        "lmcache": lmcache_verdict(probe, gpu is not None),
        "runs_seconds": runs,
        "runs_split_seconds": splits,
    }
    write_json(args.json, doc)
    try:
        pngs = plots(doc, os.path.dirname(os.path.abspath(args.json)))
    except Exception as exc:  # a missing matplotlib must not lose the measurement
        pngs = []
        print(f"plot failed: {exc}", file=sys.stderr)
    print(table(summary))
    print(f"LMCache: {doc['lmcache']['reason']}")
    if skipped:
        print(f"GPU part skipped: {skipped}")
    print(f"(full results: {os.path.relpath(args.json)}; plot: {', '.join(map(os.path.relpath, pngs)) or 'none'})")
    print(json.dumps({
        "benchmark": "gpu_path", "records": n, "record_mib": args.record_mib, "repeats": args.repeats,
        "gpu": gpu_doc["name"] if gpu_doc else None, "gpu_skipped": skipped,
        "gb_per_s": {k: round(v["gb_per_s"]["median"], 3) for k, v in summary["figures"].items()},
        "ratios": {k: round(v["median"], 3) for k, v in summary["ratios"].items()},
        "targets_met": {k: v["met"] for k, v in summary["ratios"].items() if "met" in v},
        "bottleneck": {k: v["lower_ceiling"] for k, v in summary["bottleneck"].items()},
        "verified_records": verified, "lmcache_ran": False,
    }))


if __name__ == "__main__":
    main()
