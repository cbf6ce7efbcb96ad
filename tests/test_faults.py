"""Fault sweeps through the C core's file-operations seam (../shared/notes/reliability.md §1, §2).

One standard workload (`workload`: KV puts and batches, overwrites, deletes, chunk records put, updated
and deleted, batched reads that teach compaction its groups, two compaction passes, a clean close and
a second session; besides the default namespace, two tenant namespaces of small and large records, the
first one's reads making placement write its large records to a lineage of their own, `tenants`) is run once per fault kind to count its operations, then once per fault point with
that operation failing. Every operation is journaled in a `Model` (intent before, acknowledgement
after), and after each run the store is checked against it in four ways:

- `kill`:  a copy taken right after the failed operation, as kill -9 would leave it (page cache kept),
           reopened (recovery): every acknowledged operation must be there, in both modes;
- `power`: an image of the same moment as a power loss would leave it (unsynced bytes dropped, through
           `FaultInjector.power_image`): in sync mode every acknowledged operation must be there; in
           cache mode only what the last successful close made durable (a key written since may come
           back absent, never with other bytes, and a deleted key never comes back);
- `reopen`: the workload goes on after the fault (transient faults pass, persistent ones keep failing),
           closes, and the same store is reopened with the disk back: every acknowledged operation;
- `closed-power`: a power image taken after that close attempt, with the mode's rule.

Each check reads every key and chunk (a value must be one the model allows: nothing lost, nothing
deleted comes back, nothing corrupt or foreign is read; a read error is a violation too), compares the
key listing, the session index and the record count with what it read, and rebuilds the directory
from the block files (`rebuild_violations`, skipped where a cache-mode power loss dropped tombstones).
Reads the workload itself makes under faults must return allowed values or raise.

Fault kinds (`KINDS`): EIO at the nth operation of any kind, once or from then on; ENOSPC at the nth
write, sync or open, once or from then on; the nth write torn at a 512-byte sector (a prefix reaches
the file, then EIO with a garbage sector) or cut short (a legal short write, which must be
transparent). `power-loss`: images just before and just after every sync (fdatasync or fsync),
unsynced bytes dropped, and torn at a random sector (with a garbage sector); checked with the mode's
rule. `recovery-eio` and `recovery-power-loss` sweep the reopen of a crashed store instead (the workload
left unclosed, as kill -9 leaves it, and as a torn power loss does): EIO at every operation of recovery,
once and from then on (then a clean reopen), and a power loss before and after every one of them.

CI runs a sample of the points of each kind (`BLOCKSTORE_FAULT_POINTS`, default 8 per kind and mode);
`BLOCKSTORE_FAULT_SWEEP=full` tries every point. Standalone, with a summary table:

    .venv/bin/python tests/test_faults.py --full [--mode sync] [--kind eio]
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from compaction_helpers import AGGRESSIVE, describe_value, parse_value, rebuild_violations, value  # noqa: E402
from power_loss import deterministic_clock  # noqa: E402
from tenant_records import NAMESPACES, draw, large_lineage_blocks, large_size  # noqa: E402

import blockstore  # noqa: E402
from blockstore import BlockstoreError  # noqa: E402
from blockstore.compaction import Compactor, attach  # noqa: E402
from blockstore.native import FaultInjector  # noqa: E402

F = FaultInjector
BLOCK = 64 << 10  # the smallest block: the workload rotates, seals and reclaims blocks in a few puts
KV_KEYS = [b"k%d" % i for i in range(12)]  # the default namespace's, 64 B to 30 KB
CHUNKS = [f"c{i}" for i in range(4)]
USER, SESSION = "u", "s"
# two more namespaces (tenant_records.NAMESPACES), each with small records and large ones (1/16 of the block or
# more); the first one's reads make placement write its large records to a lineage of their own (`tenants`)
TENANTS = [ns for ns in NAMESPACES if ns != "default"]
SMALL_KEYS = [b"s%d" % i for i in range(4)]
LARGE_KEYS = [b"L%d" % i for i in range(2)]
TENANT_KEYS = SMALL_KEYS + LARGE_KEYS
SMALL, LARGE = 700, 30_000

Name = tuple[str, str]  # ("kv", key; "<ns>/<key>" outside the default namespace) or ("chunk", chunk id)
Allowed = set[Any]  # bytes (kv), str (chunk text), None (absent)


# ------------------------------------------------------------------------------------------------
# the model: what each key may hold


@dataclass
class Model:
    """Expected state: per name, the values a correct store may hold. An intent adds the new value to
    the allowed set (the operation may or may not happen); its acknowledgement makes it the only one."""

    allowed: dict[Name, Allowed] = field(default_factory=dict)
    since_close: set[Name] = field(default_factory=set)  # names touched since the last successful close
    acked_ops: int = 0

    def get(self, name: Name) -> Allowed:
        return self.allowed.get(name, {None})

    def intent(self, name: Name, new: Any) -> None:
        self.allowed[name] = self.get(name) | {new}
        self.since_close.add(name)

    def ack(self, name: Name, new: Any) -> None:
        self.allowed[name] = {new}
        self.acked_ops += 1

    def closed(self) -> None:
        self.since_close.clear()

    def copy(self) -> Model:
        return Model({k: set(v) for k, v in self.allowed.items()}, set(self.since_close), self.acked_ops)

    def relaxed(self) -> Model:
        """After a cache-mode power loss: a name written since the last successful close may be absent."""
        m = self.copy()
        for name in m.since_close:
            m.allowed[name] = m.get(name) | {None}
        return m


def chunk_text(cid: str, version: int) -> str:
    return f"chunk {cid} version {version} " + "memory " * (40 * version)


# ------------------------------------------------------------------------------------------------
# the standard workload


@dataclass
class Ctx:
    """What a workload run works on, and how it reports each operation to the observer."""

    path: Path
    mode: str
    model: Model
    store: blockstore.Store | None = None
    compactor: Compactor | None = None
    read_violations: list[str] = field(default_factory=list)
    # called twice per operation: "during" (it has returned, not yet acknowledged) and "done"
    after_op: Callable[[Ctx, str], None] | None = None
    compaction: dict[str, int] = field(default_factory=dict)
    large_lineage_blocks: int = 0  # blocks of a namespace's large-record lineage seen after `tenants`


def _open(ctx: Ctx) -> None:
    ctx.store = blockstore.open(ctx.path, durability=ctx.mode, block_size=BLOCK, max_open_blocks=4,
                                idle_seal_seconds=0, backend="native")
    ctx.compactor = attach(ctx.store, AGGRESSIVE, background=False)


def _op(ctx: Ctx, intents: list[tuple[Name, Any]], fn: Callable[[blockstore.Store], Any]) -> bool:
    """One journaled operation: intents, the call, acknowledgements if it returned."""
    if ctx.store is None:
        return False
    for name, new in intents:
        ctx.model.intent(name, new)
    try:
        fn(ctx.store)
        ok = True
    except BlockstoreError:
        ok = False
    if ctx.after_op:
        ctx.after_op(ctx, "during")
    if ok:
        for name, new in intents:
            ctx.model.ack(name, new)
    if ctx.after_op:
        ctx.after_op(ctx, "done")
    return ok


def kv_name(key: bytes, ns: str = "default") -> Name:
    """A KV record's name in the model (its payloads name it too): its key, after its namespace's name
    outside the default namespace."""
    return ("kv", key.decode() if ns == "default" else f"{ns}/{key.decode()}")


def put(ctx: Ctx, key: bytes, version: int, size: int, partition: str | None = None, ns: str = "default") -> None:
    v = value(kv_name(key, ns)[1].encode(), version, size)
    _op(ctx, [(kv_name(key, ns), v)], lambda s: s.put(key, v, partition=partition, ns=ns))


def put_many(ctx: Ctx, items: list[tuple[bytes, int, int]], partition: str | None = None, ns: str = "default") -> None:
    vals = [(k, value(kv_name(k, ns)[1].encode(), ver, size)) for k, ver, size in items]
    _op(ctx, [(kv_name(k, ns), v) for k, v in vals], lambda s: s.put_many(vals, partition=partition, ns=ns))


def delete(ctx: Ctx, key: bytes, ns: str = "default") -> None:
    _op(ctx, [(kv_name(key, ns), None)], lambda s: s.delete(key, ns=ns))


def put_chunk(ctx: Ctx, cid: str, version: int, ts: int) -> None:
    text = chunk_text(cid, version)
    _op(ctx, [(("chunk", cid), text)],
        lambda s: s.put_chunk(USER, SESSION, cid, text, ts_ns=ts, meta={"v": version}, kv_keys=[b"k0"]))


def delete_chunk(ctx: Ctx, cid: str) -> None:
    _op(ctx, [(("chunk", cid), None)], lambda s: s.delete_chunk(USER, SESSION, cid))


def read(ctx: Ctx, *requests: list[bytes], ns: str = "default") -> None:
    """Batched reads, one request each (compaction learns its groups from these; placement, whether a
    namespace's large records go apart): under faults they may raise, but what they return must be allowed."""
    def fn(s: blockstore.Store) -> None:
        for keys in requests:
            for k, got in zip(keys, s.get_many(keys, ns=ns)):
                g = None if got is None else bytes(got)
                if g not in ctx.model.get(kv_name(k, ns)):
                    ctx.read_violations.append(f"read during the workload: {ns} {k!r} returned {describe_value(g)}")
    _op(ctx, [], fn)


def compact(ctx: Ctx) -> None:
    def fn(_s: blockstore.Store) -> None:
        assert ctx.compactor is not None
        rep = ctx.compactor.run_pass()
        for what in ("relocated_records", "gc_records", "reclaimed_blocks", "tombstones_carried"):
            ctx.compaction[what] = ctx.compaction.get(what, 0) + getattr(rep, what)
    _op(ctx, [], fn)


def close(ctx: Ctx) -> None:
    s, ctx.store, ctx.compactor = ctx.store, None, None
    if s is None:
        return
    try:
        s.close()
        ok = True
    except BlockstoreError:
        ok = False  # closed anyway (not marked clean): the next open runs recovery
    if ctx.after_op:
        ctx.after_op(ctx, "during")
    if ok:
        ctx.model.closed()
    if ctx.after_op:
        ctx.after_op(ctx, "done")


def reopen(ctx: Ctx) -> None:
    for _attempt in range(2):  # a transient fault may fail the first open; a persistent one both
        try:
            _open(ctx)
        except BlockstoreError:
            ctx.store = None
        if ctx.after_op:
            ctx.after_op(ctx, "during")
            ctx.after_op(ctx, "done")
        if ctx.store is not None:
            return


def session_one(ctx: Ctx) -> None:
    put_many(ctx, [(b"k0", 1, 9000), (b"k1", 1, 20000), (b"k2", 1, 3000), (b"k3", 1, 64), (b"k4", 1, 20000),
                   (b"k5", 1, 9000)], partition="req-1")
    put(ctx, b"k6", 1, 20000)
    put(ctx, b"k7", 1, 3000, partition="req-2")
    put(ctx, b"k8", 1, 30000)
    for i, cid in enumerate(CHUNKS[:3]):
        put_chunk(ctx, cid, 1, ts=i + 1)
    put(ctx, b"k1", 2, 20000)
    delete(ctx, b"k3")
    put_many(ctx, [(b"k9", 1, 9000), (b"k10", 1, 64)])
    for ns in TENANTS:
        put_many(ctx, [(k, 1, SMALL) for k in SMALL_KEYS] + [(k, 1, LARGE) for k in LARGE_KEYS], ns=ns)


def session_two(ctx: Ctx) -> None:
    read(ctx, [b"k0", b"k1", b"k2"])
    read(ctx, [b"k4", b"k6", b"k8"])
    read(ctx, [b"k0", b"k1", b"k2"])
    put(ctx, b"k4", 2, 20000)
    put(ctx, b"k5", 2, 9000, partition="req-1")
    delete(ctx, b"k6")
    put_chunk(ctx, "c1", 2, ts=2)
    delete_chunk(ctx, "c2")
    tenants(ctx, 2)
    compact(ctx)
    put(ctx, b"k0", 2, 3000)
    delete(ctx, b"k9")
    put(ctx, b"k11", 1, 20000, partition="req-3")
    put_chunk(ctx, "c3", 1, ts=4)
    read(ctx, [b"k0", b"k1", b"k2"])
    compact(ctx)
    put(ctx, b"k2", 2, 9000)
    delete(ctx, b"k8")


def tenants(ctx: Ctx, version: int) -> None:
    """In the first tenant namespace: turns of a small and a large record, each turn in a partition of its own,
    then 16 requests of its small records. Its shadow as one lineage then touches 2 blocks a request, its
    partitions' 4, and with its large records apart 1 (placement_choice.py), so the large record written next
    (of exactly 1/16 of the block) goes to its large-record lineage; then a large record is deleted. In the
    other, a large record is overwritten and a small one deleted."""
    ns = TENANTS[0]
    for i, small in enumerate(SMALL_KEYS):
        put_many(ctx, [(small, version, SMALL), (LARGE_KEYS[i % 2], version + i, LARGE)], partition=f"turn{i}", ns=ns)
    rng = random.Random(ns)
    read(ctx, *[draw(rng, SMALL_KEYS, 4) for _ in range(16)], ns=ns)
    put_many(ctx, [(LARGE_KEYS[0], version + 10, large_size(BLOCK)), (SMALL_KEYS[0], version + 10, SMALL)],
             partition="turn9", ns=ns)
    put(ctx, LARGE_KEYS[1], version + 10, LARGE, partition="turn9", ns=ns)
    put(ctx, LARGE_KEYS[0], version + 11, LARGE, partition="turn9", ns=ns)
    if ctx.store is not None:
        ctx.large_lineage_blocks = max(ctx.large_lineage_blocks, large_lineage_blocks(ctx.store)[0])
    delete(ctx, LARGE_KEYS[1], ns=ns)
    # the other: a large record overwritten and a small one deleted (each stored first: tenants runs once)
    put_many(ctx, [(LARGE_KEYS[0], version, LARGE), (SMALL_KEYS[1], version, SMALL)], partition="p", ns=TENANTS[1])
    put(ctx, LARGE_KEYS[0], version + 1, LARGE, partition="p", ns=TENANTS[1])
    delete(ctx, SMALL_KEYS[1], ns=TENANTS[1])


def workload(ctx: Ctx, *, final_close: bool = True) -> None:
    """The standard workload: two sessions of one store (the first closed cleanly). Under a clock that counts
    calls (power_loss.deterministic_clock): GC ranks its victims by age, and a run must do the same operations
    each time (a fault point names one operation), which the tenants' blocks made it miss now and then."""
    with deterministic_clock():
        reopen(ctx)
        session_one(ctx)
        close(ctx)
        reopen(ctx)
        session_two(ctx)
        if final_close:
            close(ctx)


# ------------------------------------------------------------------------------------------------
# checking a store against the model


def _classify(name: Name, got: Any, allowed: Allowed) -> str:
    if allowed == {None}:
        return "resurrected"  # deleted (or never written), yet something is there
    if got is None:
        return "lost"
    if isinstance(got, bytes):
        try:
            key, _ver = parse_value(got)
        except (AssertionError, ValueError):
            return "corrupt"
        return "lost (stale value)" if key.decode() == name[1] else "corrupt (another key's value)"
    return "lost (stale value)" if got.startswith(f"chunk {name[1]} ") else "corrupt"


def check_store(s: blockstore.Store, model: Model, *, rebuild: bool = True) -> list[str]:
    """Violations of the model and of the store's own invariants (empty when all is well)."""
    bad: list[str] = []
    present: dict[str, list[bytes]] = {ns: [] for ns in NAMESPACES}
    for ns, keys in [("default", KV_KEYS)] + [(t, TENANT_KEYS) for t in TENANTS]:
        for k in keys:
            name = kv_name(k, ns)
            try:
                got = s.get(k, ns=ns)
            except BlockstoreError as exc:
                bad.append(f"corrupt read: {name[1]} raised {exc!r}")
                continue
            allowed = model.get(name)
            if got not in allowed:
                bad.append(f"{_classify(name, got, allowed)}: {name[1]} holds {describe_value(got)}, allowed "
                           f"{sorted(describe_value(a) for a in allowed)}")
            if got is not None:
                present[ns].append(k)
    present_chunks: set[str] = set()
    for cid in CHUNKS:
        name = ("chunk", cid)
        try:
            c = s.get_chunk(USER, SESSION, cid)
        except BlockstoreError as exc:
            bad.append(f"corrupt read: chunk {cid} raised {exc!r}")
            continue
        text = None if c is None else c.text
        allowed = model.get(name)
        if text not in allowed:
            bad.append(f"{_classify(name, text, allowed)}: chunk {cid} holds {describe_value(text)}")
        if c is not None:
            present_chunks.add(cid)
    try:
        listed = {c.chunk_id for c in s.list_chunks(USER, SESSION)}
        if listed != present_chunks:
            bad.append(f"invariant: session index lists {sorted(listed)}, records are {sorted(present_chunks)}")
        for ns, present_kv in present.items():
            keys = sorted(s.iter_keys(ns=ns))
            if keys != sorted(present_kv):
                bad.append(f"invariant: {ns}: iter_keys lists {keys}, readable keys are {sorted(present_kv)}")
        records = s.stats().records
        readable = sum(map(len, present.values())) + len(present_chunks)
        if records != readable:
            bad.append(f"invariant: block counters say {records} records, {readable} are readable")
        if rebuild:
            bad += [f"invariant: rebuild from blocks: {v}" for v in rebuild_violations(s)]
    except BlockstoreError as exc:
        bad.append(f"invariant check raised {exc!r}")
    return bad


def check_path(path: Path, mode: str, model: Model, *, rebuild: bool = True) -> list[str]:
    """Open (running recovery if needed), check, close."""
    try:
        s = blockstore.open(path, durability=mode, block_size=BLOCK, backend="native")
    except BlockstoreError as exc:
        return [f"recovery failed: open raised {exc!r}"]
    try:
        return check_store(s, model, rebuild=rebuild)
    finally:
        try:
            s.close()
        except BlockstoreError as exc:
            return [f"close after recovery raised {exc!r}"]


def check_power_image(path: Path, mode: str, model: Model) -> list[str]:
    """A power-loss image: sync mode keeps every acknowledgement; cache mode what was closed."""
    if mode == "sync":
        return check_path(path, mode, model)
    return check_path(path, mode, model.relaxed(), rebuild=False)


# ------------------------------------------------------------------------------------------------
# fault kinds and the sweep


@dataclass(frozen=True)
class Kind:
    name: str
    mask: int  # the operations counted (and hit)
    err: int = 0
    persistent: bool = False
    tear: str = ""  # "", "eio" or "short"
    power: bool = False  # images around the nth op instead of a failure

    def arm(self, f: FaultInjector, n: int, root: Path, images: Path, seed: int) -> None:
        if self.power:
            f.arm_images(self.mask, n, str(root), str(images), torn_seed=seed)
        elif self.tear:
            f.arm_torn(n, short=self.tear == "short", seed=seed)
        else:
            f.arm(self.mask, n, self.err, persistent=self.persistent)


WSO = F.WRITE | F.SYNC | F.OPEN
KINDS = {k.name: k for k in [
    Kind("eio", F.ALL, errno.EIO),
    Kind("eio-persistent", F.ALL, errno.EIO, persistent=True),
    Kind("enospc", WSO, errno.ENOSPC),
    Kind("enospc-persistent", WSO, errno.ENOSPC, persistent=True),
    Kind("torn-write", F.WRITE, tear="eio"),
    Kind("short-write", F.WRITE, tear="short"),
    Kind("power-loss", F.SYNC, power=True),
]}
RECOVERY_KINDS = ["recovery-eio", "recovery-power-loss"]


@dataclass
class SweepResult:
    kind: str
    mode: str
    points: int  # fault points the standard workload has for this kind
    tried: list[int] = field(default_factory=list)
    reached: int = 0  # tried points where the fault fired (or the images were taken)
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    compaction: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.mode:5} {self.kind:22} points {self.points:4}  tried {len(self.tried):4}  "
                f"fired {self.reached:4}  checks {self.checks:5}  violations {len(self.violations):3}  "
                f"{self.seconds:6.1f} s")


def count_ops(mode: str, mask: int, work: Path) -> tuple[int, dict[str, int]]:
    """Operations of `mask` in one fault-free run of the workload (and what compaction did in it)."""
    f = FaultInjector()
    f.install()
    try:
        ctx = Ctx(work / "count", mode, Model())
        f.arm(mask, 0, 0)
        workload(ctx)
        n = f.op_count()
    finally:
        f.arm(0, 0, 0)
        f.uninstall()
    shutil.rmtree(work / "count")
    return n, {**ctx.compaction, "large_lineage_blocks": ctx.large_lineage_blocks}


def sample(points: int, want: int | None) -> list[int]:
    """Every point, or `want` of them spread evenly (first and last included)."""
    if want is None or want >= points:
        return list(range(1, points + 1))
    if want <= 1:
        return [1]
    return sorted({1 + round(i * (points - 1) / (want - 1)) for i in range(want)})


def run_point(kind: Kind, mode: str, n: int, work: Path, res: SweepResult, retry: bool = True) -> None:
    """The workload with the fault at point n, then every check of the module docstring. A run that
    never reached point n is tried once more: GC ranks victims by age, so on a stalled machine a
    pass can order its copies differently and do an operation or two fewer."""
    f = FaultInjector()
    f.install()  # fresh bookkeeping for each run
    root = work / f"{kind.name}-{n}"
    images = work / f"{kind.name}-{n}.img"
    images.mkdir()
    ctx = Ctx(root, mode, Model())
    at_fault: list[tuple[str, Path, Model]] = []
    image_model: list[Model] = []

    def after_op(c: Ctx, phase: str) -> None:
        if kind.power:
            if phase == "during" and not image_model and f.images_taken():
                image_model.append(c.model.copy())  # taken inside this op: it is pending
            return
        if phase == "done" and not at_fault and f.fired():
            # the first operation that met the fault has returned (and, if it succeeded despite it,
            # e.g. a short write, been acknowledged): kill -9 and power loss right now
            kill = work / f"{kind.name}-{n}.kill"
            shutil.copytree(root, kill)
            power = work / f"{kind.name}-{n}.power"
            f.power_image(str(root), str(power))
            at_fault.append(("kill", kill, c.model.copy()))
            at_fault.append(("power", power, c.model.copy()))

    ctx.after_op = after_op
    seed = 0x5EED + n
    try:
        kind.arm(f, n, root, images, seed)
        workload(ctx)
        if ctx.store is not None:
            close(ctx)
        fired = f.images_taken() if kind.power else f.fired()
        closed_power = work / f"{kind.name}-{n}.closed-power"
        f.power_image(str(root), str(closed_power))
    finally:
        f.arm(0, 0, 0)
        f.arm_images(0, 0, "", "")
        f.uninstall()
    if not fired and retry:
        for p in work.glob(f"{kind.name}-{n}*"):
            shutil.rmtree(p, ignore_errors=True)
        return run_point(kind, mode, n, work, res, retry=False)
    res.tried.append(n)
    where = f"{mode} {kind.name} op {n}"
    if not fired:
        res.violations.append(f"{where}: the fault never fired (the workload did fewer operations)")
    else:
        res.reached += 1
    res.violations += [f"{where}: {v}" for v in ctx.read_violations]
    checks: list[tuple[str, list[str]]] = []
    if kind.power:
        if image_model:
            for img in sorted(images.iterdir()):
                checks.append((f"power image {img.name}", check_power_image(img, mode, image_model[0])))
    else:
        for what, path, model in at_fault:
            if what == "kill":
                checks.append(("kill -9 after the fault", check_path(path, mode, model)))
            else:
                checks.append(("power loss after the fault", check_power_image(path, mode, model)))
        checks.append(("reopen after the workload", check_path(root, mode, ctx.model)))
    checks.append(("power loss after the close", check_power_image(closed_power, mode, ctx.model)))
    for what, bad in checks:
        res.checks += 1
        res.violations += [f"{where}, {what}: {v}" for v in bad]
    for p in work.glob(f"{kind.name}-{n}*"):
        shutil.rmtree(p, ignore_errors=True)


def sweep(kind_name: str, mode: str, want: int | None, work: Path) -> SweepResult:
    t0 = time.monotonic()
    if kind_name in RECOVERY_KINDS:
        return recovery_sweep(kind_name, mode, want, work, t0)
    kind = KINDS[kind_name]
    points, compaction = count_ops(mode, kind.mask, work)
    res = SweepResult(kind_name, mode, points, compaction=compaction)
    for n in sample(points, want):
        run_point(kind, mode, n, work, res)
    res.seconds = time.monotonic() - t0
    return res


# ---- faults and power losses during recovery


def crashed_store(mode: str, work: Path, torn: bool) -> tuple[Path, Model]:
    """The workload without its final close, dropped as kill -9 leaves a store (or, with `torn`, as
    a power loss does, unsynced tails torn): blocks left open, recovery to do."""
    f = FaultInjector()
    f.install()
    try:
        ctx = Ctx(work / "live", mode, Model())
        workload(ctx, final_close=False)
        assert ctx.store is not None
        base = work / "crashed"
        if torn:
            f.power_image(str(ctx.path), str(base), torn_seed=0xC0FFEE)
        else:
            shutil.copytree(ctx.path, base)
        ctx.store.abandon()
    finally:
        f.uninstall()
    shutil.rmtree(work / "live")
    model = ctx.model.relaxed() if torn and mode == "cache" else ctx.model
    return base, model


def recovery_sweep(kind_name: str, mode: str, want: int | None, work: Path, t0: float) -> SweepResult:
    res = SweepResult(kind_name, mode, 0)
    for torn in (False, True):
        base, model = crashed_store(mode, work, torn)
        f = FaultInjector()
        f.install()
        try:
            probe = work / "probe"
            shutil.copytree(base, probe)
            f.arm(F.ALL, 0, 0)
            try:
                blockstore.open(probe, durability=mode, block_size=BLOCK, backend="native").close()
            finally:
                points = f.op_count()
                f.arm(0, 0, 0)
            shutil.rmtree(probe)
        finally:
            f.uninstall()
        res.points += points
        start = "power-loss image" if torn else "kill -9 image"
        for n in sample(points, want):
            where = f"{mode} {kind_name} ({start}) op {n}"
            for persistent in ((False, True) if kind_name == "recovery-eio" else (False,)):
                root = work / f"rec-{n}"
                shutil.copytree(base, root)
                images = work / f"rec-{n}.img"
                images.mkdir()
                f = FaultInjector()
                f.install()
                try:
                    if kind_name == "recovery-eio":
                        f.arm(F.ALL, n, errno.EIO, persistent=persistent)
                    else:
                        f.arm_images(F.ALL, n, str(root), str(images), torn_seed=0xABC + n)
                    try:
                        blockstore.open(root, durability=mode, block_size=BLOCK, backend="native").close()
                    except BlockstoreError:
                        pass  # recovery failed part-way: the next open must finish it
                    fired = f.fired() if kind_name == "recovery-eio" else f.images_taken()
                finally:
                    f.arm(0, 0, 0)
                    f.arm_images(0, 0, "", "")
                    f.uninstall()
                res.tried.append(n)
                if fired:
                    res.reached += 1
                else:
                    res.violations.append(f"{where}: the fault never fired")
                if kind_name == "recovery-eio":
                    targets = [("reopen after the failed recovery", root, model, mode == "sync" or not torn)]
                else:
                    targets = [(f"power image {p.name}", p, model, mode == "sync") for p in sorted(images.iterdir())]
                for what, path, m, rebuild in targets:
                    res.checks += 1
                    res.violations += [f"{where}, {what}: {v}" for v in check_path(path, mode, m, rebuild=rebuild)]
                shutil.rmtree(root, ignore_errors=True)
                shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(base)
    res.seconds = time.monotonic() - t0
    return res


# ------------------------------------------------------------------------------------------------
# pytest


def _want() -> int | None:
    if os.environ.get("BLOCKSTORE_FAULT_SWEEP") == "full":
        return None
    return int(os.environ.get("BLOCKSTORE_FAULT_POINTS", "8"))


ALL_KINDS = [*KINDS, *RECOVERY_KINDS]


@pytest.mark.parametrize("mode", ["sync", "cache"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fault_sweep(tmp_path: Path, kind: str, mode: str) -> None:
    res = sweep(kind, mode, _want(), tmp_path)
    print(res.line())
    assert res.tried and res.reached == len(res.tried), res.violations[:5]
    assert not res.violations, "\n".join(res.violations[:20])


def test_the_workload_exercises_compaction_and_is_deterministic(tmp_path: Path) -> None:
    """The sweep is only as good as its workload: compaction must move records in it, and two runs
    must do the same operations (else a fault point would not name the same operation twice)."""
    n1, comp = count_ops("sync", F.ALL, tmp_path)
    n2, _ = count_ops("sync", F.ALL, tmp_path)
    if n1 != n2:  # GC ranks victims by age: a stall can reorder a pass once (run_point retries too)
        n3, _ = count_ops("sync", F.ALL, tmp_path)
        assert n3 in (n1, n2), (n1, n2, n3)
    assert comp.get("gc_records", 0) > 0 and comp.get("relocated_records", 0) > 0, comp
    assert comp.get("reclaimed_blocks", 0) > 0, comp
    # placement wrote the tenants' large records to their own lineage (`tenants`) before compaction ran
    assert comp["large_lineage_blocks"] > 0, comp


def test_torn_and_short_writes_reach_the_file(tmp_path: Path, faults: FaultInjector) -> None:
    """The fault layer itself: a torn write leaves a prefix ending on a 512-byte file offset, then at
    most one sector of garbage, and fails; a short write reports such a prefix and the core writes
    the rest; a store goes on past both."""
    from blockstore.native import NativeBackend

    b = NativeBackend()
    data = bytes(range(256)) * 40  # 10240 bytes
    for seed in range(1, 40):
        p = str(tmp_path / f"f{seed}")
        fd = b.open(p, True)
        try:
            faults.arm_torn(1, seed=seed)
            with pytest.raises(blockstore.IOErrorBS):
                b.pwrite(fd, data, 100)
            assert faults.fired() == 1
            got = Path(p).read_bytes()[100:]
            prefix = next((i for i in range(len(got)) if got[i] != data[i]), len(got))
            while prefix and (100 + prefix) % 512:  # garbage may repeat a byte of the data by chance
                prefix -= 1
            assert got[:prefix] == data[:prefix] and len(got) - prefix <= 512, (seed, prefix, len(got))
            faults.arm_torn(1, short=True, seed=seed)
            b.pwrite(fd, data, 100)  # the core continues a short write where it stopped
            assert faults.fired() == 1 and Path(p).read_bytes()[100:] == data
        finally:
            faults.arm(0, 0, 0)
            b.close(fd)
    path = tmp_path / "s"
    with blockstore.open(path, durability="sync", block_size=BLOCK, backend="native") as s:
        s.put(b"a", b"x" * 100)
        faults.arm_torn(1, seed=7)
        with pytest.raises(blockstore.IOErrorBS):
            s.put(b"b", value(b"b", 1, 30000))
        faults.arm_torn(1, short=True, seed=9)
        s.put(b"c", value(b"c", 1, 30000))
        faults.arm(0, 0, 0)
        assert s.get(b"c") == value(b"c", 1, 30000) and s.get(b"b") is None and s.get(b"a") == b"x" * 100
    with blockstore.open(path, durability="sync", block_size=BLOCK, backend="native") as s:
        assert s.get(b"c") == value(b"c", 1, 30000) and s.get(b"b") is None and s.get(b"a") == b"x" * 100


def test_power_image_leaves_the_live_store_alone(tmp_path: Path, faults: FaultInjector) -> None:
    path = tmp_path / "s"
    s = blockstore.open(path, durability="cache", block_size=BLOCK, backend="native")
    s.put(b"durable", b"d" * 5000)
    s.close()
    s = blockstore.open(path, durability="cache", block_size=BLOCK, backend="native")
    s.put(b"recent", b"r" * 5000)  # cache mode: in the page cache only
    faults.power_image(str(path), str(tmp_path / "img"))
    assert s.get(b"recent") == b"r" * 5000  # the live store did not lose it
    s.close()
    with blockstore.open(tmp_path / "img", durability="cache", block_size=BLOCK, backend="native") as img:
        assert img.recovery_report is not None
        assert img.get(b"durable") == b"d" * 5000 and img.get(b"recent") is None
    with blockstore.open(path, durability="cache", block_size=BLOCK, backend="native") as s:
        assert s.get(b"recent") == b"r" * 5000


# ------------------------------------------------------------------------------------------------
# regression tests for what the sweeps found (each named after the bug)


def test_regression_a_creation_cut_short_leaves_a_store_that_opens(tmp_path: Path, faults: FaultInjector) -> None:
    """The MANIFEST used to be written first: a creation that failed (or was killed) before the
    directory existed left a store no open could load ("CURRENT does not exist")."""
    faults.arm(F.ALL, 0, 0)
    s = blockstore.open(tmp_path / "count", backend="native")
    n_ops = faults.op_count()  # the creating open's operations
    s.close()
    assert n_ops >= 1
    for n in range(1, n_ops + 1):
        path = tmp_path / f"s{n}"
        faults.arm(F.ALL, n, errno.EIO, persistent=True)
        with pytest.raises(BlockstoreError):
            blockstore.open(path, backend="native")
        faults.arm(0, 0, 0)
        with blockstore.open(path, backend="native") as s:
            s.put(b"k", b"v")
        with blockstore.open(path, backend="native") as s:
            assert s.get(b"k") == b"v"
    # the state a kill -9 between the directory and the MANIFEST leaves: a directory, no MANIFEST
    path = tmp_path / "killed"
    with blockstore.open(path, backend="native") as s:
        pass
    (path / "MANIFEST.json").unlink()
    with blockstore.open(path, backend="native") as s:
        s.put(b"k", b"v")
        assert s.get(b"k") == b"v"


def test_regression_close_raises_when_it_could_not_make_the_store_durable(tmp_path: Path,
                                                                          faults: FaultInjector) -> None:
    """close() swallowed a failed seal or sync: it returned normally without marking the store clean,
    so a cache-mode caller believed puts durable that a power loss then took."""
    path = tmp_path / "s"
    s = blockstore.open(path, durability="cache", block_size=BLOCK, backend="native")
    s.put(b"k", value(b"k", 1, 20000))
    faults.arm(F.SYNC, 1, errno.EIO)
    with pytest.raises(blockstore.IOErrorBS):
        s.close()
    faults.arm(0, 0, 0)
    with pytest.raises(blockstore.StoreClosed):
        s.put(b"x", b"y")  # closed all the same
    with blockstore.open(path, durability="cache", block_size=BLOCK, backend="native") as s:
        assert s.recovery_report is not None, "a close that failed must not mark the store clean"
        assert s.get(b"k") == value(b"k", 1, 20000)


def test_regression_recovery_drops_records_no_directory_batch_committed(tmp_path: Path,
                                                                        faults: FaultInjector) -> None:
    """A delete whose tombstone reached the block but whose sync failed (so no directory batch named
    it) kept the tombstone through recovery: the directory said present, a rebuild from the blocks
    said deleted. Same for a failed put. Recovery now cuts a block at its committed end."""
    path = tmp_path / "s"
    s = blockstore.open(path, durability="sync", block_size=BLOCK, backend="native")
    s.put(b"k", value(b"k", 1, 3000))
    s.put(b"j", value(b"j", 1, 3000))
    faults.arm(F.SYNC, 1, errno.EIO)
    with pytest.raises(blockstore.IOErrorBS):
        s.delete(b"k")
    faults.arm(F.SYNC, 1, errno.EIO)
    with pytest.raises(blockstore.IOErrorBS):
        s.put(b"j", value(b"j", 2, 3000))
    faults.arm(0, 0, 0)
    assert s.get(b"k") == value(b"k", 1, 3000) and s.get(b"j") == value(b"j", 1, 3000)
    s.abandon()  # kill -9: the failed records are in the page cache, past the committed end
    with blockstore.open(path, durability="sync", block_size=BLOCK, backend="native") as s:
        assert s.recovery_report is not None and s.recovery_report["truncated_bytes"] > 0
        assert s.get(b"k") == value(b"k", 1, 3000) and s.get(b"j") == value(b"j", 1, 3000)
        assert rebuild_violations(s) == []


def test_regression_an_io_error_in_recovery_does_not_drop_a_block(tmp_path: Path, faults: FaultInjector) -> None:
    """Recovery read a block's header under `except BlockstoreError`: an EIO there made it treat the
    block as unparseable, drop every directory entry into it and truncate it to nothing."""
    path = tmp_path / "s"
    s = blockstore.open(path, durability="sync", block_size=BLOCK, backend="native")
    vals = {b"k%d" % i: value(b"k%d" % i, 1, 3000) for i in range(5)}
    s.put_many(list(vals.items()))
    s.abandon()  # its block is left open: the next open scans it
    faults.arm(F.READ, 1, errno.EIO, persistent=True)
    with pytest.raises(blockstore.IOErrorBS):
        blockstore.open(path, durability="sync", block_size=BLOCK, backend="native")
    faults.arm(0, 0, 0)
    with blockstore.open(path, durability="sync", block_size=BLOCK, backend="native") as s:
        assert {k: s.get(k) for k in vals} == vals


# ------------------------------------------------------------------------------------------------
# standalone: the full sweep with a summary


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--full", action="store_true", help="every fault point (default: --points per kind)")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--mode", choices=["sync", "cache"], action="append")
    ap.add_argument("--kind", choices=ALL_KINDS, action="append")
    args = ap.parse_args(list(argv) if argv is not None else None)
    total_bad = 0
    t0 = time.monotonic()
    for mode in args.mode or ["sync", "cache"]:
        for kind in args.kind or ALL_KINDS:
            with tempfile.TemporaryDirectory(prefix="bs-faults-") as work:
                res = sweep(kind, mode, None if args.full else args.points, Path(work))
            print(res.line(), flush=True)
            for v in res.violations[:10]:
                print("   ", v, flush=True)
            total_bad += len(res.violations)
    print(f"total violations {total_bad}; {time.monotonic() - t0:.0f} s", flush=True)
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
