"""Power-loss loop: cut the power at random points of a store's life and check what a reopen finds.

The I/O seam (native/fault_io.c, through `FaultInjector`) keeps, per file, what was fsynced, and, under
the strict model of directory entries (`FaultInjector.track`), per directory the entries it held at
its last fsync. A power image of a moment is the tree a power loss then would leave:

- block files cut to their synced length; in a torn image (half the cuts, at random) a random run of
  their unsynced 512-byte sectors survives, sometimes followed by a garbage sector;
- a name (file or directory; made by the C core, by Python's os.makedirs, by RocksDB, or renamed into
  place like MANIFEST.json) survives only as of its parent directory's last fsync: a file created or a
  directory made since is gone, a durable file unlinked since comes back (with its synced bytes); in a
  torn image each such undurable change goes either way at random;
- RocksDB (STORE/directory/) is durable exactly as of the last synced directory write (a write with
  sync=True, force_sync or `Directory.flush`): ASSUMPTION, RocksDB syncs its WAL (and what its MANIFEST
  names) before such a write returns, and it is not ours to test. `rocksdb_sync_points` snapshots the
  directory's files (hard links and sizes) at each one; a cut goes back to the latest snapshot, and in a
  torn image keeps a random sector-granular part of the newest WAL's unsynced tail (cache-mode directory
  writes that reached the disk without their block records, or the other way round);
- MANIFEST.json and LOCK are written by Python (MANIFEST.json: fsynced, then renamed); their contents
  are copied as they are, their names follow the strict rule.

Without `track` (tests/test_faults.py), `power_image` copies every file the seam did not write
(RocksDB's, MANIFEST.json) whole, as it is at the moment of the image, and every directory as it is.

A run (`run_one`): a random workload, reproducible from (seed, mode, run index): the store is created at
a new nested path (its parents made by `open`), then, in three namespaces (tenant_records.NAMESPACES),
each with small records and large ones (1/16 of the block or more), KV puts (turns of a small and a large
record, each turn in one of many partitions), batches, overwrites, deletes, chunk records put, updated
and deleted, batched reads (and reads drawing a namespace's small records at random, on which placement
writes its large records to a lineage of their own, `NAME\0\0\0large`: in about one run in six,
`Stats.large_lineage_runs`), compaction passes (`Compactor.run_until_idle`, the aggressive policy),
clean closes and reopens, and an unclean end. It runs once to count the seam's
operations (writes, syncs, opens, ftruncate/unlink; not reads), then again with power images armed at
chosen operations: some uniform, some inside store creation, compaction passes and closes. Every
image is then reopened (recovery) under the seam, and for some a second round of cuts is taken inside
that recovery (and the close after it). Each cut is checked:

- the store: if `open()` had returned before the cut, the store must open with create=False; if not,
  either it opens, or a default open creates a new, empty store;
- every KV key and chunk record of every namespace holds a value the model allows: sync mode, the last
  acknowledged one (or one of an operation in flight at the cut); cache mode (the promise as stated: recent puts may be
  lost, an acknowledged delete never comes back) the value at the last durable point (the last clean
  close, or the key's last acknowledged delete) or any written since; nothing else, nothing corrupt. Mode
  `mixed`: each open of the workload and each reopen of an image picks sync or cache at random, so a
  recovery often runs in the other mode than the session it recovers; a value is durable from its
  acknowledgement if a sync session acknowledged it, else as in cache mode;
- `iter_keys` lists exactly the readable keys and `stats().records` counts the readable records;
- then close, and `blockstore.tools.fsck.check` on the closed store has no finding.

Usage (standalone, with a summary; exit status 1 on a violation):

    .venv/bin/python tests/power_loss.py --mode both --runs 20 --seed 7     # or sync, cache, mixed, all
    .venv/bin/python tests/power_loss.py --mode cache --seed 7 --only-run 3 --keep /tmp/pl   # rerun one

A violation prints the seed, the run and the cut, keeps the image (under --keep, default a temporary
directory that is left in place) and the command that reruns it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compaction_helpers import AGGRESSIVE, describe_value, value  # noqa: E402
from tenant_records import NAMESPACES, draw, large_lineage_blocks, large_size  # noqa: E402

import blockstore  # noqa: E402
from blockstore import BlockstoreError, NotFound  # noqa: E402
from blockstore.compaction import Compactor, attach  # noqa: E402
from blockstore.directory import Directory  # noqa: E402
from blockstore.native import FaultInjector  # noqa: E402
from blockstore.tools import fsck as fsck_mod  # noqa: E402

F = FaultInjector
MASK = F.WRITE | F.SYNC | F.OPEN | F.OTHER  # reads change nothing on disk: no cut points there
BLOCK = 64 << 10
# per namespace (tenant_records.NAMESPACES): small records and large ones (1/16 of the block or more: placement
# may write them to a lineage of their own, tenant_records)
SMALL_KEYS = [b"s%d" % i for i in range(4)]
LARGE_KEYS = [b"L%d" % i for i in range(3)]
KV_KEYS = SMALL_KEYS + LARGE_KEYS
CHUNKS = [f"c{i}" for i in range(3)]
USER, SESSION = "u", "s"
SMALL_SIZES = [64, 700, 2000]
LARGE_SIZES = [large_size(BLOCK), 16000, 24000, 32000]
DRAWS = 8
# writes spread over many partitions that requests read across: placement soon writes a namespace as one lineage
PARTITIONS = [None, *(f"p{i}" for i in range(8))]  # requests drawing small records at random, per namespace, in a read step (no seam operations)
MODES = ("sync", "cache")
STORE_REL = Path("data") / "nested" / "store"  # parents made by open(): store creation is cut too

Name = tuple[str, str]


# ------------------------------------------------------------------------------------------------
# RocksDB's durable points


@contextmanager
def rocksdb_sync_points(fi: FaultInjector) -> Iterator[None]:
    """Snapshot a directory's RocksDB files at each synced write (the model's assumption: RocksDB is
    durable as of its last synced write, see the module docstring)."""
    orig_init, orig_write, orig_flush = Directory.__init__, Directory.write, Directory.flush
    synced: weakref.WeakKeyDictionary[Directory, bool] = weakref.WeakKeyDictionary()
    known: set[str] = set()

    def init(self: Directory, path: str, *, read_only: bool, sync: bool, create: bool, **kw: Any) -> None:
        if path not in known:  # durable as it is before RocksDB first opens it (or empty, if not made yet)
            fi.snapshot_dir(path)
            known.add(path)
        orig_init(self, path, read_only=read_only, sync=sync, create=create, **kw)
        synced[self] = sync and not read_only

    def write(self: Directory, batch: Any, *, force_sync: bool = False) -> None:
        orig_write(self, batch, force_sync=force_sync)
        if not batch.empty and (force_sync or synced.get(self, False)):
            fi.snapshot_dir(self.path)

    def flush(self: Directory) -> None:
        orig_flush(self)
        fi.snapshot_dir(self.path)

    Directory.__init__ = init  # type: ignore[method-assign]
    Directory.write = write  # type: ignore[method-assign]
    Directory.flush = flush  # type: ignore[method-assign]
    try:
        yield
    finally:
        Directory.__init__ = orig_init  # type: ignore[method-assign]
        Directory.write = orig_write  # type: ignore[method-assign]
        Directory.flush = orig_flush  # type: ignore[method-assign]


@contextmanager
def deterministic_clock() -> Iterator[None]:
    """time.time_ns as a counter (1 ms a call from a fixed epoch) while a workload runs: compaction
    orders its GC victims by age, and a run must place its seam operations the same way twice (once to
    count them, once to cut at them) and again when rerun from its seed."""
    orig = time.time_ns
    tick = [1_700_000_000 * 10**9]

    def fake() -> int:
        tick[0] += 10**6
        return tick[0]

    time.time_ns = fake
    try:
        yield
    finally:
        time.time_ns = orig


# ------------------------------------------------------------------------------------------------
# the journal: what each cut may find


@dataclass
class Op:
    name: Name
    value: Any  # bytes (kv), str (chunk text), None (deleted)
    intent: int  # seam operations counted before the call
    ack: int | None = None  # counted when it returned (None: it raised)
    synced: bool = False  # acknowledged by a sync-mode session: durable from its ack on


@dataclass
class Journal:
    ops: dict[Name, list[Op]] = field(default_factory=dict)
    closes: list[int] = field(default_factory=list)  # counts at which a clean close returned
    created: int | None = None  # count at which the creating open returned

    def add(self, name: Name, val: Any, intent: int) -> Op:
        op = Op(name, val, intent)
        self.ops.setdefault(name, []).append(op)
        return op

    def allowed(self, name: Name, n: int) -> set[Any]:
        """Values `name` may hold after a cut just before seam operation n (n - 1 operations done): the value
        of its last durable operation (acknowledged by a sync session; a delete, synced in both modes; or
        acknowledged before a clean close), or any written since."""
        ops = [o for o in self.ops.get(name, []) if o.intent < n]
        acked = [i for i, o in enumerate(ops) if o.ack is not None and o.ack < n]
        close = max((c for c in self.closes if c < n), default=-1)
        durable = [i for i in acked
                   if ops[i].synced or ops[i].value is None or ops[i].ack < close]  # type: ignore[operator]
        barrier = durable[-1] if durable else None
        base = ops[barrier].value if barrier is not None else None
        rest = ops[barrier + 1 :] if barrier is not None else ops
        return {base} | {o.value for o in rest}


def chunk_text(cid: str, version: int) -> str:
    return f"chunk {cid} version {version} " + "memory " * (3 + 17 * (version % 5))


# ------------------------------------------------------------------------------------------------
# the workload


@dataclass
class Workload:
    fi: FaultInjector
    store_path: Path
    mode: str
    rng: random.Random
    journal: Journal = field(default_factory=Journal)
    store: blockstore.Store | None = None
    session_mode: str = ""  # the open session's durability (mode "mixed": each open picks one)
    compactor: Compactor | None = None
    windows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # phase -> op count ranges
    versions: dict[Name, int] = field(default_factory=dict)
    trace: bool = False
    large_lineage: bool = False  # some namespace's large records were written to a lineage of their own

    def count(self) -> int:
        return self.fi.image_op_count()

    @contextmanager
    def window(self, phase: str) -> Iterator[None]:
        lo = self.count()
        try:
            yield
        finally:
            self.windows.setdefault(phase, []).append((lo + 1, self.count()))

    def open(self, first: bool) -> None:
        self.session_mode = self.rng.choice(MODES) if self.mode == "mixed" else self.mode
        with self.window("create" if first else "open"):
            try:
                self.store = blockstore.open(self.store_path, durability=self.session_mode, block_size=BLOCK,
                                             max_open_blocks=3, idle_seal_seconds=0, backend="native")
            except BlockstoreError:
                self.store = None
                raise
        if first:
            self.journal.created = self.count()
        self.compactor = attach(self.store, AGGRESSIVE, background=False)

    def _op(self, intents: list[tuple[Name, Any]], fn: Callable[[blockstore.Store], Any], what: str = "") -> None:
        assert self.store is not None
        n0 = self.count()
        ops = [self.journal.add(name, v, n0) for name, v in intents]
        fn(self.store)  # no faults are injected: an exception is a bug the run reports
        n1 = self.count()
        for op in ops:
            op.ack, op.synced = n1, self.session_mode == "sync"
        if self.trace:
            print(f"  ops {n0 + 1}..{n1}: {what or ''} "
                  + ", ".join(f"{n[1]}={describe_value(v)}" for n, v in intents), file=sys.stderr)

    def _kv(self, ns: str, key: bytes) -> tuple[Name, bytes]:
        name = ("kv", f"{ns}/{key.decode()}")  # the payload names its namespace too
        ver = self.versions[name] = self.versions.get(name, 0) + 1
        return name, value(name[1].encode(), ver, self.rng.choice(LARGE_SIZES if key in LARGE_KEYS else SMALL_SIZES))

    def step(self) -> None:
        r, rng = self.rng.random(), self.rng
        ns = rng.choice(NAMESPACES)
        if r < 0.22:  # a turn of a namespace: a small record and a large one, in one of many partitions
            items = [(k, self._kv(ns, k)) for k in (rng.choice(SMALL_KEYS), rng.choice(LARGE_KEYS))]
            part = rng.choice(PARTITIONS)
            self._op([nv for _k, nv in items], lambda s: s.put_many([(k, nv[1]) for k, nv in items], ns=ns,
                                                                    partition=part))
        elif r < 0.44:
            keys = rng.sample(KV_KEYS, rng.randint(3, 6))
            items = [(k, self._kv(ns, k)) for k in keys]
            part = rng.choice(PARTITIONS)
            self._op([nv for _k, nv in items],
                     lambda s: s.put_many([(k, nv[1]) for k, nv in items], ns=ns, partition=part))
        elif r < 0.52:  # small and large records alike
            key = rng.choice(KV_KEYS)
            self._op([(("kv", f"{ns}/{key.decode()}"), None)], lambda s: s.delete(key, ns=ns))
        elif r < 0.56:
            keys = rng.sample(KV_KEYS, 3)
            self._op([(("kv", f"{ns}/{k.decode()}"), None) for k in keys], lambda s: s.delete_many(keys, ns=ns))
        elif r < 0.64:
            cid = rng.choice(CHUNKS)
            name = ("chunk", f"{ns}/{cid}")
            ver = self.versions[name] = self.versions.get(name, 0) + 1
            text, ts = chunk_text(name[1], ver), rng.randint(1, 10**6)
            self._op([(name, text)], lambda s: s.put_chunk(USER, SESSION, cid, text, ts_ns=ts, meta={"v": ver},
                                                           kv_keys=[b"s0"], ns=ns))
        elif r < 0.68:
            cid = rng.choice(CHUNKS)
            self._op([(("chunk", f"{ns}/{cid}"), None)], lambda s: s.delete_chunk(USER, SESSION, cid, ns=ns))
        elif r < 0.88:
            # batched reads of small and large records teach compaction its groups; in every namespace, requests
            # drawing small records at random make placement write its large records apart (tenant_records)
            keys = rng.sample(KV_KEYS, 4)
            draws = [(n, draw(rng, SMALL_KEYS, 4)) for n in NAMESPACES for _ in range(DRAWS)]

            def reads(s: blockstore.Store) -> None:
                s.get_many(keys, ns=ns)
                for n, d in draws:
                    s.get_many(d, ns=n)
            self._op([], reads, "read")
        elif r < 0.95:
            with self.window("compaction"):
                assert self.compactor is not None
                self._op([], lambda s: self.compactor.run_until_idle(max_passes=4),  # type: ignore[union-attr]
                         "compaction")
        else:
            self.close()
            self.open(first=False)
        if self.store is not None and not self.large_lineage:
            self.large_lineage = large_lineage_blocks(self.store)[0] > 0

    def close(self) -> None:
        assert self.store is not None
        s, self.store, self.compactor = self.store, None, None
        n0 = self.count()
        with self.window("close"):
            s.close()
        self.journal.closes.append(self.count())
        if self.trace:
            print(f"  ops {n0 + 1}..{self.count()}: close", file=sys.stderr)

    def run(self, steps: int) -> None:
        self.open(first=True)
        for _ in range(steps):
            self.step()
        if self.rng.random() < 0.3:
            self.close()
        else:  # an unclean end, as a crash leaves it (what a power cut after it finds is imaged at the end)
            assert self.store is not None
            self.store.abandon()
            self.store = None


# ------------------------------------------------------------------------------------------------
# checking a cut


def _read_each(s: blockstore.Store, ns: str) -> list[bytes | None | BlockstoreError]:
    """Every KV record of `ns` in one request; if that raises, key by key, so the one that fails is named."""
    try:
        return [None if v is None else bytes(v) for v in s.get_many(KV_KEYS, ns=ns)]
    except BlockstoreError:
        pass
    out: list[bytes | None | BlockstoreError] = []
    for k in KV_KEYS:
        try:
            out.append(s.get(k, ns=ns))
        except BlockstoreError as exc:
            out.append(exc)
    return out


def _judge(bad: list[str], what: str, got: Any, allowed: set[Any]) -> None:
    """Add to `bad` why `got`, read for `what`, is none of the values the journal allows there."""
    if got not in allowed:
        verdict = "resurrected" if allowed == {None} else "lost" if got is None else "wrong value"
        bad.append(f"{verdict}: {what} holds {describe_value(got)}, allowed {sorted(map(describe_value, allowed))}")


def check_store(s: blockstore.Store, journal: Journal, n: int, mode: str) -> list[str]:
    bad: list[str] = []
    records = 0
    for ns in NAMESPACES:
        present: list[bytes] = []
        for k, raw in zip(KV_KEYS, _read_each(s, ns)):
            name: Name = ("kv", f"{ns}/{k.decode()}")
            if isinstance(raw, BlockstoreError):
                bad.append(f"read of {name[1]} raised {raw!r}")
                continue
            _judge(bad, name[1], raw, journal.allowed(name, n))
            if raw is not None:
                present.append(k)
                records += 1
        for cid in CHUNKS:
            name = ("chunk", f"{ns}/{cid}")
            try:
                c = s.get_chunk(USER, SESSION, cid, ns=ns)
            except BlockstoreError as exc:
                bad.append(f"read of chunk {name[1]} raised {exc!r}")
                continue
            text = None if c is None else c.text
            _judge(bad, f"chunk {name[1]}", text, journal.allowed(name, n))
            if c is not None:
                records += 1
        try:
            listed = sorted(s.iter_keys(ns=ns))
            if listed != sorted(present):
                bad.append(f"{ns}: iter_keys lists {listed}, the readable keys are {sorted(present)}")
        except BlockstoreError as exc:
            bad.append(f"listing raised {exc!r}")
    try:
        st = s.stats()
        if st.records != records:
            bad.append(f"stats().records is {st.records}, {records} records are readable")
    except BlockstoreError as exc:
        bad.append(f"stats raised {exc!r}")
    return bad


def fsck_findings(path: Path) -> list[str]:
    try:
        rep = fsck_mod.check(path)
    except BlockstoreError as exc:
        return [f"fsck raised {exc!r}"]
    return [f"fsck: {f.line()}" for f in rep.findings]


def open_image(store: Path, mode: str) -> blockstore.Store:
    return blockstore.open(store, create=False, durability=mode, block_size=BLOCK, max_open_blocks=3,
                           idle_seal_seconds=0, backend="native")


def check_cut(store: Path, journal: Journal, n: int, mode: str,
              closed: Callable[[], None] | None = None) -> list[str]:
    """Reopen (recovery), check every name, close, fsck. `closed`: called once the store is closed,
    before fsck (the seam's operations counted then are the recovery's and the close's)."""
    created = journal.created is not None and journal.created < n
    try:
        s = open_image(store, mode)
    except NotFound as exc:
        if created:
            return [f"the store is gone: open() had returned before the cut, now {exc!r}"]
        try:  # a creation cut short: the next default open must simply create the store
            s = blockstore.open(store, durability=mode, block_size=BLOCK, backend="native")
        except BlockstoreError as exc2:
            return [f"creation cut short, and a new open(create=True) raised {exc2!r}"]
    except BlockstoreError as exc:
        return [f"reopen (recovery) raised {exc!r}"]
    try:
        bad = check_store(s, journal, n, mode)
    finally:
        try:
            s.close()
        except BlockstoreError as exc:
            return [f"close after recovery raised {exc!r}"]
        if closed is not None:
            closed()
    return bad + fsck_findings(store)


# ------------------------------------------------------------------------------------------------
# one run


@dataclass
class Failure:
    seed: int
    mode: str
    run: int
    cut: str
    violations: list[str]
    kept: Path | None


@dataclass
class Stats:
    cuts: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    torn: int = 0
    failures: list[Failure] = field(default_factory=list)
    runs: int = 0
    unmodelled: int = 0
    nondeterministic: int = 0  # runs whose second pass did not repeat the first one's operations
    large_lineage_runs: int = 0  # runs in which placement wrote some namespace's large records apart

    def add(self, phase: str, torn: bool) -> None:
        self.cuts += 1
        self.by_phase[phase] = self.by_phase.get(phase, 0) + 1
        self.torn += torn


def _phase_of(n: int, windows: dict[str, list[tuple[int, int]]]) -> str:
    for phase in ("create", "compaction", "close", "open"):
        if any(lo <= n <= hi for lo, hi in windows.get(phase, [])):
            return phase
    return "workload"


def _pick_points(rng: random.Random, total: int, windows: dict[str, list[tuple[int, int]]], k: int) -> list[int]:
    """k distinct points in 1..total: a share in each window kind (creation, compaction, close), the
    rest uniform."""
    pts: set[int] = set()
    for phase, share in (("create", 0.2), ("compaction", 0.25), ("close", 0.15), ("open", 0.05)):
        ranges = [(lo, hi) for lo, hi in windows.get(phase, []) if lo <= hi]
        for _ in range(round(k * share)):
            if ranges:
                lo, hi = rng.choice(ranges)
                pts.add(rng.randint(lo, min(hi, total)))
    while len(pts) < min(k, total):
        pts.add(rng.randint(1, total))
    return sorted(p for p in pts if 1 <= p <= total)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@contextmanager
def tracked(fi: FaultInjector, root: Path, shadow: Path) -> Iterator[None]:
    """Fault layer installed, `root` under the strict model (its current contents durable)."""
    fi.install()
    fi.track(str(root), str(_fresh(shadow)))
    try:
        with rocksdb_sync_points(fi):
            yield
    finally:
        fi.track(None)
        fi.uninstall()


def _append_count(into: list[int], fi: FaultInjector) -> None:
    into.append(fi.image_op_count())


def run_one(seed: int, mode: str, index: int, work: Path, stats: Stats, *, steps: int = 40, cuts: int = 12,
            recovery_every: int = 3, recovery_cuts: int = 3, keep: Path | None = None, trace: bool = False) -> None:
    """One workload with `cuts` power cuts (+ one at its end), and `recovery_cuts` cuts inside the
    recovery of every `recovery_every`-th of those images."""
    fi = FaultInjector()
    rng = random.Random(f"{seed}/{mode}/{index}")
    wseed = rng.getrandbits(64)
    base, shadow, images = work / "base", work / "shadow", work / "images"

    def workload(trace: bool = False) -> Workload:  # base: made empty before tracking began (its baseline)
        w = Workload(fi, Path(os.path.realpath(base)) / STORE_REL, mode, random.Random(wseed), trace=trace)
        with deterministic_clock():
            w.run(steps)
        return w

    # 1. count the seam's operations (and where creation, compaction and closes lie)
    _fresh(base)
    with tracked(fi, base, shadow):
        fi.arm_image_points(MASK, [], [], str(base), str(images))
        counted = workload()
        total = counted.count()
    # 2. again, with images at the chosen points
    points = _pick_points(rng, total, counted.windows, cuts)
    seeds = [rng.getrandbits(63) | 1 if rng.random() < 0.5 else 0 for _ in points]
    _fresh(images)
    _fresh(base)
    with tracked(fi, base, shadow):
        if trace:
            print(f"run {index} ({mode}): cuts before operations {points} (torn: {[s != 0 for s in seeds]})",
                  file=sys.stderr)
        fi.arm_image_points(MASK, points, seeds, str(base), str(images))
        w = workload(trace)
        stats.large_lineage_runs += w.large_lineage
        if w.count() != total:  # the cuts are still checked (against this run's journal); a rerun may differ
            stats.nondeterministic += 1
            print(f"note: run {index} ({mode}, seed {seed}) was not deterministic: {total} then {w.count()} "
                  "operations", file=sys.stderr)
        end_torn = rng.random() < 0.5
        fi.power_image(str(base), str(images / "end"), torn_seed=rng.getrandbits(63) | 1 if end_torn else 0)
        stats.unmodelled += fi.unmodelled()
    cut_list = [(f"p{i:05d}", p, s != 0) for i, (p, s) in enumerate(zip(points, seeds))]
    cut_list.append(("end", w.count() + 1, end_torn))
    stats.runs += 1
    rerun = (f".venv/bin/python tests/power_loss.py --mode {mode} --seed {seed} --only-run {index} "
             f"--steps {steps} --cuts {cuts}")

    def fail(cut: str, img: Path, bad: list[str]) -> None:
        kept = None
        if keep is not None:
            kept = keep / f"{mode}-run{index}-{cut}"
            if kept.exists():
                shutil.rmtree(kept)
            shutil.copytree(img, kept, symlinks=True)
        stats.failures.append(Failure(seed, mode, index, cut, bad, kept))
        print(f"POWER-LOSS VIOLATION seed={seed} mode={mode} run={index} cut={cut}: " + "; ".join(bad[:6])
              + f"\n  image kept at {kept}\n  rerun: {rerun}", file=sys.stderr)

    for ci, (name, n, torn) in enumerate(cut_list):
        img = images / name
        if not img.exists():
            continue
        phase = _phase_of(n, w.windows) if name != "end" else "end"
        # mixed: the reopen picks its own durability, often not the cut session's
        vmode = rng.choice(MODES) if mode == "mixed" else mode
        # 3. reopen the image (recovery) under the seam, counting its operations
        vroot = _fresh(work / "verify")
        shutil.copytree(img, vroot / "base", symlinks=True)
        store = Path(os.path.realpath(vroot / "base")) / STORE_REL
        pristine = work / "pristine"
        if pristine.exists():
            shutil.rmtree(pristine)
        shutil.copytree(vroot, pristine, symlinks=True)
        counted_ops: list[int] = []
        with tracked(fi, vroot, shadow):
            fi.arm_image_points(MASK, [], [], str(vroot), str(images))
            bad = check_cut(store, w.journal, n, vmode, closed=partial(_append_count, counted_ops, fi))
        rec_total = counted_ops[0] if counted_ops else 0
        stats.add(phase, torn)
        if bad:
            fail(name, pristine, bad)
            continue
        if ci % recovery_every or rec_total == 0:
            continue
        # 4. cuts inside that recovery (and the close after it)
        rpoints = sorted(rng.sample(range(1, rec_total + 1), min(recovery_cuts, rec_total)))
        rseeds = [rng.getrandbits(63) | 1 if rng.random() < 0.5 else 0 for _ in rpoints]
        rimages = _fresh(work / "rimages")
        shutil.rmtree(vroot)
        shutil.copytree(pristine, vroot, symlinks=True)
        with tracked(fi, vroot, shadow):
            fi.arm_image_points(MASK, rpoints, rseeds, str(vroot), str(rimages))
            again = check_cut(store, w.journal, n, vmode)  # the same recovery, now with cuts inside
            stats.unmodelled += fi.unmodelled()
        if again:
            fail(name, pristine, [f"the same recovery, run again: {v}" for v in again])
            continue
        for ri, (rp, rs) in enumerate(zip(rpoints, rseeds)):
            rimg = rimages / f"p{ri:05d}"
            if not rimg.exists():
                continue
            rroot = work / "rverify"
            if rroot.exists():
                shutil.rmtree(rroot)
            shutil.copytree(rimg, rroot, symlinks=True)  # an image of vroot: base/... inside
            rstore = Path(os.path.realpath(rroot / "base")) / STORE_REL
            rmode = rng.choice(MODES) if mode == "mixed" else mode
            with tracked(fi, rroot, shadow):
                rbad = check_cut(rstore, w.journal, n, rmode)
            stats.add("recovery", rs != 0)
            if rbad:
                fail(f"{name}-recovery{ri}@{rp}", rimg, rbad)


def work_dir() -> str | None:
    """Where the loop works: a tmpfs if there is one (its fsyncs cost nothing; the model, not the
    device, decides what survives), else the default temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def run_loop(seed: int, modes: list[str], runs: int, work: Path, *, only_run: int | None = None,
             keep: Path | None = None, steps: int = 40, cuts: int = 12, recovery_every: int = 3,
             recovery_cuts: int = 3, log: Callable[[str], None] | None = None, trace: bool = False) -> Stats:
    stats = Stats()
    for mode in modes:
        for index in range(runs) if only_run is None else [only_run]:
            run_one(seed, mode, index, work, stats, steps=steps, cuts=cuts, recovery_every=recovery_every,
                    recovery_cuts=recovery_cuts, keep=keep, trace=trace)
            if log:
                log(f"{mode} run {index}: {stats.cuts} cuts so far, {len(stats.failures)} violations")
    return stats


def summary(stats: Stats, elapsed: float) -> str:
    phases = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_phase.items()))
    return (f"power-loss loop: {stats.cuts} cuts ({stats.torn} torn) in {stats.runs} runs, {elapsed:.1f} s; "
            f"by phase: {phases}; {len(stats.failures)} violations; unmodelled renames: {stats.unmodelled}; "
            f"runs not repeatable: {stats.nondeterministic}; runs with a large-record lineage: "
            f"{stats.large_lineage_runs}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=[*MODES, "mixed", "both", "all"], default="both",
                    help="durability of the workload's sessions and of the reopens: mixed picks one for each "
                         "at random; both = sync and cache; all = sync, cache and mixed")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only-run", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cuts", type=int, default=12)
    ap.add_argument("--recovery-every", type=int, default=3)
    ap.add_argument("--recovery-cuts", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="where violating images are kept")
    ap.add_argument("--trace", action="store_true", help="print each operation with its seam operation counts")
    args = ap.parse_args(argv)
    modes = {"both": [*MODES], "all": [*MODES, "mixed"]}.get(args.mode, [args.mode])
    keep = args.keep or Path(tempfile.mkdtemp(prefix="power-loss-kept-"))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="power-loss-", dir=work_dir()) as tmp:
        stats = run_loop(args.seed, modes, args.runs, Path(tmp), only_run=args.only_run, keep=keep,
                         steps=args.steps, cuts=args.cuts, recovery_every=args.recovery_every,
                         recovery_cuts=args.recovery_cuts, log=lambda m: print(m, flush=True), trace=args.trace)
    print(summary(stats, time.monotonic() - t0))
    for f in stats.failures:
        print(f"  {f.mode} run {f.run} cut {f.cut}: {f.violations[0]}" + (f" (+{len(f.violations) - 1})"
                                                                          if len(f.violations) > 1 else ""))
    if not stats.failures and args.keep is None:
        shutil.rmtree(keep, ignore_errors=True)
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
