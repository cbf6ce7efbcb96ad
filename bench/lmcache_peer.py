"""Peer benchmark: blockstore's LMCache L2 adapter against LMCache's own `fs` L2 adapter, on the same
objects, driven the way `lmcache server` drives its L2 adapters, with raw-disk ceilings of the same run.

Objects: N LMCache `TensorMemoryObj`s of 1 MiB each (shape [2, 8, 256, 128] float16: 2 (K, V) x 8 layers
x 256 tokens x 128 hidden), random bytes, from LMCache's L1 allocator (`MixedMemoryAllocator`: page-aligned
arena, 4 KiB-aligned objects); loads go into a second such arena (the staging buffers of a prefetch). Keys are
LMCache `ObjectKey`s with 32-byte chunk hashes (the server's default blake3 size).

Driving, as the server's controllers do (lmcache 0.5.6 store_controller.py / prefetch_controller.py):

  store   `submit_store_task` of TASK_KEYS keys per task, at most INFLIGHT tasks in flight; the driver
          waits on the adapter's store event fd (select), drains it and calls `pop_completed_store_tasks`
  load    per request of TASK_KEYS keys: `submit_lookup_and_lock_task`, wait on the lookup fd,
          `query_lookup_and_lock_result`, then `submit_load_task` into the staging buffers, wait on the
          load fd, `query_load_result`, then `submit_unlock` of the planned keys; INFLIGHT requests at once

Every repeat, on a fresh directory (ceilings from bench/ceilings.py, same payload bytes):

  raw_write            pwritev of the N objects' bytes into one file, 64 MiB per call, no sync
  raw_read_warm        sequential preadv of that file into 1 MiB staging buffers, page cache hot
                       (raw_read_warm_xxh3: the same plus xxh3 of every MiB, diagnostic)
  raw_read_cold        the same after posix_fadvise(DONTNEED) on the file
                       (diagnostic: raw_read_cold_bs_files / _fs_files, each adapter's own files read
                       cold the same way with no adapter code: what its on-disk layout costs)
  bs_store / fs_store  the store path above (blockstore: durability "cache", compaction off by default)
  bs_load_warm / fs_load_warm   the load path above, data cached (one untimed pass first)
  bs_load_cold / fs_load_cold   the same after dropping that adapter's files from the page cache
                       (blockstore: Store.drop_page_cache(); fs: posix_fadvise(DONTNEED) on every file)
  extra                raw_durable_write (32 MiB + fdatasync per call) and bs_store_sync (durability "sync")

Each group runs in the order raw, blockstore, fs, fs, blockstore, raw, and each figure is the mean of its
two runs (a linear drift of the shared disk cancels out). os.sync() before every timed phase, a ballast
file before every write phase (ceilings.Settle). Every loaded object is checked against the xxh3 of what
was stored (the staging arena is zeroed before each timed load), every store result must report the bytes
of every object, every lookup and load bitmap must be all ones. Ratios are per repeat; medians and spreads
over repeats. Results: bench/results/lmcache_peer.json (--quick: lmcache_peer_quick.json); the last line
of stdout is a one-line JSON summary.

    python -m bench.lmcache_peer             # 2048 objects (2 GiB), 5 repeats
    python -m bench.lmcache_peer --quick     # 256 objects, 3 repeats
"""

from __future__ import annotations

import os

for _k, _v in (("DO_NOT_TRACK", "1"), ("VLLM_NO_USAGE_STATS", "1"), ("LMCACHE_TRACK_USAGE", "false"),
               ("LMCACHE_LOG_LEVEL", "WARNING")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402
from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters.fs_l2_adapter import (  # noqa: E402
    FSL2Adapter,
    FSL2AdapterConfig,
    _object_key_to_filename,
)
from lmcache.v1.memory_allocators.mixed_memory_allocator import MixedMemoryAllocator  # noqa: E402
from lmcache.v1.platform import consume_fd  # noqa: E402

from bench.ceilings import Settle, raw_read, raw_write, read_files_cold  # noqa: E402
from bench.common import REPO, cpu_busy_s, machine_info, results_path, run_quiet, spread, standard_args, write_json  # noqa: E402
from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig  # noqa: E402

MiB = 1 << 20
RECORD = MiB
SHAPE = torch.Size([2, 8, 256, 128])  # [K/V, layers, tokens, hidden]
DTYPE = torch.float16
TASK_KEYS = 32  # keys per store task and per prefetch request (one 8k-token prompt of 256-token chunks)
INFLIGHT = 4  # store tasks / prefetch requests in flight at once
RAW_BATCH = 64  # raw ceilings: records per pwritev/preadv call (ceilings.BATCH)
MODEL = "bench-org/llama-kv-1mib"
RANK = ObjectKey.ComputeKVRank(world_size=1, global_rank=0, local_world_size=1, local_rank=0)
WAIT_S = 300.0  # no task of this benchmark may take longer: a silent adapter fails the run, never hangs it
DEFAULT_DIR = os.path.join(REPO, "bench", ".scratch")

# (numerator figure, denominator figure, target): ratio of throughputs = denominator time / numerator time
RATIOS: dict[str, tuple[str, str, float]] = {
    "store_bs_vs_fs": ("bs_store", "fs_store", 5.0),
    "warm_load_bs_vs_fs": ("bs_load_warm", "fs_load_warm", 3.0),
    "cold_load_bs_vs_fs": ("bs_load_cold", "fs_load_cold", 1.5),
    "store_bs_vs_raw_write": ("bs_store", "raw_write", 0.85),
    "warm_load_bs_vs_raw_read": ("bs_load_warm", "raw_read_warm", 0.85),
    "cold_load_bs_vs_raw_read": ("bs_load_cold", "raw_read_cold", 0.85),
}
DIAGNOSTICS: dict[str, tuple[str, str]] = {
    "store_fs_vs_raw_write": ("fs_store", "raw_write"),
    "warm_load_fs_vs_raw_read": ("fs_load_warm", "raw_read_warm"),
    "cold_load_fs_vs_raw_read": ("fs_load_cold", "raw_read_cold"),
    "warm_load_bs_vs_raw_read_xxh3": ("bs_load_warm", "raw_read_warm_xxh3"),
    "store_sync_bs_vs_raw_durable_write": ("bs_store_sync", "raw_durable_write"),
    "store_sync_bs_vs_fs_store": ("bs_store_sync", "fs_store"),
    # the cold loss split into layout (the adapter's own files read cold with plain preadv, no adapter
    # code) and read path (the adapter against its own files); their product is the cold ratio to raw
    "bs_files_cold_read_vs_raw_read_cold": ("raw_read_cold_bs_files", "raw_read_cold"),
    "cold_load_bs_vs_bs_files_cold_read": ("bs_load_cold", "raw_read_cold_bs_files"),
    "fs_files_cold_read_vs_raw_read_cold": ("raw_read_cold_fs_files", "raw_read_cold"),
    "cold_load_fs_vs_fs_files_cold_read": ("fs_load_cold", "raw_read_cold_fs_files"),
    # bounds: the blockstore/fs ratio blockstore would reach at the raw ceiling (ceiling / fs)
    "bound_store_raw_write_vs_fs": ("raw_write", "fs_store"),
    "bound_warm_raw_read_vs_fs": ("raw_read_warm", "fs_load_warm"),
    "bound_warm_raw_read_xxh3_vs_fs": ("raw_read_warm_xxh3", "fs_load_warm"),
    "bound_cold_raw_read_vs_fs": ("raw_read_cold", "fs_load_cold"),
}


# ---------------------------------------------------------------------------- objects and keys


class Objects:
    """N LMCache TensorMemoryObjs of SHAPE/DTYPE from LMCache's own L1 allocator (MixedMemoryAllocator, what
    the server's L1MemoryManager builds: a pinned, page-aligned arena carved by TensorMemoryAllocator with
    4 KiB alignment), the objects the server hands to adapters. The arena is touched up front so no phase
    pays first-touch page faults (on this VM those cost more than the copies)."""

    def __init__(self, n: int) -> None:
        self.alloc = MixedMemoryAllocator(n * RECORD + 16 * MiB)
        self.arena = self.alloc.buffer
        self.arena.fill_(0)
        self.objs: list[Any] = []
        for _ in range(n):
            o = self.alloc.allocate(SHAPE, DTYPE)
            if o is None:
                raise RuntimeError("arena too small for the objects")
            self.objs.append(o)
        if self.objs[0].get_size() != RECORD:
            raise RuntimeError(f"object of {self.objs[0].get_size()} bytes, expected {RECORD}")
        self.views = [o.byte_array for o in self.objs]
        self.np = [np.frombuffer(v, dtype=np.uint8) for v in self.views]

    def fill_random(self, seed: int) -> list[int]:
        """Distinct random bytes in every object; returns the xxh3 of each."""
        rng = np.random.default_rng(seed)
        for a in self.np:
            a[:] = rng.integers(0, 256, RECORD, dtype=np.uint8)
        return [xxhash.xxh3_64_intdigest(v) for v in self.views]

    def zero(self) -> None:
        self.arena.fill_(0)

    def verify(self, digests: list[int]) -> int:
        """Number of objects whose bytes equal what was stored (all, or the run fails)."""
        bad = [i for i, (v, d) in enumerate(zip(self.views, digests)) if xxhash.xxh3_64_intdigest(v) != d]
        if bad:
            raise RuntimeError(f"{len(bad)} loaded object(s) differ from what was stored, first {bad[:5]}")
        return len(digests)

    def release(self) -> None:
        for o in self.objs:
            o.ref_count_down()
        self.objs.clear()
        self.views.clear()
        self.np.clear()
        self.alloc.close()


class Sources:
    """What ceilings.raw_write and Settle index: record i is object i % n (Settle's ballast runs past n)."""

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views

    def __getitem__(self, i: int) -> memoryview:
        return self.views[i % len(self.views)]


def keys_for(n: int) -> list[ObjectKey]:
    return [ObjectKey(chunk_hash=hashlib.blake2b(b"chunk-%d" % i, digest_size=32).digest(), model_name=MODEL,
                      kv_rank=RANK, object_group_id=0, cache_salt="") for i in range(n)]


# ---------------------------------------------------------------------------- driving an adapter


def _wait(fds: list[int]) -> list[int]:
    ready, _, _ = select.select(fds, [], [], WAIT_S)
    if not ready:
        raise TimeoutError(f"no event fd of {fds} fired within {WAIT_S:.0f} s")
    for fd in ready:
        consume_fd(fd)
    return ready


def _clock() -> tuple[float, float]:
    t = os.times()
    return time.perf_counter(), t.user + t.system


def drive_store(adapter: Any, keys: list[ObjectKey], objs: list[Any], task_keys: int, inflight: int
                ) -> tuple[float, float, int]:
    """Store every object as the store controller does; (wall seconds, process CPU seconds, store tasks
    whose result reported success and every byte)."""
    chunks = [(s, min(s + task_keys, len(keys))) for s in range(0, len(keys), task_keys)]
    fd = adapter.get_store_event_fd()
    pending: dict[int, int] = {}
    nxt = ok = 0
    t0, c0 = _clock()
    while nxt < len(chunks) or pending:
        while nxt < len(chunks) and len(pending) < inflight:
            s, e = chunks[nxt]
            pending[adapter.submit_store_task(keys[s:e], objs[s:e])] = (e - s) * RECORD
            nxt += 1
        _wait([fd])
        for tid, res in adapter.pop_completed_store_tasks().items():
            want = pending.pop(tid)
            if not res.is_successful() or res.bytes_transferred() != want:
                raise RuntimeError(f"store task {tid}: success={res.is_successful()} "
                                   f"bytes={res.bytes_transferred()}, expected {want}")
            ok += 1
    t1, c1 = _clock()
    return t1 - t0, c1 - c0, ok


def drive_load(adapter: Any, keys: list[ObjectKey], objs: list[Any], task_keys: int, inflight: int
               ) -> tuple[float, float]:
    """Prefetch every key as the prefetch controller does (lookup-and-lock, load into the staging buffers,
    unlock); every bit must come back set. (wall seconds, process CPU seconds)."""
    chunks = [(s, min(s + task_keys, len(keys))) for s in range(0, len(keys), task_keys)]
    lfd, dfd = adapter.get_lookup_and_lock_event_fd(), adapter.get_load_event_fd()
    lookups: dict[int, int] = {}
    loads: dict[int, int] = {}
    nxt = 0
    t0, c0 = _clock()
    while nxt < len(chunks) or lookups or loads:
        while nxt < len(chunks) and len(lookups) + len(loads) < inflight:
            s, e = chunks[nxt]
            lookups[adapter.submit_lookup_and_lock_task(keys[s:e], {})] = nxt
            nxt += 1
        ready = _wait([lfd, dfd])
        if lfd in ready:
            for tid in list(lookups):
                bits = adapter.query_lookup_and_lock_result(tid)
                if bits is None:
                    continue
                s, e = chunks[lookups.pop(tid)]
                if len(bits) != e - s or bits.popcount() != e - s:
                    raise RuntimeError(f"lookup of keys {s}..{e - 1}: {bits.popcount()} of {e - s} found")
                loads[adapter.submit_load_task(keys[s:e], objs[s:e])] = s
        if dfd in ready:
            for tid in list(loads):
                bits = adapter.query_load_result(tid)
                if bits is None:
                    continue
                s = loads.pop(tid)
                e = min(s + task_keys, len(keys))
                adapter.submit_unlock(keys[s:e])
                if len(bits) != e - s or bits.popcount() != e - s:
                    raise RuntimeError(f"load of keys {s}..{e - 1}: {bits.popcount()} of {e - s} loaded")
    t1, c1 = _clock()
    return t1 - t0, c1 - c0


def fs_drop_page_cache(base: str) -> int:
    """posix_fadvise(DONTNEED) on every file of the fs adapter's directory (clean pages: Settle synced)."""
    n = 0
    with os.scandir(base) as it:
        for entry in it:
            if entry.is_file():
                fd = os.open(entry.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                n += 1
    return n


# ---------------------------------------------------------------------------- one repeat


class Adapters:
    """The adapter instances of one repeat: a store run starts on a fresh directory with a fresh adapter
    (closing the previous one), and the last one stays open for the loads."""

    def __init__(self, work: str, compaction: Any) -> None:
        self.work = work
        self.compaction = compaction
        self.open: dict[str, Any] = {}
        self.close_s: dict[str, list[float]] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def fresh(self, name: str) -> Any:
        self.close(name)
        shutil.rmtree(self.path(name), ignore_errors=True)
        if name == "fs":
            a: Any = FSL2Adapter(FSL2AdapterConfig.from_dict({"base_path": self.path(name)}))
        else:
            a = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict({
                "path": self.path(name), "durability": "sync" if name == "bs_sync" else "cache",
                "compaction": self.compaction}))
        self.open[name] = a
        return a

    def close(self, name: str) -> None:
        a = self.open.pop(name, None)
        if a is not None:
            t0 = time.perf_counter()
            a.close()  # blockstore in cache mode syncs the session's blocks here (untimed for the store)
            self.close_s.setdefault(name, []).append(time.perf_counter() - t0)

    def close_all(self) -> None:
        for name in list(self.open):
            self.close(name)


def one_repeat(root: str, src: Objects, dst: Objects, digests: list[int], keys: list[ObjectKey], rep: int,
               args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Seconds and process CPU seconds of every figure of one repeat, plus what was checked."""
    n = len(keys)
    work = tempfile.mkdtemp(prefix=f"rep{rep}-", dir=root)
    raw, raw_durable = os.path.join(work, "raw.bin"), os.path.join(work, "raw-durable.bin")
    sources = Sources(src.views)
    staging = dst.views[:RAW_BATCH]  # raw reads: 64 of the same staging buffers the adapters load into
    settle = Settle(work, sources, n, not args.no_recycle)
    ad = Adapters(work, args.compaction_param)
    seconds: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    checks: dict[str, Any] = {"verified_objects": 0, "verified_bytes": 0, "store_tasks_ok": 0, "load_passes": 0}

    def record(name: str, wall_cpu: tuple[float, float]) -> None:
        seconds.setdefault(name, []).append(wall_cpu[0])
        cpu.setdefault(name, []).append(wall_cpu[1])

    def timed_raw(fn: Callable[[], float]) -> tuple[float, float]:
        c0 = _clock()[1]
        secs = fn()
        return secs, _clock()[1] - c0

    def trio(raw_phase: Callable[[], None], bs_phase: Callable[[], None], fs_phase: Callable[[], None],
             writes: bool) -> None:
        for phase in (raw_phase, bs_phase, fs_phase, fs_phase, bs_phase, raw_phase):
            if writes:  # the previous run's data goes first (close, unlink: untimed), then settle
                getattr(phase, "prepare", lambda: None)()
            settle(writes)
            phase()

    def store(name: str, fig: str) -> Callable[[], None]:
        def phase() -> None:
            a = ad.fresh(name)
            wall, cpu_s, ok = drive_store(a, keys, src.objs, args.task_keys, args.inflight)
            record(fig, (wall, cpu_s))
            checks["store_tasks_ok"] += ok

        def prepare() -> None:
            ad.close(name)
            shutil.rmtree(ad.path(name), ignore_errors=True)

        phase.prepare = prepare  # type: ignore[attr-defined]
        return phase

    def load(name: str, fig: str, cold: bool) -> Callable[[], None]:
        def phase() -> None:
            a = ad.open[name]
            if not cold:
                drive_load(a, keys, dst.objs, args.task_keys, args.inflight)  # untimed: make sure all is cached
            elif name == "fs":
                fs_drop_page_cache(ad.path(name))
            else:
                a.store.drop_page_cache()
            dst.zero()  # a load that wrote nothing cannot pass the check below
            record(fig, drive_load(a, keys, dst.objs, args.task_keys, args.inflight))
            checks["verified_objects"] += dst.verify(digests)
            checks["verified_bytes"] += n * RECORD
            checks["load_passes"] += 1
        return phase

    def raw_write_phase() -> None:
        record("raw_write", timed_raw(lambda: raw_write(raw, sources, n, durable=False)))

    def unlink_raw() -> None:
        if os.path.exists(raw):
            os.unlink(raw)

    raw_write_phase.prepare = unlink_raw  # type: ignore[attr-defined]

    def raw_warm_phase() -> None:
        raw_read(raw, n, staging, cold=False, verify=False)  # untimed: make sure all is cached
        record("raw_read_warm", timed_raw(lambda: raw_read(raw, n, staging, cold=False, verify=False)))
        record("raw_read_warm_xxh3", timed_raw(lambda: raw_read(raw, n, staging, cold=False, verify=True)))

    def raw_cold_phase() -> None:
        record("raw_read_cold", timed_raw(lambda: raw_read(raw, n, staging, cold=True, verify=False)))
        blocks = os.path.join(ad.path("bs"), "blocks")  # block files in block-id (= write) order
        bs_files = sorted(os.path.join(blocks, f) for f in os.listdir(blocks))
        record("raw_read_cold_bs_files", timed_raw(lambda: read_files_cold(bs_files, staging)))
        fs_files = [os.path.join(ad.path("fs"), _object_key_to_filename(k)) for k in keys]  # in key order
        record("raw_read_cold_fs_files", timed_raw(lambda: read_files_cold(fs_files, staging)))

    try:
        trio(raw_write_phase, store("bs", "bs_store"), store("fs", "fs_store"), writes=True)
        trio(raw_warm_phase, load("bs", "bs_load_warm", False), load("fs", "fs_load_warm", False), writes=False)
        trio(raw_cold_phase, load("bs", "bs_load_cold", True), load("fs", "fs_load_cold", True), writes=False)
        ad.close_all()
        os.unlink(raw)
        shutil.rmtree(ad.path("bs"))
        shutil.rmtree(ad.path("fs"))
        if not args.no_sync:
            # the extra line: one run each, the order alternating between repeats
            def raw_durable_phase() -> None:
                record("raw_durable_write", timed_raw(
                    lambda: raw_write(raw_durable, sources, n, durable=True)))

            pair = [raw_durable_phase, store("bs_sync", "bs_store_sync")]
            for phase in pair if rep % 2 == 0 else pair[::-1]:
                settle(True)
                phase()  # fresh directories: nothing to prepare
            settle(False)
            load("bs_sync", "bs_sync_load_warm", False)()  # the sync store's records read back right
            ad.close_all()
    finally:
        ad.close_all()
        shutil.rmtree(work, ignore_errors=True)
    out = {k: statistics.fmean(v) for k, v in seconds.items()}
    out_cpu = {k: statistics.fmean(v) for k, v in cpu.items()}
    checks["close_s"] = {k: statistics.fmean(v) for k, v in ad.close_s.items()}
    return out, out_cpu, checks


# ---------------------------------------------------------------------------- statistics and report


def summarize(runs: list[dict[str, float]], cpus: list[dict[str, float]], n: int) -> dict[str, Any]:
    nbytes = n * RECORD
    figures: dict[str, Any] = {}
    for name in runs[0]:
        secs = [r[name] for r in runs]
        figures[name] = {
            "gb_per_s": spread([nbytes / s / 1e9 for s in secs]),
            "objects_per_s": spread([n / s for s in secs]),
            "seconds": spread(secs),
            "cpu_s_per_gib": spread([c[name] / (nbytes / 2**30) for c in cpus]),
        }
    ratios: dict[str, Any] = {}
    for k, (fig, ref, target) in RATIOS.items():
        r = spread([run[ref] / run[fig] for run in runs])
        r.update(target=target, met=r["median"] >= target)
        ratios[k] = r
    diagnostics = {k: spread([run[ref] / run[fig] for run in runs]) for k, (fig, ref) in DIAGNOSTICS.items()
                   if fig in runs[0] and ref in runs[0]}
    return {"figures": figures, "ratios": ratios, "diagnostics": diagnostics}


def table(summary: dict[str, Any]) -> str:
    w = 36
    lines = [f"{'figure':<{w}}{'median':>8}{'min':>8}{'max':>8}{'IQR':>8}{'obj/s':>8}{'cpu/GiB':>9}   (GB/s, CPU s)"]
    for name, f in summary["figures"].items():
        g = f["gb_per_s"]
        lines.append(f"{name:<{w}}{g['median']:>8.2f}{g['min']:>8.2f}{g['max']:>8.2f}{g['iqr']:>8.2f}"
                     f"{f['objects_per_s']['median']:>8.0f}{f['cpu_s_per_gib']['median']:>9.2f}")
    lines.append("")
    lines.append(f"{'ratio':<{w}}{'median':>8}{'min':>8}{'max':>8}{'IQR':>8}   target")
    for name, r in summary["ratios"].items():
        verdict = "met" if r["met"] else "NOT met"
        lines.append(f"{name:<{w}}{r['median']:>8.3f}{r['min']:>8.3f}{r['max']:>8.3f}{r['iqr']:>8.3f}"
                     f"   >= {r['target']} {verdict}")
    for name, r in summary["diagnostics"].items():
        lines.append(f"{name:<{w}}{r['median']:>8.3f}{r['min']:>8.3f}{r['max']:>8.3f}{r['iqr']:>8.3f}"
                     f"   (diagnostic)")
    return "\n".join(lines)


# (group label, raw ceiling, blockstore figure, fs figure or None) of the plot
GROUPS = [
    ("store", "raw_write", "bs_store", "fs_store"),
    ("warm load", "raw_read_warm", "bs_load_warm", "fs_load_warm"),
    ("cold load", "raw_read_cold", "bs_load_cold", "fs_load_cold"),
    ("durable store", "raw_durable_write", "bs_store_sync", None),
]
HEADLINE_FIGURES = ["raw_write", "bs_store", "fs_store", "raw_read_warm", "raw_read_warm_xxh3", "bs_load_warm",
                    "fs_load_warm", "raw_read_cold", "bs_load_cold", "fs_load_cold", "raw_durable_write",
                    "bs_store_sync"]


def plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """lmcache_peer[_quick]_vs_fs_and_ceiling.png: blockstore's adapter, LMCache's fs adapter and the raw
    ceilings (median GB/s, min-max bars), and the ratios against their targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import png_path

    figs = doc["figures"]
    groups = [g for g in GROUPS if g[1] in figs and g[2] in figs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    w = 0.27
    sides = (("raw-disk ceiling (same run)", 1, "#9e9e9e"), ("blockstore L2 adapter", 2, "#1f77b4"),
             ("LMCache fs L2 adapter", 3, "#ff7f0e"))
    for k, (label, col, color) in enumerate(sides):
        xs, med, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            name = g[col]
            if name is None or name not in figs:
                continue
            s = figs[name]["gb_per_s"]
            xs.append(i + (k - 1) * w)
            med.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        bars = ax.bar(xs, med, w, yerr=[lo, hi], capsize=3, color=color, label=label)
        ax.bar_label(bars, labels=[f"{m:.2f}" for m in med], fontsize=7, label_type="center", color="white")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("GB/s (median; bars: min-max over repeats)")
    ax.set_title("1 MiB LMCache KV objects, driven as lmcache server does")
    ax.legend(fontsize=8)
    ax.margins(y=0.1)
    ratios = doc["ratios"]
    keys = list(ratios)
    med = [ratios[k]["median"] for k in keys]
    err = [[m - ratios[k]["min"] for m, k in zip(med, keys)], [ratios[k]["max"] - m for m, k in zip(med, keys)]]
    bars = ax2.bar(range(len(keys)), med, 0.6, yerr=err, capsize=3,
                   color=["#2ca02c" if ratios[k].get("met") else "#d62728" for k in keys])
    ax2.bar_label(bars, labels=[f"{m:.2f}" for m in med], fontsize=7, label_type="center", color="white")
    ax2.scatter(range(len(keys)), [ratios[k].get("target") for k in keys], marker="_", s=400, color="black",
                zorder=3, label="target")
    ax2.set_xticks(range(len(keys)), [k.replace("_bs_vs_", "\nbs / ").replace("_", " ") for k in keys],
                   fontsize=7)
    ax2.set_yscale("log")
    ax2.minorticks_off()
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 3, 5, 8) if 0.5 * min(med + [1]) <= t <= 2 * max(med + [5])]
    ax2.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax2.set_ylabel("ratio of throughputs (median, min-max; log)")
    ax2.set_title("Ratios (green: target met)")
    ax2.legend(fontsize=8)
    cfg = doc.get("config", {})
    fig.suptitle(f"bench.lmcache_peer: {cfg.get('records')} objects x {cfg.get('repeats')} repeats", fontsize=9)
    path = png_path(doc, out_dir, "vs_fs_and_ceiling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def summary_markdown(doc: dict[str, Any]) -> str:
    """The target ratios, the headline figures, then the machine and the command."""
    from bench.report import fmt, machine_line, md_table, reproduce_line

    rows = []
    for k, r in doc["ratios"].items():
        fig, ref, _target = RATIOS.get(k, (None, None, None))
        rows.append([f"`{k}`" + (f" ({fig} / {ref})" if fig else ""), f"**{r['median']:.3f}**",
                     f"{r['min']:.3f} – {r['max']:.3f}", f"≥ {r['target']}: " + ("met" if r["met"] else "**not met**")])
    for k in ("store_sync_bs_vs_raw_durable_write", "warm_load_bs_vs_raw_read_xxh3"):
        r = doc.get("diagnostics", {}).get(k)
        if r:
            rows.append([f"`{k}`", f"{r['median']:.3f}", f"{r['min']:.3f} – {r['max']:.3f}", "(diagnostic)"])
    out = [md_table(["ratio", "median", "min – max", "target"], rows)]
    figs = doc["figures"]
    frows = []
    for name in [n for n in HEADLINE_FIGURES if n in figs]:
        f = figs[name]
        g = f["gb_per_s"]
        frows.append([f"`{name}`", fmt(g["median"]), f"{g['min']:.2f} – {g['max']:.2f}",
                      fmt(f["objects_per_s"]["median"], 0), fmt(f.get("cpu_s_per_gib", {}).get("median"))])
    out.append(md_table(["figure", "median GB/s", "min – max", "objects/s", "CPU s / GiB"], frows))
    cfg = doc.get("config", {})
    v = doc.get("verification", {})
    out.append(f"{cfg.get('records')} objects × 1 MiB, {cfg.get('repeats')} repeats, {cfg.get('task_keys')} keys per "
               f"task, {cfg.get('inflight')} in flight; lmcache {doc.get('code', {}).get('lmcache', '?')}; "
               f"{v.get('verified_objects', '?')} loaded objects verified, {v.get('mismatches', '?')} mismatches.")
    out.append(machine_line(doc))
    out.append(reproduce_line(doc))
    return "\n\n".join(out)


def other_pytest() -> list[str]:
    """Test runs going on beside this one (the machine is shared): recorded, and warned about."""
    me = os.getpid()
    out = run_quiet(["pgrep", "-af", "pytest"])
    return [ln for ln in out.splitlines() if ln and int(ln.split()[0]) not in (me, os.getppid())]


def busiest_processes(k: int = 4) -> list[str]:
    """The k processes using the most CPU (lifetime average), for the record: on 2 cores they move figures."""
    lines = run_quiet(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"]).splitlines()[1 : k + 1]
    return [ln.strip()[:160] for ln in lines]


def code_state() -> dict[str, Any]:
    """The engine and adapter measured: commit plus a digest of uncommitted changes if any."""
    paths = ["blockstore", "native", "compaction", "connector"]
    diff = run_quiet(["git", "diff", "HEAD", "--", *paths])
    return {
        "commit": run_quiet(["git", "rev-parse", "HEAD"]),
        "uncommitted": run_quiet(["git", "status", "--porcelain", "--", *paths]).splitlines(),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "lmcache": importlib.metadata.version("lmcache"),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.lmcache_peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "lmcache_peer", quick="256 objects, 3 repeats (explicit flags still win)",
                  full="2048 objects, 5 repeats", dir_default=DEFAULT_DIR, dir_help="(default bench/.scratch)")
    ap.add_argument("--records", type=int, help="number of 1 MiB objects (default 2048, --quick 256)")
    ap.add_argument("--repeats", type=int, help="repeats, each on a fresh directory (default 5, --quick 3)")
    ap.add_argument("--task-keys", type=int, default=TASK_KEYS, help=f"keys per task/request (default {TASK_KEYS})")
    ap.add_argument("--inflight", type=int, default=INFLIGHT, help=f"tasks/requests in flight (default {INFLIGHT})")
    ap.add_argument("--compaction", default="none",
                    help="blockstore adapter 'compaction' param: none (default) or a policy name such as full")
    ap.add_argument("--no-sync", action="store_true", help="leave out the durability='sync' extra line")
    ap.add_argument("--no-recycle", action="store_true", help="no ballast file before write phases")
    args = ap.parse_args(argv)
    args.records = args.records or (256 if args.quick else 2048)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.json = results_path(args, "lmcache_peer")
    if args.records < 1 or args.repeats < 1 or args.task_keys < 1 or args.inflight < 1:
        ap.error("--records, --repeats, --task-keys and --inflight must be positive")
    args.compaction_param = None if args.compaction == "none" else args.compaction
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    n = args.records
    need = 5 * n * RECORD  # raw + blockstore + fs + ballast at once, plus slack
    free = shutil.disk_usage(args.dir).free
    if free < need:
        sys.exit(f"{args.dir}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f} GiB")
    load = os.getloadavg()[0]
    beside = other_pytest()
    busy_at_start = busiest_processes()
    if load > 0.5 or beside:
        print(f"warning: load average {load:.2f}, {len(beside)} pytest process(es) running: figures will be noisy",
              file=sys.stderr)
    code = code_state()
    machine = machine_info(args.dir)
    busy0, own0 = cpu_busy_s()
    t0 = time.perf_counter()
    print(f"filling {n} x 1 MiB objects ...", file=sys.stderr)
    src, dst = Objects(n), Objects(n)
    digests = src.fill_random(seed=0)
    keys = keys_for(n)
    root = tempfile.mkdtemp(prefix="lmcache-peer-", dir=args.dir)
    runs: list[dict[str, float]] = []
    cpus: list[dict[str, float]] = []
    checks: list[dict[str, Any]] = []
    try:
        for rep in range(args.repeats):
            secs, cpu, chk = one_repeat(root, src, dst, digests, keys, rep, args)
            runs.append(secs)
            cpus.append(cpu)
            checks.append(chk)
            s = {k: f"{n * RECORD / v / 1e9:.2f}" for k, v in secs.items()}
            print(f"repeat {rep + 1}/{args.repeats} ({time.perf_counter() - t0:.0f} s): GB/s {s}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        src.release()
        dst.release()
    busy1, own1 = cpu_busy_s()
    summary = summarize(runs, cpus, n)
    verification = {
        "method": "xxh3_64 of every loaded object == xxh3_64 of the stored object, staging zeroed before each "
                  "timed load; every store result reports every object's bytes; every bitmap all ones",
        "verified_objects": sum(c["verified_objects"] for c in checks),
        "verified_bytes": sum(c["verified_bytes"] for c in checks),
        "load_passes": sum(c["load_passes"] for c in checks),
        "store_tasks_ok": sum(c["store_tasks_ok"] for c in checks),
        "mismatches": 0,  # any mismatch fails the run before this point
    }
    doc = {
        "benchmark": "lmcache_peer",
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "config": {
            "records": n, "record_bytes": RECORD, "repeats": args.repeats, "quick": args.quick,
            "object": {"shape": list(SHAPE), "dtype": str(DTYPE), "type": "lmcache TensorMemoryObj",
                       "allocator": "lmcache MixedMemoryAllocator (the server L1 allocator), page-aligned"},
            "task_keys": args.task_keys, "inflight": args.inflight, "raw_batch_records": RAW_BATCH,
            "blockstore_adapter": {"durability": "cache (bs_*), sync (bs_store_sync)",
                                   "compaction": args.compaction_param, "workers": 4, "block_size": "64 MiB"},
            "fs_adapter": {"base_path": "<scratch>/fs", "relative_tmp_dir": None, "read_ahead_size": None,
                           "use_odirect": False},
            "order": "raw, blockstore, fs, fs, blockstore, raw per group; each figure the mean of its two runs; "
                     "sync extra: one run each, order alternating per repeat",
            "recycle_memory": not args.no_recycle,
            "gb": "1e9 bytes of payload",
        },
        "machine": {**machine, "loadavg_at_start": load, "pytest_running_at_start": beside,
                    "pytest_running_at_end": other_pytest(), "busiest_processes_at_start": busy_at_start,
                    "busiest_processes_at_end": busiest_processes(), "loadavg_at_end": os.getloadavg()[0],
                    "cpu_s_not_this_process": round((busy1 - busy0) - (own1 - own0), 1)},
        "code": code,
        "wall_s": round(time.perf_counter() - t0, 1),
        **summary,
        "verification": verification,
        "close_s": [c["close_s"] for c in checks],
        "runs_seconds": runs,
        "runs_cpu_seconds": cpus,
    }
    write_json(args.json, doc)
    print(table(summary))
    print(f"(full results: {os.path.relpath(args.json)}; verified {verification['verified_objects']} loaded objects)")
    print(json.dumps({
        "benchmark": "lmcache_peer", "records": n, "repeats": args.repeats,
        "ratios": {k: round(v["median"], 3) for k, v in summary["ratios"].items()},
        "targets_met": {k: v["met"] for k, v in summary["ratios"].items()},
        "verified_objects": verification["verified_objects"],
    }))


if __name__ == "__main__":
    main()
