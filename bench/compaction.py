"""Compaction policies replayed on workload traces: blocks/request, space and write amplification,
cold retrieval latency (DESIGN.md §6), per (trace, policy).

Each trace of `bench/traces.py` (locomo, webarena, swe, lmcache, shared, sessions; heldout when named) is
replayed under each policy of `blockstore.compaction.POLICIES` on a fresh store (same engine, same block
size, cache durability). Writers pass the trace's partition to put_many only when the policy is partitioned (append-only
writes everything to one stream). Compaction runs deterministically: `Compactor.run_pass()` every
1/`--passes` of the trace's operations, plus one final pass, in the replaying thread.

    blocks/request   at every request, before its get_many: the distinct blocks that hold its live
                     records (`locate_many`). Mean and p95 over the requests of the trace's second half
                     only, so that compaction has had the first half to learn which records go together.
                     `floor` is the offline lower bound: the least blocks the request's bytes
                     could fit in (ceil(live bytes / usable block bytes)); no placement of the
                     same bytes gives fewer, so floor / append-only bounds the ratio from below.
    space / write    `store.stats()` after the final pass, a close (which seals the open blocks and
    amplification    flushes the directory's memtable and WAL to its SST files) and a reopen without
                     compaction: bytes of block files + directory / live logical bytes, and bytes
                     appended to block files / bytes users put.
    cold latency     for `--cold-samples` requests evenly spread over the second half: `os.sync()`
                     (dirty pages are not evicted), `store.drop_page_cache()`, then the request's
                     get_many, timed. p50/p95/p99 in ms. Only block files are evicted: the directory
                     (RocksDB) stays warm.

Full mode (`--full`) replays traces 4x bigger and writes PNG plots to bench/results/. Both modes also
measure foreground get latency while the background compactor thread works vs idle, with a timeline of
every request (see `foreground_latency`; quick: 100 requests under the full policy, full: 400 under full
and aggressive, `--fg-requests 0` turns it off). Every request's records are checked against what the
trace last wrote to them (an xxh3 of the expected bytes): a lost, stale or resurrected record fails the
run.

    python -m bench.compaction --quick                 # all 4 traces x 6 policies, per-trace block sizes
    python -m bench.compaction --full                  # 4x bigger, plus background latency and plots
    python -m bench.compaction --quick --traces locomo --policies append-only full

The last line of stdout is one JSON object:
{"traces": {TRACE: {POLICY: {"blocks_per_request", "space_amp", "write_amp", "p95_cold_ms"}}}}.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

import blockstore
from blockstore import hooks
from blockstore.compaction import POLICIES, attach, resolve
from blockstore.reader import choose_places
from blockstore.records import BLOCK_HEADER_SIZE

from .common import bench_mode, engine_state, machine_info, results_path, run_quiet, standard_args
from .traces import FAMILIES, GENERATORS, Delete, Put, Request, Trace, check, describe, generate

MiB = 1 << 20
KiB = 1 << 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, "bench", ".scratch")
MODES: dict[str, dict[str, Any]] = {
    "quick": {"scale": 1.0, "cold_samples": 50, "passes": 40, "fg_requests": 100, "fg_policies": ("full",),
              "repeats": 3},
    "full": {"scale": 4.0, "cold_samples": 200, "passes": 40, "fg_requests": 400,
             "fg_policies": ("full", "aggressive"), "repeats": 2},
}
# targets from issue 16: full vs append-only blocks/request per trace (the new families: 0.70), p95
# cold retrieval, LoCoMo amplification, and foreground p99 during background compaction vs idle
TARGET_BLOCKS_RATIO = {"locomo": 0.45, "webarena": 0.50, "swe": 0.65, "lmcache": 0.60, "shared": 0.70,
                       "sessions": 0.70}
TARGET_BLOCKS_OTHER = 0.70
TARGET_COLD_RATIO = 0.55
TARGET_LOCOMO_SPACE = 1.15
TARGET_LOCOMO_WRITE = 1.30
TARGET_FG_P99 = 1.5
QUIET_S = 0.5  # background run: the compactor counts as idle after this long without copying
BUSY_LIMIT_S = 10.0  # ... and the run stops after this long even if it never goes idle
TIMELINE_POINTS = 2000  # foreground timeline: at most this many requests kept per phase (the JSON stays small)
TIMELINE_SPANS = 300  # ... and at most this many compaction-active spans


# ---------------------------------------------------------------------------------------------- data


class Payloads:
    """Record contents: a slice of one seeded random pool, chosen by (namespace, key, version). Only
    sizes matter to placement; distinct versions still get distinct bytes, so a stale read shows."""

    def __init__(self, seed: int, max_size: int) -> None:
        self.pool = memoryview(random.Random(f"payloads-{seed}").randbytes(max_size + MiB))
        self.span = MiB

    def view(self, ns: str, key: bytes, version: int, size: int) -> memoryview:
        off = xxhash.xxh3_64_intdigest(b"%s\0%s\0%d" % (ns.encode(), key, version)) % self.span
        return self.pool[off : off + size]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def finite(x: Any) -> Any:
    """NaN (a figure with no samples, e.g. --cold-samples 0) as None: strict JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def evenly(items: Sequence[int], n: int) -> list[int]:
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    return [items[round(j * (len(items) - 1) / (n - 1))] for j in range(n)] if n > 1 else [items[len(items) // 2]]


# -------------------------------------------------------------------------------------------- replay


class Verifier:
    """What each key should hold now: (version, size, xxh3 of the expected bytes)."""

    def __init__(self, payloads: Payloads) -> None:
        self.payloads = payloads
        self.cur: dict[tuple[str, bytes], tuple[int, int, int]] = {}

    def items(self, op: Put) -> list[tuple[bytes, memoryview]]:
        out = []
        for k, n in zip(op.keys, op.sizes):
            version = self.cur.get((op.ns, k), (0, 0, 0))[0] + 1
            v = self.payloads.view(op.ns, k, version, n)
            self.cur[(op.ns, k)] = (version, n, xxhash.xxh3_64_intdigest(v))
            out.append((k, v))
        return out

    def delete(self, op: Delete) -> None:
        for k in op.keys:
            self.cur.pop((op.ns, k), None)

    def check(self, op: Request, views: list[Any], where: str) -> None:
        for k, v in zip(op.keys, views):
            want = self.cur.get((op.ns, k))
            if want is None or v is None or len(v) != want[1] or xxhash.xxh3_64_intdigest(v) != want[2]:
                raise RuntimeError(f"{where}: key {k!r} read back wrong (expected version {want and want[0]}, "
                                   f"got {None if v is None else len(v)} bytes)")


def policy_spec(text: str) -> dict[str, Any]:
    """"NAME" or "NAME:KNOB=VALUE,KNOB=VALUE" (e.g. "full:relocation_budget=inf,min_hits=1") as the dict
    `resolve` takes; values are parsed as JSON numbers/booleans where they can be ("inf" too), else kept as words."""
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"policy": name}
    for item in filter(None, rest.split(",")):
        knob, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"policy knob {item!r} needs the form KNOB=VALUE")
        low = raw.strip().lower()
        if low == "inf":
            spec[knob.strip()] = math.inf
        elif low in ("true", "false"):
            spec[knob.strip()] = low == "true"
        else:
            try:
                spec[knob.strip()] = json.loads(low)
            except ValueError:  # a word: the knob's str value (copy_to=stream), judged by resolve() naming the knob
                spec[knob.strip()] = raw.strip()
    return spec


def replay(trace: Trace, policy_name: str, *, block_size: int, root: str, payloads: Payloads, passes: int,
           cold_samples: int, keep: bool = False, max_open_blocks: int | None = None) -> dict[str, Any]:
    """Replay `trace` on a fresh store under `policy_name` (a spec `policy_spec` reads); the figures of
    one (trace, policy) cell. `passes=0` runs no compaction at all (the compactor only learns); `keep`
    leaves the closed store on disk and returns its path as "path"; `max_open_blocks`: the store's
    option (None: its default)."""
    opts = open_options(max_open_blocks)
    policy = resolve(policy_spec(policy_name))
    path = tempfile.mkdtemp(prefix=f"{trace.name}-{policy.name}-", dir=root)
    ops = trace.ops
    half = len(ops) // 2
    every = max(1, len(ops) // passes) if passes > 0 else 0
    measured = [i for i, o in enumerate(ops) if isinstance(o, Request) and i >= half]
    cold_at = set(evenly(measured, cold_samples))
    usable = block_size - BLOCK_HEADER_SIZE - 8192  # what relocation's placement counts as one block's room
    verify = Verifier(payloads)
    blocks_all: list[tuple[int, int]] = []  # (op index, blocks) of every request, for the plots
    blocks: list[int] = []
    floor: list[int] = []
    cold_ms: list[float] = []
    floor_ms: list[float] = []  # the same requests' bytes read cold from one extent of one block (ColdFloor)
    cold_floor = ColdFloor(root) if cold_at else None
    floor_s = 0.0
    pass_s = 0.0
    t_start = time.perf_counter()
    store = blockstore.open(path, block_size=block_size, durability="cache", **opts)
    fill = SealFill(store, block_size)
    try:
        comp = attach(store, policy, background=False)
        for i, op in enumerate(ops):
            if every and i and i % every == 0:
                fill.note()  # before GC can reclaim a block sealed since the last pass
                t0 = time.perf_counter()
                comp.run_pass()
                pass_s += time.perf_counter() - t0
            if isinstance(op, Put):
                store.put_many(verify.items(op), ns=op.ns, partition=op.partition if policy.partitioned else None)
            elif isinstance(op, Delete):
                if not all(store.delete_many(op.keys, ns=op.ns)):
                    raise RuntimeError(f"{trace.name}/{policy.name} op {i}: a delete found no record")
                verify.delete(op)
            else:
                locs = store.locate_many(op.keys, ns=op.ns)
                # where a read finds each record: a record with copies counts in the block the read takes
                live = [loc for loc in choose_places(locs) if loc is not None]  # a missing key fails verify.check
                nb = len({loc.block_id for loc in live})
                blocks_all.append((i, nb))
                if i >= half:
                    blocks.append(nb)
                    floor.append(max(1, -(-sum(loc.record_len for loc in live) // usable)))
                if i in cold_at:
                    os.sync()
                    store.drop_page_cache()
                    t0 = time.perf_counter()
                    views = store.get_many(op.keys, ns=op.ns)
                    cold_ms.append((time.perf_counter() - t0) * 1e3)
                    if cold_floor is not None:
                        t0 = time.perf_counter()
                        floor_ms.append(cold_floor.measure(views))
                        floor_s += time.perf_counter() - t0  # its writes, syncs and reads: not the replay's time
                else:
                    views = store.get_many(op.keys, ns=op.ns)
                verify.check(op, views, f"{trace.name}/{policy.name} op {i}")
        if every:
            t0 = time.perf_counter()
            comp.run_pass()
            pass_s += time.perf_counter() - t0
        totals = comp.totals.as_dict()
        status = comp.status()
        fill.note()  # blocks sealed by the close (the open ones, whatever their size) are not counted
    finally:
        store.close()  # stops the compactor (persisting what it learned), seals, flushes the directory
        if cold_floor is not None:
            t0 = time.perf_counter()
            cold_floor.close()
            floor_s += time.perf_counter() - t0
    replay_s = time.perf_counter() - t_start - floor_s
    with blockstore.open(path, block_size=block_size, **opts) as store:
        stats = store.stats()
        copies = placed_copies(store, {o.ns for o in ops})
    logical = stats.live_logical_bytes or 1
    put = stats.bytes_put or 1
    moved = totals["relocated_bytes"] + totals["gc_bytes"]
    out: dict[str, Any] = {
        "policy": policy_name,
        "blocks_per_request": statistics.fmean(blocks) if blocks else float("nan"),
        "blocks_per_request_p95": pct(blocks, 95),
        "blocks_floor": statistics.fmean(floor) if floor else float("nan"),
        "requests_measured": len(blocks),
        "sealed_fill": fill.mean(),  # mean data_end / block size of the blocks sealed during the replay
        "sealed_blocks": len(fill.fills),
        "copies_per_key": copies,  # extra placed copies of shared records / live keys (in space_amp too)
        "space_amp": stats.space_amplification,
        "write_amp": stats.write_amplification,
        "cold_ms": {"p50": pct(cold_ms, 50), "p95": pct(cold_ms, 95), "p99": pct(cold_ms, 99), "n": len(cold_ms),
                    "values": [round(v, 3) for v in cold_ms],
                    # the measured floor: the same requests' bytes in one extent of one block (ColdFloor)
                    "floor_p50": pct(floor_ms, 50), "floor_p95": pct(floor_ms, 95),
                    "floor_values": [round(v, 3) for v in floor_ms]},
        # space_amp = 1 + these (as fractions of live logical bytes)
        "space_breakdown": {
            "record_layout": round((stats.live_bytes - stats.live_logical_bytes) / logical, 4),  # headers, padding
            "dead_records": round((stats.written_bytes - stats.live_bytes) / logical, 4),  # incl. tombstones
            "block_headers_footers": round((stats.block_file_bytes - stats.written_bytes) / logical, 4),
            "directory": round(stats.directory_bytes / logical, 4),
        },
        # write_amp = 1 + these (as fractions of bytes put)
        "write_breakdown": {
            "user_layout": round((stats.bytes_appended - moved - stats.bytes_put) / put, 4),  # headers, tombstones
            "relocation": round(totals["relocated_bytes"] / put, 4),
            "gc": round(totals["gc_bytes"] / put, 4),
        },
        "stats": stats.as_dict(),
        "compaction": {"passes": status["passes"], "pass_s": round(pass_s, 3),
                       **{k: v for k, v in totals.items() if not k.startswith("planned") and k != "dry_run"}},
        "replay_s": round(replay_s, 2),
        "blocks_over_time": windows(blocks_all, len(ops)),
    }
    if keep:
        out["path"] = path
    else:
        shutil.rmtree(path, ignore_errors=True)
    return out


def placed_copies(store: blockstore.Store, namespaces: set[str]) -> float:
    """Extra placed copies (a record's copies beyond its first place, for records read by several
    clusters) per live key; they are live bytes, so space amplification counts them too."""
    keys = extra = 0
    for ns in sorted(namespaces):
        for _k, loc in store.iter_locations(ns=ns):
            keys += 1
            extra += len(loc.copies)
    return extra / keys if keys else 0.0


FLOOR_BLOCK = 64 * MiB  # the floor store's block: the largest request of any trace (~12 MB) fits one


class ColdFloor:
    """The measured floor of a cold read (issue 16: where a target is out of reach, show the measured
    floor): each sampled request's payloads, as the replayed store just returned them (verified), are
    written together (one group, one partition: one extent of one block) into a store of their own, and
    read back cold the same way (os.sync, drop_page_cache, get_many, verified). No placement of the same
    bytes touches less; what it costs is the disk's time for those bytes plus the per-request cost of
    the read path. Its directory is small and warm, as the replayed store's is (only block files are
    evicted), so the floor is if anything optimistic."""

    def __init__(self, root: str) -> None:
        self.path = tempfile.mkdtemp(prefix="floor-", dir=root)
        self.store = blockstore.open(self.path, block_size=FLOOR_BLOCK, durability="cache")
        self.n = 0

    def measure(self, views: Sequence[Any]) -> float:
        """Milliseconds of a cold get_many of these payloads from one extent (None entries: misses, skipped)."""
        values = [bytes(v) for v in views if v is not None]
        keys = [b"%d/%d" % (self.n, i) for i in range(len(values))]
        self.n += 1
        self.store.put_many(list(zip(keys, values)), partition="floor")
        os.sync()
        self.store.drop_page_cache()
        t0 = time.perf_counter()
        got = self.store.get_many(keys)
        ms = (time.perf_counter() - t0) * 1e3
        if [bytes(v) if v is not None else None for v in got] != values:
            raise RuntimeError("cold floor: the one-extent copy did not read back what was written")
        return ms

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.path, ignore_errors=True)


class SealFill:
    """How full blocks are when sealed (issue 16's placement target: >= 90 % on average). Seals are
    noted by a seal observer; their blocks' data_end is read from the block table at `note()`."""

    def __init__(self, store: blockstore.Store, block_size: int) -> None:
        self.store = store
        self.block_size = block_size
        self.sealed: list[int] = []
        self.fills: dict[int, float] = {}
        store.add_seal_observer(self.sealed.append)

    def note(self) -> None:
        if self.sealed:
            want = set(self.sealed)
            self.sealed.clear()
            for e in self.store.block_table():
                if e.block_id in want:
                    self.fills[e.block_id] = e.data_end / self.block_size

    def mean(self) -> float:
        return statistics.fmean(self.fills.values()) if self.fills else float("nan")


def windows(points: list[tuple[int, int]], n_ops: int, n: int = 20) -> list[tuple[float, float]]:
    """Mean blocks/request in `n` consecutive windows of requests: (trace progress, mean)."""
    out = []
    for w in range(n):
        part = points[w * len(points) // n : (w + 1) * len(points) // n]
        if part:
            mid = part[len(part) // 2][0]
            out.append((round(mid / n_ops, 4), round(statistics.fmean(b for _i, b in part), 3)))
    return out


# ------------------------------------------------------------------------ foreground vs background work


def open_options(max_open_blocks: int | None) -> dict[str, Any]:
    """The store options a replay opens with beyond the block size: only what the command line set, so
    a run without them measures the engine's defaults."""
    return {} if max_open_blocks is None else {"max_open_blocks": max_open_blocks}


def _warm(path: str) -> None:
    """Read every block file once, so foreground timings compare CPU and lock contention, not disk."""
    blocks = os.path.join(path, "blocks")
    for name in sorted(os.listdir(blocks)):
        with open(os.path.join(blocks, name), "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


def foreground_latency(trace: Trace, *, block_size: int, root: str, payloads: Payloads, n_requests: int,
                       policies: Sequence[str] = ("full", "aggressive"),
                       max_open_blocks: int | None = None) -> dict[str, Any]:
    """Foreground get_many latency while the background compactor works vs with no compactor.

    The trace is replayed under the full policy with no compaction pass (the compactor only learns,
    and persists its co-access groups at close), which leaves a backlog of scattered groups and dead
    blocks. Copies of that store are then opened (block files read once first: warm) and `n_requests`
    of the trace's second-half requests are timed one by one:
      idle   opened without compaction, before and after the busy phases (pooled: the load drifts);
      busy   opened with compaction={"policy": P, "interval_s": 0.01}: its thread starts working at
             once. Requests are repeated until the compactor has been quiet for QUIET_S (or for at
             most BUSY_LIMIT_S: reads keep feeding it); a request counts as "during compaction" if it
             overlaps a span of the compactor's scan/copy/re-point/reclaim hooks.
    Each phase also keeps a timeline (`_timeline`): every request's start time since the phase began,
    its latency and whether it overlapped compaction work, plus the compaction-active spans, bounded to
    TIMELINE_POINTS requests and TIMELINE_SPANS spans.
    """
    opts = open_options(max_open_blocks)
    base = replay(trace, "full", block_size=block_size, root=root, payloads=payloads, passes=0, cold_samples=0,
                  keep=True, max_open_blocks=max_open_blocks)["path"]
    half = len(trace.ops) // 2
    picked = evenly([i for i, o in enumerate(trace.ops) if isinstance(o, Request) and i >= half], n_requests)
    reqs = [op for op in (trace.ops[i] for i in picked) if isinstance(op, Request)]
    out: dict[str, Any] = {}
    try:
        lat, idle_timed, t_idle = _idle_phase(base, block_size, reqs, opts)
        out["idle"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "n": len(lat),
                       "timeline": _timeline(idle_timed, [False] * len(idle_timed), [], t_idle)}
        for pol in policies:
            busy_path = f"{base}-{pol}"
            shutil.copytree(base, busy_path)
            _warm(busy_path)
            events = _Events()
            timed: list[tuple[float, float]] = []
            names = ("compact.scan", "compact.copy", "compact.repoint", "compact.reclaim")
            for name in names:
                hooks.register(name, events.mark)
            try:
                with blockstore.open(busy_path, block_size=block_size,
                                     compaction={"policy": pol, "interval_s": 0.01}, **opts) as s:
                    t_open = time.perf_counter()
                    went_idle = read_until_quiet(s, reqs, events.last_or_none, timed)
                    status = s.compactor.status()
            finally:
                for name in names:
                    hooks.unregister(name, events.mark)
            shutil.rmtree(busy_path, ignore_errors=True)
            spans = _spans(events.times, gap=0.05)
            active = _overlaps(timed, spans)
            during = [(t1 - t0) * 1e3 for (t0, t1), on in zip(timed, active) if on]
            after = [(t1 - t0) * 1e3 for (t0, t1), on in zip(timed, active) if not on]
            out[pol] = {
                "during": {"p50_ms": pct(during, 50), "p99_ms": pct(during, 99), "n": len(during)},
                "after": {"p50_ms": pct(after, 50), "p99_ms": pct(after, 99), "n": len(after)},
                "compaction_busy_s": round(sum(b - a for a, b in spans), 3),
                "went_idle": went_idle,  # False: still copying after BUSY_LIMIT_S (reads keep re-arming it)
                "moved_bytes": status["gc_bytes_total"] + status["relocated_bytes_total"],
                "passes": status["passes"],
                "timeline": _timeline(timed, active, spans, t_open),
            }
        # idle again after the busy phases, pooled with the first: the machine's load drifts (other
        # processes), and one idle phase before them all made the ratio follow that drift
        after, _timed, _t = _idle_phase(base, block_size, reqs, opts)
        out["idle"].update(p99_before_ms=out["idle"]["p99_ms"], p99_after_ms=pct(after, 99))
        lat += after
        out["idle"].update(p50_ms=pct(lat, 50), p99_ms=pct(lat, 99), n=len(lat))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def _idle_phase(base: str, block_size: int, reqs: list[Request],
                opts: dict[str, Any]) -> tuple[list[float], list[tuple[float, float]], float]:
    """The requests timed one by one on a warm copy of `base` opened without compaction: latencies (ms),
    (start, end) times, and when the phase began."""
    idle_path = base + "-idle"
    shutil.copytree(base, idle_path)
    _warm(idle_path)
    lat: list[float] = []
    timed: list[tuple[float, float]] = []
    with blockstore.open(idle_path, block_size=block_size, **opts) as s:
        t_idle = time.perf_counter()
        for op in reqs:
            t0 = time.perf_counter()
            s.get_many(op.keys, ns=op.ns)
            t1 = time.perf_counter()
            timed.append((t0, t1))
            lat.append((t1 - t0) * 1e3)
    shutil.rmtree(idle_path, ignore_errors=True)
    return lat, timed, t_idle


def _dumps(x: Any, indent: int = 0) -> str:
    """JSON like json.dumps(indent=2), but a list of plain numbers/booleans stays on one line: the timelines
    and per-sample values would otherwise take a line per number (5-10x the bytes)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(x, dict) and x:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 2)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(x, (list, tuple)) and x:
        if all(v is None or isinstance(v, (int, float, bool)) for v in x):
            return json.dumps(list(x), separators=(",", ":"))
        return "[\n" + ",\n".join(f"{inner}{_dumps(v, indent + 2)}" for v in x) + f"\n{pad}]"
    return json.dumps(x)


def write_json_compact(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"  # never leave a half-written results file behind
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_dumps(doc) + "\n")
    os.replace(tmp, path)


class _Events:
    """Times of the compactor's hook calls (fired on its thread)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()

    def mark(self, *_args: object) -> None:
        with self._lock:
            self.times.append(time.perf_counter())

    def last_or_none(self) -> float | None:
        with self._lock:
            return self.times[-1] if self.times else None


def read_until_quiet(s: Any, reqs: Sequence[Request], last_event: Callable[[], float | None],
                     timed: list[tuple[float, float]]) -> bool:
    """Read `reqs` round and round (each read's start and end appended to `timed`) until every request
    was read once and the compactor, whose last hook event `last_event` gives, has been quiet QUIET_S,
    or for BUSY_LIMIT_S; whether it went quiet. Quiet counts only once it has worked: a compactor that
    yields its CPU may start late."""
    t_open = time.perf_counter()
    j, t1, last = 0, t_open, None
    while True:
        op = reqs[j % len(reqs)]
        j += 1
        t0 = time.perf_counter()
        s.get_many(op.keys, ns=op.ns)
        t1 = time.perf_counter()
        timed.append((t0, t1))
        last = last_event()
        if (j >= len(reqs) and last is not None and t1 - last > QUIET_S) or t1 - t_open > BUSY_LIMIT_S:
            break
    return last is not None and t1 - last > QUIET_S


def _overlaps(timed: list[tuple[float, float]], spans: list[tuple[float, float]]) -> list[bool]:
    """For each (t0, t1): whether it overlaps one of the sorted, disjoint `spans`."""
    ends = [b for _a, b in spans]
    out = []
    for t0, t1 in timed:
        k = bisect.bisect_left(ends, t0)  # the first span that does not end before t0
        out.append(k < len(spans) and spans[k][0] <= t1)
    return out


def _timeline(timed: list[tuple[float, float]], active: list[bool], spans: list[tuple[float, float]],
              t_ref: float) -> dict[str, Any]:
    """The phase's requests as columns (start s since t_ref, latency ms, overlapped compaction work) and the
    compaction-active spans (s since t_ref). Above TIMELINE_POINTS requests, evenly spaced ones are kept plus
    the slowest tenth of the budget (so the spikes stay); above TIMELINE_SPANS spans, neighbours are merged."""
    n = len(timed)
    keep: list[int] = list(range(n))
    if n > TIMELINE_POINTS:
        slow = TIMELINE_POINTS // 10
        top = sorted(range(n), key=lambda i: timed[i][1] - timed[i][0])[-slow:]
        keep = sorted(set(evenly(range(n), TIMELINE_POINTS - slow)) | set(top))
    merged = list(spans)
    gap = 0.1
    while len(merged) > TIMELINE_SPANS:  # join spans less than `gap` apart, doubling it until few enough
        joined: list[tuple[float, float]] = []
        for a, b in merged:
            if joined and a - joined[-1][1] <= gap:
                joined[-1] = (joined[-1][0], max(joined[-1][1], b))
            else:
                joined.append((a, b))
        merged, gap = joined, gap * 2
    return {
        "t_s": [round(timed[i][0] - t_ref, 4) for i in keep],
        "latency_ms": [round((timed[i][1] - timed[i][0]) * 1e3, 3) for i in keep],
        "compacting": [bool(active[i]) for i in keep],
        "n": n,
        "kept": len(keep),
        "phase_s": round(timed[-1][1] - t_ref, 3) if timed else 0.0,
        "spans_s": [[round(a - t_ref, 4), round(b - t_ref, 4)] for a, b in merged],
    }


def _spans(ts: list[float], gap: float) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    for t in sorted(ts):
        if spans and t - spans[-1][1] <= gap:
            spans[-1] = (spans[-1][0], t)
        else:
            spans.append((t, t))
    return spans


# ---------------------------------------------------------------------------------------------- report


def table(trace: Trace, cells: dict[str, dict[str, Any]], block_size: int) -> str:
    s = trace.summary()
    n = next(iter(cells.values()))["requests_measured"] if cells else 0
    w = max([14] + [len(p) + 2 for p in cells])  # policy column: labels may carry knob overrides
    lines = [f"{trace.name}: {s['ops']} ops, {s['bytes_put'] / 1e6:.1f} MB put, {s['requests']} requests "
             f"({s['keys_per_request']} keys each; blocks/request over the last {n}), "
             f"{block_size // KiB} KiB blocks",
             f"  {'policy':<{w}}{'blk/req':>8}{'p95':>6}{'floor':>7}{'fill':>6}{'copies':>7}{'space':>7}{'write':>7}"
             f"{'cold p50':>10}{'p95':>7}{'p99':>7}{'reloc MB':>10}{'gc MB':>7}{'freed':>6}{'pass s':>8}{'total s':>8}"]
    for pol, c in cells.items():
        k, cm = c["compaction"], c["cold_ms"]
        lines.append(f"  {pol:<{w}}{c['blocks_per_request']:>8.2f}{c['blocks_per_request_p95']:>6.1f}"
                     f"{c['blocks_floor']:>7.2f}{c['sealed_fill']:>6.2f}{c['copies_per_key']:>7.3f}{c['space_amp']:>7.3f}"
                     f"{c['write_amp']:>7.3f}"
                     f"{cm['p50']:>10.2f}{cm['p95']:>7.2f}{cm['p99']:>7.2f}{k['relocated_bytes'] / 1e6:>10.2f}"
                     f"{k['gc_bytes'] / 1e6:>7.2f}{k['reclaimed_blocks']:>6}{k['pass_s']:>8.2f}{c['replay_s']:>8.2f}")
    lines.append(f"  {'bytes go to':<{w}}{'space = 1 + layout':>19}{'dead':>8}{'blocks':>8}{'dir':>7}"
                 f"{'write = 1 + layout':>21}{'reloc':>8}{'gc':>8}")
    for pol, c in cells.items():
        sb, wb = c["space_breakdown"], c["write_breakdown"]
        lines.append(f"  {pol:<{w}}{sb['record_layout']:>19.3f}{sb['dead_records']:>8.3f}"
                     f"{sb['block_headers_footers']:>8.3f}{sb['directory']:>7.3f}{wb['user_layout']:>21.3f}"
                     f"{wb['relocation']:>8.3f}{wb['gc']:>8.3f}")
    return "\n".join(lines)


def _targets_text() -> str:
    return ", ".join(f"{t} {v}" for t, v in TARGET_BLOCKS_RATIO.items()) + f" (others {TARGET_BLOCKS_OTHER})"


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median and range over the repeats (NaN-free values only)."""
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": round(statistics.median(vals), 3), "min": round(min(vals), 3), "max": round(max(vals), 3),
            "n": len(vals), "values": [round(v, 3) for v in vals]}


def _range(sp: dict[str, Any]) -> str:
    return f"{sp['median']:.2f} [{sp['min']:.2f}-{sp['max']:.2f}]" if sp["n"] > 1 else f"{sp['median']:.2f}"


def fg_ratio(fg: dict[str, Any], pol: str) -> float:
    """Foreground get p99 during background compaction / idle p99 (one trace, one repeat)."""
    idle, busy = (fg.get("idle") or {}).get("p99_ms"), (fg.get(pol) or {}).get("during", {}).get("p99_ms")
    if not idle or busy is None or math.isnan(busy):
        return float("nan")
    return float(busy / idle)


def targets(runs: list[dict[str, dict[str, dict[str, Any]]]],
            fgs: list[dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """The issue's targets judged on the median over the repeats (each repeat: its own seed, its own
    append-only baseline); the range is [min-max]."""
    lines = [f"targets: full/append-only blocks/request <= {_targets_text()} (floor: the offline lower "
             f"bound / append-only), p95 cold <= {TARGET_COLD_RATIO}; locomo full space amp <= "
             f"{TARGET_LOCOMO_SPACE} and write amp <= {TARGET_LOCOMO_WRITE}; get p99 during background "
             f"compaction / idle <= {TARGET_FG_P99}; median [min-max] over {len(runs)} repeat(s)"]
    doc: dict[str, Any] = {}
    for tr, cells in runs[0].items():
        if "full" not in cells or "append-only" not in cells:
            continue
        pairs = [(r[tr]["full"], r[tr]["append-only"]) for r in runs]
        br = spread([f["blocks_per_request"] / b["blocks_per_request"] for f, b in pairs])
        floor = spread([f["blocks_floor"] / b["blocks_per_request"] for f, b in pairs])
        cr = spread([f["cold_ms"]["p95"] / b["cold_ms"]["p95"] for f, b in pairs])
        # the measured floor: the full cell's requests read cold from one extent each, / append-only's p95
        cf = spread([f["cold_ms"].get("floor_p95", float("nan")) / b["cold_ms"]["p95"] for f, b in pairs])
        fill = spread([f["sealed_fill"] for f, _b in pairs])
        target = TARGET_BLOCKS_RATIO.get(tr, TARGET_BLOCKS_OTHER)
        d = {"blocks_ratio": br["median"], "blocks_ratio_spread": br, "blocks_target": target,
             "blocks_met": br["median"] <= target, "never_worse": br["max"] <= 1.0,
             "blocks_floor_ratio": floor["median"], "sealed_fill": fill,
             "cold_p95_ratio": cr["median"], "cold_p95_ratio_spread": cr, "cold_floor_ratio": cf,
             "cold_met": cr["median"] <= TARGET_COLD_RATIO}
        line = (f"  {tr:<10} blocks/request {_range(br)} (target {target}, floor {floor['median']:.2f}) "
                f"{'met' if d['blocks_met'] else 'MISSED'}; fill at seal {_range(fill)}; "
                f"p95 cold {_range(cr)} (floor {_range(cf)}) {'met' if d['cold_met'] else 'MISSED'}")
        if tr == "locomo":
            sp = spread([f["space_amp"] for f, _b in pairs])
            wr = spread([f["write_amp"] for f, _b in pairs])
            d.update(space_amp=sp["median"], write_amp=wr["median"],
                     amp_met=sp["median"] <= TARGET_LOCOMO_SPACE and wr["median"] <= TARGET_LOCOMO_WRITE)
            line += f"; space {_range(sp)} write {_range(wr)} {'met' if d['amp_met'] else 'MISSED'}"
        for pol in ("full", "aggressive"):
            ratios = [fg_ratio(f[tr], pol) for f in fgs or [] if tr in f and pol in f[tr]]
            if ratios:
                fr = spread(ratios)
                d[f"fg_p99_ratio_{pol}"] = fr
                line += f"; fg p99 {pol} {_range(fr)} {'met' if fr['median'] <= TARGET_FG_P99 else 'MISSED'}"
        doc[tr] = d
        lines.append(line)
    return "\n".join(lines), doc


def plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """PNGs from the results document: blocks/request and amplification per (trace, policy), blocks/request
    over each trace, and (when the document has foreground timelines) latency over time during compaction.
    Files compaction[_quick]_*.png in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import png_path

    results: dict[str, dict[str, dict[str, Any]]] = {
        t: {p: {k: (math.nan if v is None else v) for k, v in c.items()} for p, c in cells.items()}
        for t, cells in doc["results"].items()}  # JSON null (no samples) as NaN: a gap in the plot
    traces = list(results)
    policies = list(next(iter(results.values())))
    width = 0.8 / len(policies)
    files = []

    def bars(ax: Any, metric: str, label: str, p95: str | None = None) -> None:
        for j, pol in enumerate(policies):
            xs = [i + (j - (len(policies) - 1) / 2) * width for i in range(len(traces))]
            ys = [results[t][pol][metric] for t in traces]
            drawn = ax.bar(xs, ys, width, label=pol)
            ax.bar_label(drawn, fmt="%.2f", fontsize=6, rotation=90, padding=2)
            if p95:
                ax.scatter(xs, [results[t][pol][p95] for t in traces], marker="_", color="black", s=60, zorder=3)
        ax.set_xticks(range(len(traces)), traces)
        ax.set_ylabel(label)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars(ax, "blocks_per_request", "blocks / request (bar: mean, tick: p95)", "blocks_per_request_p95")
    ax.set_title("Blocks touched per request, second half of each trace")
    ax.legend(fontsize=8, ncol=3)
    files.append(png_path(doc, out_dir, "blocks_per_request"))
    fig.tight_layout()
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    bars(axes[0], "space_amp", "space amplification")
    bars(axes[1], "write_amp", "write amplification (log scale)")
    axes[1].set_yscale("log")
    axes[0].set_title("Space amplification at the end (after close and reopen)")
    axes[1].set_title("Write amplification (bytes appended / bytes put)")
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylim(bottom=0.9)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8, ncol=2)
    files.append(png_path(doc, out_dir, "amplification"))
    fig.tight_layout()
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 4), squeeze=False)
    for ax, t in zip(axes[0], traces):
        for pol in policies:
            pts = results[t][pol]["blocks_over_time"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=pol, marker=".")
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(t)
        ax.set_xlabel("trace progress (fraction of ops)")
    axes[0][0].set_ylabel("blocks / request (window mean)")
    axes[0][0].legend(fontsize=7)
    files.append(png_path(doc, out_dir, "blocks_over_time"))
    fig.tight_layout()
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    timeline = latency_timeline_plot(doc, out_dir)
    return files + ([timeline] if timeline else [])


def latency_timeline_plot(doc: dict[str, Any], out_dir: str) -> str | None:
    """compaction[_quick]_latency_timeline.png: foreground get_many latency over time with the background
    compactor working (one row per policy, one column per trace), compaction-active spans shaded, and the
    same requests' idle p50/p99 (no compactor) as reference lines. None if the document has no timelines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from bench.report import png_path

    fg = {t: r for t, r in (doc.get("foreground_latency") or {}).items()
          if any(isinstance(v, dict) and "timeline" in v for k, v in r.items() if k != "idle")}
    if not fg:
        return None
    traces = list(fg)
    policies = [p for p in ("full", "aggressive") if any(p in r for r in fg.values())]
    policies += sorted({p for r in fg.values() for p in r if p not in ("idle", *policies)})
    fig, axes = plt.subplots(len(policies), len(traces), figsize=(4.2 * len(traces), 3.3 * len(policies)),
                             squeeze=False)
    for row, pol in enumerate(policies):
        for col, tr in enumerate(traces):
            ax = axes[row][col]
            r = fg[tr].get(pol)
            if not r or "timeline" not in r:
                ax.set_visible(False)
                continue
            tl = r["timeline"]
            for a, b in tl["spans_s"]:
                ax.axvspan(a, max(b, a + 0.004), color="#ffbb78", alpha=0.5, lw=0)
            ts, ms, on = tl["t_s"], tl["latency_ms"], tl["compacting"]
            for flag, color, label in ((False, "#1f77b4", "no compaction work"), (True, "#d62728", "overlaps compaction")):
                xs = [t for t, f in zip(ts, on) if f == flag]
                ys = [m for m, f in zip(ms, on) if f == flag]
                ax.scatter(xs, ys, s=4, color=color, label=f"{label} ({len(xs)})", alpha=0.7, lw=0)
            idle = fg[tr].get("idle") or {}
            for q, ls in (("p50_ms", ":"), ("p99_ms", "--")):
                if idle.get(q) is not None:
                    ax.axhline(idle[q], color="black", lw=0.8, ls=ls, label=f"idle {q[:3]} {idle[q]:.2f} ms")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{tr}, {pol}: {r['moved_bytes'] / 1e6:.1f} MB moved"
                         + ("" if r.get("went_idle", True) else ", never idle"), fontsize=9)
            ax.set_xlabel("seconds since the store opened")
            if col == 0:
                ax.set_ylabel("get_many latency, ms (log)")
            ax.legend(fontsize=6, loc="upper right")
            if tl["kept"] < tl["n"]:
                ax.text(0.01, 0.01, f"{tl['kept']} of {tl['n']} requests shown", transform=ax.transAxes, fontsize=6)
    fig.suptitle("Foreground get_many latency (warm) while the background compactor works; shaded: compaction "
                 "active", fontsize=10)
    path = png_path(doc, out_dir, "latency_timeline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(doc: dict[str, Any]) -> str:
    """Per (trace, policy): blocks/request, amplification, cold latency; the targets; foreground latency
    idle vs during compaction; then the machine and the command."""
    from bench.report import fmt, machine_line, md_table, reproduce_line

    bsz = doc.get("config", {}).get("block_size", {})
    rows = []
    for tr, cells in doc["results"].items():
        for i, (pol, c) in enumerate(cells.items()):
            cm = c["cold_ms"]
            label = f"{tr} ({bsz[tr] // KiB} KiB)" if i == 0 and tr in bsz else ("" if i else tr)
            rows.append([label, f"**{pol}**" if pol == "full" else pol,
                         f"{fmt(c['blocks_per_request'])} ({fmt(c['blocks_per_request_p95'], 0)})",
                         fmt(c.get("blocks_floor")), fmt(c["space_amp"], 3), fmt(c["write_amp"], 3),
                         f"{fmt(cm['p50'])} / {fmt(cm['p95'])} / {fmt(cm['p99'])}"])
    out = [md_table(["trace (block size)", "policy", "blocks/request (p95)", "floor", "space amp", "write amp",
                     "cold p50 / p95 / p99 ms"], rows)]
    tg = doc.get("targets") or {}
    if tg:
        parts = []
        for tr, d in tg.items():
            t = (f"{tr} blocks/request {fmt(d['blocks_ratio'])} (target {d.get('blocks_target', '?')}, floor "
                 f"{fmt(d.get('blocks_floor_ratio'))}) {'met' if d['blocks_met'] else 'missed'}, "
                 f"p95 cold {fmt(d['cold_p95_ratio'])} (floor {fmt((d.get('cold_floor_ratio') or {}).get('median'))}) "
                 f"{'met' if d['cold_met'] else 'missed'}")
            if "amp_met" in d:
                t += f", space {fmt(d['space_amp'], 3)} / write {fmt(d['write_amp'], 3)} " \
                     f"{'met' if d['amp_met'] else 'missed'}"
            parts.append(t)
        out.append(f"Targets (full ÷ append-only blocks/request ≤ {_targets_text()}; floor = the offline lower "
                   f"bound ÷ append-only, the least any placement of the same bytes could give; p95 cold ≤ "
                   f"{TARGET_COLD_RATIO} (floor: the same requests read cold from one extent of one block, ÷ "
                   f"append-only); "
                   f"LoCoMo space ≤ {TARGET_LOCOMO_SPACE} and write ≤ {TARGET_LOCOMO_WRITE}): "
                   + "; ".join(parts) + ".")
    fg = doc.get("foreground_latency") or {}
    if fg:
        frows = []
        for tr, r in fg.items():
            idle = r.get("idle", {})
            for pol, v in r.items():
                if pol == "idle":
                    continue
                d = v["during"]
                frows.append([tr, pol, f"{fmt(idle.get('p50_ms'))} / {fmt(idle.get('p99_ms'))}",
                              f"{fmt(d['p50_ms'])} / {fmt(d['p99_ms'])} (n={d['n']})",
                              f"{fmt(v['after']['p50_ms'])} / {fmt(v['after']['p99_ms'])}",
                              f"{v['moved_bytes'] / 1e6:.1f} MB in {fmt(v['compaction_busy_s'])} s"
                              + ("" if v.get("went_idle", True) else ", never idle")])
        out.append("Foreground `get_many` latency (warm, ms) with the background compactor working through a "
                   "backlog vs the same requests with no compactor:\n\n"
                   + md_table(["trace", "policy", "idle p50 / p99", "during compaction p50 / p99",
                               "not during p50 / p99", "compaction work"], frows))
    cfg = doc.get("config", {})
    out.append(f"{cfg.get('mode', '?')} mode: traces at scale {cfg.get('scale')}, seed {cfg.get('seed')}, "
               f"{cfg.get('passes_per_replay')} passes per replay, {cfg.get('cold_samples')} cold samples per cell.")
    out.append(machine_line(doc))
    out.append(reproduce_line(doc))
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------------ main


# Blocks sized to the records, as a deployment would: chunk-record stores get small blocks (a 1 MiB block
# holds ~400 LoCoMo chunks, so everything a user said lands in one or two blocks whatever the policy),
# KV stores large ones (a 1 MiB block holds three 256 KiB KV chunks, so no policy could put a
# request's 8 chunks in fewer than 3 blocks).
TRACE_BLOCK_SIZE = {"locomo": 256 * KiB, "webarena": 1024 * KiB, "swe": 1024 * KiB, "lmcache": 4096 * KiB,
                    "shared": 1024 * KiB, "sessions": 4096 * KiB, "heldout": 4096 * KiB, "heldout_ns": 4096 * KiB, "agents": 4096 * KiB,
                    "workspaces": 4096 * KiB}


def block_size_of(trace: Trace, override: int | None) -> int:
    """The block size a trace is replayed with: --block-size, else the trace's own (the `random` family
    draws one per seed), else TRACE_BLOCK_SIZE."""
    return override or trace.params.get("block_size") or TRACE_BLOCK_SIZE[trace.name]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compaction", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "compaction", default_mode="quick", quick="quick traces",
                  full="4x bigger traces, background latency, PNG plots", dir_default=DEFAULT_DIR,
                  dir_help="(default bench/.scratch)")
    ap.add_argument("--traces", nargs="+", choices=list(GENERATORS), default=list(FAMILIES),
                    help="traces to replay (default: the six families; heldout, the issue's independent workload, "
                    "when named)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), metavar="POLICY",
                    help=f"policies to replay (default: all of {', '.join(POLICIES)}); each may carry knob "
                    "overrides, as NAME:KNOB=VALUE,... (e.g. full:relocation_budget=inf)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="block size in bytes for every trace, within the engine's limits (default: per trace, "
                    + ", ".join(f"{t} {n // KiB} KiB" for t, n in TRACE_BLOCK_SIZE.items()) + ")")
    ap.add_argument("--max-open-blocks", type=int, default=None,
                    help="the stores' max_open_blocks (default: the engine's default); both baselines and every "
                    "policy get the same")
    ap.add_argument("--scale", type=float, help="trace size multiplier (default: quick 1, full 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first repeat (repeat r uses seed + r)")
    ap.add_argument("--repeats", type=int, help="repeats, each with its own traces (seed + r) and baselines; "
                    "targets are judged on the median (default: quick 3, full 2)")
    ap.add_argument("--passes", type=int, help="compaction passes spread over each replay (default 40)")
    ap.add_argument("--cold-samples", type=int, help="cold-timed requests per cell (default: quick 50, full 200)")
    ap.add_argument("--no-plots", action="store_true", help="full mode: skip the PNG plots")
    ap.add_argument("--fg-requests", type=int, help="foreground latency under background compaction: requests "
                    "per trace (default: quick 100 with the full policy, full 400 with full and aggressive; 0: off)")
    args = ap.parse_args(argv)
    args.mode = bench_mode(args)
    args.json = results_path(args, "compaction")
    m = MODES[args.mode]
    args.scale = args.scale or m["scale"]
    args.passes = m["passes"] if args.passes is None else args.passes
    args.cold_samples = m["cold_samples"] if args.cold_samples is None else args.cold_samples
    args.fg_requests = m["fg_requests"] if args.fg_requests is None else args.fg_requests
    args.fg_policies = m["fg_policies"]
    args.repeats = m["repeats"] if args.repeats is None else args.repeats
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.max_open_blocks is not None and args.max_open_blocks < 1:
        ap.error("--max-open-blocks must be at least 1")
    for p in args.policies:
        try:
            resolve(policy_spec(p))
        except (ValueError, blockstore.BlockstoreError) as exc:
            ap.error(f"--policies {p}: {exc}")
    return args


def run_repeat(args: argparse.Namespace, seed: int, root: str, t_all: float, runs: list[Any], fgs: list[Any],
               tables: list[str]) -> list[Trace]:
    """One repeat: the traces generated with `seed`, replayed under every policy (and the foreground
    latency run); appends its results to `runs` and `fgs`, its tables to `tables`."""
    traces = []
    for name in args.traces:
        t = generate(name, seed, args.scale)
        check(t)
        traces.append(t)
        if "block_size" in t.params:  # a drawn shape (the `random` family): its draws, before any figure
            print(f"seed {seed} {name} shape: {json.dumps(t.params)}", file=sys.stderr)
    print(f"seed {seed}:\n{describe(traces)}", file=sys.stderr)
    payloads = Payloads(seed, max(t.summary()["max_record_bytes"] for t in traces))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    fg: dict[str, Any] = {}
    for t in traces:
        cells = results.setdefault(t.name, {})
        bs = block_size_of(t, args.block_size)
        for pol in args.policies:
            cells[pol] = replay(t, pol, block_size=bs, root=root, payloads=payloads,
                                passes=args.passes, cold_samples=args.cold_samples,
                                max_open_blocks=args.max_open_blocks)
            print(f"seed {seed} {t.name}/{pol}: {cells[pol]['replay_s']:.1f} s "
                  f"({time.perf_counter() - t_all:.0f} s in all)", file=sys.stderr)
        tables.append(table(t, cells, bs))
        if args.fg_requests:
            fg[t.name] = foreground_latency(t, block_size=bs, root=root, payloads=payloads,
                                            n_requests=args.fg_requests, policies=args.fg_policies,
                                            max_open_blocks=args.max_open_blocks)
            print(f"seed {seed} {t.name}: foreground latency ({time.perf_counter() - t_all:.0f} s in all)",
                  file=sys.stderr)
    runs.append(results)
    fgs.append(fg)
    return traces


def _brief(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """A repeat's headline figures per (trace, policy)."""
    keys = ("blocks_per_request", "blocks_floor", "sealed_fill", "space_amp", "write_amp")
    return {tr: {p: {k: c[k] for k in keys} | {"p95_cold_ms": c["cold_ms"]["p95"]} for p, c in cells.items()}
            for tr, cells in results.items()}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    t_all = time.perf_counter()
    engine = engine_state()
    compaction_status = run_quiet(["git", "status", "--porcelain", "--", "blockstore/compaction"])
    engine["compaction_uncommitted"] = compaction_status.splitlines()
    machine = machine_info(args.dir)
    runs: list[dict[str, dict[str, dict[str, Any]]]] = []
    fgs: list[dict[str, Any]] = []
    tables: list[str] = []
    traces: list[Trace] = []  # the first repeat's, described in the results
    root = tempfile.mkdtemp(prefix="compaction-", dir=args.dir)
    try:
        for r in range(args.repeats):  # each repeat: new traces (seed + r), every policy, the same engine
            got = run_repeat(args, args.seed + r, root, t_all, runs, fgs, tables if r == 0 else [])
            traces = traces or got
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results, fg = runs[0], fgs[0]
    target_text, target_doc = targets(runs, fgs)
    wall = time.perf_counter() - t_all
    doc = {
        "benchmark": "compaction",
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "config": {"mode": args.mode, "scale": args.scale, "seed": args.seed,
                   "block_size": {t.name: block_size_of(t, args.block_size) for t in traces},
                   "passes_per_replay": args.passes, "cold_samples": args.cold_samples, "durability": "cache",
                   "max_open_blocks": args.max_open_blocks or "default",
                   "repeats": args.repeats, "seeds": [args.seed + r for r in range(args.repeats)],
                   "policies": {p: resolve(policy_spec(p)).as_dict() for p in args.policies},
                   "foreground": {"requests": args.fg_requests, "policies": list(args.fg_policies)},
                   "measured": "blocks/request and cold latency over the second half of each trace; "
                               "amplification after a final pass, close and reopen"},
        "machine": machine,
        "engine": engine,
        "wall_s": round(wall, 1),
        "traces": {t.name: {"params": t.params, "summary": t.summary()} for t in traces},
        "results": results,  # the first repeat's (seed --seed); the others' figures are in "repeats"
        "targets": target_doc,  # medians over the repeats
        "foreground_latency": fg,
        "repeats": [{"seed": args.seed + r, "results": _brief(run), "foreground_p99_ratio":
                     {tr: {p: fg_ratio(v, p) for p in v if p != "idle"} for tr, v in f.items()}}
                    for r, (run, f) in enumerate(zip(runs, fgs))],
    }
    doc = finite(doc)
    png = plots(doc, os.path.dirname(os.path.abspath(args.json))) if args.mode == "full" and not args.no_plots \
        else []
    doc["plots"] = [os.path.relpath(p, REPO) for p in png]
    write_json_compact(args.json, doc)
    print("\n\n".join(tables))
    if fg:
        print(f"\nforeground get_many latency, warm, ms (idle: no compactor; during: overlapping compaction work; "
              f"seed {args.seed})")
        for tr, r in fg.items():
            parts = [f"idle p50 {r['idle']['p50_ms']:.2f} p99 {r['idle']['p99_ms']:.2f}"]
            for pol in ("full", "aggressive"):
                if pol in r:
                    d = r[pol]["during"]
                    parts.append(f"{pol}: during p50 {d['p50_ms']:.2f} p99 {d['p99_ms']:.2f} (n={d['n']}, "
                                 f"{r[pol]['moved_bytes'] / 1e6:.1f} MB moved in {r[pol]['compaction_busy_s']:.2f} s"
                                 f"{'' if r[pol]['went_idle'] else ', never idle'})")
            print(f"  {tr:<10}" + "; ".join(parts))
    print()
    print(target_text)
    print(f"(wall {wall:.1f} s; full results: {os.path.relpath(args.json)}"
          + (f"; plots: {', '.join(os.path.relpath(p) for p in png)}" if png else "") + ")")
    print(json.dumps(finite({"traces": {tr: {pol: {"blocks_per_request": round(c["blocks_per_request"], 3),
                                                   "space_amp": round(c["space_amp"], 3),
                                                   "write_amp": round(c["write_amp"], 3),
                                                   "p95_cold_ms": round(c["cold_ms"]["p95"], 3)}
                                             for pol, c in cells.items()} for tr, cells in results.items()}})))


if __name__ == "__main__":
    main()
