"""The kill -9 crash loop with an expected-state oracle (../shared/notes/reliability.md §3).

Each cycle starts a writer subprocess (tests/crash_writer.py: puts, batched puts, overwrites, deletes,
chunk records, batched reads, with the background compactor copying and reclaiming blocks) on the same
store, and kills it with SIGKILL: after a random delay, or at the Nth firing of a named hook point
(`HOOKS`: the write path, block deletion, every compaction phase, and recovery itself, which the
writer runs when it opens the store its predecessor left; a few timer kills are timed from the
writer's start, so they land anywhere in start-up, open and recovery). The writer journals each operation's intent
before issuing it and its acknowledgement after. The supervisor then copies the store as the kill left
it, opens the copy (recovery), and checks every key and chunk of every namespace (three, each with
small records and large ones) against the journal:

- acknowledged (and no later intent): exactly that value. kill -9 keeps the page cache, so this holds
  in cache mode too;
- pending (intent, no acknowledgement): the previous value or the new one, nothing else;
- acknowledged delete: absent. Anything else is a resurrection;
- every value read is one a put wrote, byte for byte, under that key; a read that raises is a corrupt read;
- the store's own invariants: key listing, session index and record count agree with what was read,
  and a directory rebuilt from the block files agrees with the real one (`rebuild_violations`);
- and it counts the blocks of the namespaces' lineages of large records (placement's `NAME\0\0\0large`),
  so a run can tell that placement did send large records apart while the writers were killed.

What it saw becomes the expected state (pending operations settled) and is handed to the next writer,
which checks its own reads against it. The store itself is never opened by the supervisor, so every
writer recovers what its predecessor left, including a recovery that was itself killed.

    .venv/bin/python tests/crash_loop.py --cycles 1000 --mode sync [--dir DIR] [--seed N]   # or cache, mixed

prints progress and a summary (cycles, acknowledged operations, checks, lost, corrupt reads,
resurrections, invariant violations, kills per hook point, compaction totals); exit status 1 if any
check failed. tests/test_crash.py runs the same `run()`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from compaction_helpers import rebuild_violations  # noqa: E402
from crash_writer import (  # noqa: E402
    OPEN_KW,
    SESSION,
    USER,
    chunk_names,
    key_names,
    parse_chunk,
    parse_value,
    split,
)
from tenant_records import NAMESPACES, large_lineage_blocks  # noqa: E402

import blockstore  # noqa: E402
from blockstore import BlockstoreError  # noqa: E402
from blockstore.directory import Location  # noqa: E402
from blockstore.keys import TAG_KEY  # noqa: E402

WRITER = str(Path(__file__).parent / "crash_writer.py")
ROOT = str(Path(__file__).resolve().parent.parent)
# hook point -> how many of its firings to let pass before the kill (drawn uniformly from the range)
HOOKS: dict[str, tuple[int, int]] = {
    "write.begin": (1, 150),
    "write.appended": (1, 150),
    "write.before_directory": (1, 150),
    "write.committed": (1, 150),
    "block.delete": (1, 6),
    "compact.scan": (1, 8),
    "compact.copy": (1, 8),
    "compact.repoint": (1, 8),
    "compact.reclaim": (1, 4),
    "recovery.scanned": (1, 2),
}
HOOK_SHARE = 0.6  # cycles killed at a hook point; the rest at a random moment
EARLY_SHARE = 0.05  # timer kills timed from the writer's start, not from its open: during open or recovery
OPEN_TIMEOUT_S = 120.0  # a writer that has not opened the store by then is hung: a failure
MODES = ("sync", "cache")
HOOK_DEADLINE_S = 3.0  # a hook not reached by then: killed by the timer (counted apart)


@dataclass
class Summary:
    mode: str
    cycles: int = 0
    acked_ops: int = 0  # acknowledgements the writers journaled
    checks: int = 0  # key and chunk states checked after kills
    acked_checks: int = 0  # ... of which the expected state was fixed by an acknowledgement
    pending_settled: int = 0  # interrupted operations found applied or not (both allowed)
    lost: int = 0
    corrupt_reads: int = 0
    resurrections: int = 0
    invariant_violations: int = 0
    writer_errors: int = 0  # a writer that exited by itself (its own read check failed, or a crash)
    kills: Counter[str] = field(default_factory=Counter)  # hook point (or "timer") -> cycles killed there
    hook_not_reached: Counter[str] = field(default_factory=Counter)  # planned hook kills the timer did
    sessions: Counter[str] = field(default_factory=Counter)  # "writer -> check" durability pairs (mode mixed)
    recoveries: int = 0
    recovered_blocks: int = 0
    truncated_bytes: int = 0
    compaction: dict[str, int] = field(default_factory=dict)  # what the writers' compactors did
    cycles_compacted: int = 0  # cycles in which compaction copied records before the kill
    # blocks of a namespace's lineage of large records (placement_choice.large_lineage) in the checked copy
    cycles_with_large_lineage: int = 0  # cycles whose copy had some
    large_lineage_blocks: int = 0  # the most in one copy
    large_lineage_bytes: int = 0  # ... and the most bytes written in them
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.corrupt_reads or self.resurrections or self.invariant_violations
                    or self.writer_errors)

    def report(self) -> str:
        lines = [
            f"mode {self.mode}: {self.cycles} cycles in {self.seconds:.0f} s",
            f"  acknowledged operations journaled: {self.acked_ops}",
            f"  states checked after kills: {self.checks} ({self.acked_checks} fixed by an acknowledgement, "
            f"{self.pending_settled} interrupted operations settled)",
            f"  lost: {self.lost}   corrupt reads: {self.corrupt_reads}   resurrections: {self.resurrections}   "
            f"invariant violations: {self.invariant_violations}   writer errors: {self.writer_errors}",
            f"  recoveries: {self.recoveries} (blocks scanned {self.recovered_blocks}, "
            f"torn bytes truncated {self.truncated_bytes})",
            "  kills per hook point: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items())),
        ]
        if self.hook_not_reached:
            lines.append("  hook kills not reached in time (killed by the timer instead): "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.hook_not_reached.items())))
        lines.append("  compaction (as the writers' compactors reported before each kill): "
                     + ", ".join(f"{k} {v}" for k, v in self.compaction.items())
                     + f"; records copied in {self.cycles_compacted} of {self.cycles} cycles")
        lines.append(f"  blocks of a namespace's large-record lineage: in {self.cycles_with_large_lineage} of "
                     f"{self.cycles} checked stores, at most {self.large_lineage_blocks} "
                     f"({self.large_lineage_bytes:,} bytes written)")
        for f in self.failures[:20]:
            lines.append(f"  FAIL {f}")
        return "\n".join(lines)


class Oracle:
    """Per name (<namespace>/<key>, <namespace>/c<n>), the versions a correct store may hold; None = absent."""

    def __init__(self) -> None:
        self.allowed: dict[str, set[int | None]] = {}
        self.by_ack: set[str] = set()  # names whose single allowed value an acknowledgement fixed
        self.acked_ops = 0

    def feed(self, line: str) -> None:
        phase, op, name, v = line.split()
        new = None if op in ("del", "cdel") else int(v)
        if phase == "I":
            self.allowed[name] = self.allowed.get(name, {None}) | {new}
            self.by_ack.discard(name)
        else:
            self.allowed[name] = {new}
            self.by_ack.add(name)
            self.acked_ops += 1

    def get(self, name: str) -> set[int | None]:
        return self.allowed.get(name, {None})

    def settle(self, name: str, seen: int | None) -> None:
        self.allowed[name] = {seen}

    def expected(self) -> dict[str, int | None]:
        return {n: next(iter(a)) for n, a in self.allowed.items() if len(a) == 1}


_COMPACTION_FIELDS = ["passes", "gc_bytes", "relocated_bytes", "blocks_reclaimed"]


def _compaction(output: str, summary: Summary) -> None:
    """Add what a writer's compactor did between its first and last report to the summary."""
    lines = [ln.split()[1:] for ln in output.splitlines() if ln.startswith("compaction ")]
    if not lines:
        return
    first, last = [int(x) for x in lines[0]], [int(x) for x in lines[-1]]
    delta = [last[0]] + [b - a for a, b in zip(first[1:], last[1:])]
    for name, v in zip(_COMPACTION_FIELDS, delta):
        summary.compaction[name] = summary.compaction.get(name, 0) + v
    if delta[1] or delta[2]:
        summary.cycles_compacted += 1


def _read_namespace(s: blockstore.Store, ns: str, observed: dict[str, int | None], present_kv: list[bytes],
                    present_chunks: set[str], fail: Callable[[str, str], None]) -> None:
    """Read every record of namespace `ns` (its KV records in one batched read) into `observed` (name ->
    version or None), the readable ones into `present_kv` (keys) and `present_chunks` (names)."""
    names = key_names(ns)
    try:
        got = s.get_many([split(n)[1] for n in names], ns=ns)
    except BlockstoreError as exc:
        fail("corrupt_reads", f"{ns}: batched read raised {exc!r}")
        return
    for name, g in zip(names, got):
        seen: int | None = None
        if g is not None:
            parsed = parse_value(bytes(g))
            if parsed is None or parsed[0] != name:
                fail("corrupt_reads", f"{name}: {len(g)} bytes that no put of this key wrote"
                                      + (f" (a put of {parsed[0]})" if parsed else ""))
                continue
            seen = parsed[1]
            present_kv.append(split(name)[1])
        observed[name] = seen
    for name in chunk_names(ns):
        try:
            ch = s.get_chunk(USER, SESSION, split(name)[1].decode(), ns=ns)
        except BlockstoreError as exc:
            fail("corrupt_reads", f"{name}: read raised {exc!r}")
            continue
        if ch is None:
            observed[name] = None
            continue
        pc = parse_chunk(ch.text)
        if pc is None or pc[0] != name:
            fail("corrupt_reads", f"{name}: text {ch.text[:30]!r} that no put of this chunk wrote")
            continue
        observed[name] = pc[1]
        present_chunks.add(name)


def verify(path: Path, mode: str, oracle: Oracle, summary: Summary, where: str) -> None:
    """Open (recovery) and check the copy of a killed store; settle what was pending."""
    def fail(kind: str, msg: str) -> None:
        setattr(summary, kind, getattr(summary, kind) + 1)
        summary.failures.append(f"{where}: {msg}")

    try:
        s = blockstore.open(path, durability=mode, **OPEN_KW)
    except BlockstoreError as exc:
        fail("invariant_violations", f"recovery failed: {exc!r}")
        return
    try:
        rep = s.recovery_report
        if rep is not None:
            summary.recoveries += 1
            summary.recovered_blocks += len(rep["scanned_blocks"])
            summary.truncated_bytes += rep["truncated_bytes"]
        observed: dict[str, int | None] = {}
        present: dict[str, list[bytes]] = {}  # namespace -> its readable keys
        present_chunks: dict[str, set[str]] = {}
        for ns in NAMESPACES:
            _read_namespace(s, ns, observed, present.setdefault(ns, []), present_chunks.setdefault(ns, set()), fail)
        for name, seen in observed.items():
            allowed = oracle.get(name)
            summary.checks += 1
            if name in oracle.by_ack:
                summary.acked_checks += 1
            if seen not in allowed:
                if allowed == {None}:
                    fail("resurrections", f"{name}: deleted, yet version {seen} is back")
                elif seen is None:
                    fail("lost", f"{name}: acknowledged version {sorted(allowed, key=str)} lost (absent)")
                else:
                    fail("lost", f"{name}: holds version {seen}, allowed {sorted(allowed, key=str)}")
            elif len(allowed) > 1:
                summary.pending_settled += 1
            oracle.settle(name, seen)
        for ns in NAMESPACES:
            listed = {f"{ns}/{c.chunk_id}" for c in s.list_chunks(USER, SESSION, ns=ns)}
            if listed != present_chunks[ns]:
                fail("invariant_violations", f"{ns}: session index lists {sorted(listed)}, "
                                             f"records {sorted(present_chunks[ns])}")
            keys = sorted(s.iter_keys(ns=ns))
            if keys != sorted(present[ns]):
                fail("invariant_violations", f"{ns}: iter_keys lists {len(keys)} keys, {len(present[ns])} are readable")
        # block counters count places: a key's copies (docs/copies.md) are records of their blocks too
        copies = sum(len(Location.decode(v).copies) for _k, v in s.dir.scan_prefix(TAG_KEY))
        readable = sum(map(len, present.values())) + sum(map(len, present_chunks.values()))
        if s.stats().records != readable + copies:
            fail("invariant_violations", f"block counters say {s.stats().records} records, {readable} are readable "
                                         f"(+{copies} copies)")
        blocks, nbytes = large_lineage_blocks(s)  # placement did put some namespace's large records apart
        summary.large_lineage_blocks = max(summary.large_lineage_blocks, blocks)
        summary.cycles_with_large_lineage += blocks > 0
        summary.large_lineage_bytes = max(summary.large_lineage_bytes, nbytes)
        for v in rebuild_violations(s):
            fail("invariant_violations", f"rebuild from blocks: {v}")
    finally:
        s.close()


def _plan(rng: random.Random, hook_cycles: int) -> tuple[str | None, int]:
    """(hook point to kill at, or None for a timer kill; the firing count, or for a timer kill 1 if it
    is timed from the writer's start). Hook points take turns, so each gets its share of kills."""
    if rng.random() >= HOOK_SHARE:
        return None, int(rng.random() < EARLY_SHARE / (1 - HOOK_SHARE))
    hook = list(HOOKS)[hook_cycles % len(HOOKS)]
    lo, hi = HOOKS[hook]
    return hook, rng.randint(lo, hi)


def run(work: Path, mode: str, cycles: int, *, seed: int = 1, threads: int = 2,
        progress: Callable[[str], None] | None = None, progress_every: int = 10,
        keep_going: bool = False) -> Summary:
    """`cycles` kill -9 cycles on the store under `work` (created if missing); returns the summary."""
    work.mkdir(parents=True, exist_ok=True)
    store, journal, expected = work / "store", work / "journal", work / "expected.json"
    journal.touch()
    rng = random.Random(seed)
    oracle = Oracle()
    summary = Summary(mode)
    offset = 0
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    hook_cycles = 0
    for cycle in range(1, cycles + 1):
        hook, after = _plan(rng, hook_cycles)
        hook_cycles += hook is not None
        # mixed: each writer, and each check's open, picks its durability, so every recovery may run in the
        # other mode than the session it recovers (recovery must hold that session to its own mode)
        writer_mode, verify_mode = (mode, mode) if mode != "mixed" else (rng.choice(MODES), rng.choice(MODES))
        summary.sessions[f"{writer_mode} -> {verify_mode}"] += 1
        expected.write_text(json.dumps(oracle.expected()))
        args = [sys.executable, WRITER, "--store", str(store), "--journal", str(journal), "--mode", writer_mode,
                "--seed", str(rng.randrange(2**31)), "--cycle", str(cycle), "--expected", str(expected),
                "--threads", str(threads)]
        if hook:
            args += ["--kill-hook", hook, "--kill-after", str(after)]
        early = hook is None and after == 1
        started = time.monotonic()
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        assert p.stdout is not None and p.stderr is not None
        hung = False
        if early:  # anywhere in start-up, open and recovery, or the first writes
            first = ""
            deadline = started + rng.uniform(0.1, 0.8)
        else:
            # the clock starts once the writer has the store open (its start-up alone can outlast a
            # short delay on a loaded machine); a recovery.scanned kill happens before that line
            ready, _, _ = select.select([p.stdout], [], [], OPEN_TIMEOUT_S)
            first = p.stdout.readline().decode().strip() if ready else ""
            hung = not ready
            deadline = time.monotonic() + (HOOK_DEADLINE_S if hook else rng.uniform(0.05, 2.0))
        while time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        rest = p.stdout.read().decode()
        err = p.stderr.read().decode()
        p.stdout.close()
        p.stderr.close()
        timer = "timer (from start)" if early else "timer"
        where = f"cycle {cycle} ({hook or timer})" + (f" [{writer_mode} -> {verify_mode}]" if mode == "mixed" else "")
        _compaction(rest, summary)
        at_hook = f"killed-at {hook}" in (first + "\n" + rest) if hook else False
        if hung:
            summary.writer_errors += 1
            summary.failures.append(f"{where}: writer did not open the store in {OPEN_TIMEOUT_S:.0f} s")
        elif p.returncode != -signal.SIGKILL:
            summary.writer_errors += 1
            summary.failures.append(f"{where}: writer exited by itself ({p.returncode}): {err.strip()[-2000:]}")
        elif at_hook:
            summary.kills[hook or timer] += 1
        else:
            summary.kills[timer] += 1
            if hook:
                summary.hook_not_reached[hook] += 1
        with journal.open("rb") as j:
            j.seek(offset)
            data = j.read()
        whole = data[: data.rfind(b"\n") + 1]  # a line is one write(2): never torn by kill -9
        offset += len(whole)
        for line in whole.decode().splitlines():
            oracle.feed(line)
        summary.acked_ops = oracle.acked_ops
        # check a copy: the store itself is left as the kill left it, for the next writer to recover
        copy = work / "verify"
        shutil.rmtree(copy, ignore_errors=True)
        if store.exists():
            shutil.copytree(store, copy)
            verify(copy, verify_mode, oracle, summary, where)
        elif oracle.acked_ops:  # a store that acknowledged writes cannot be gone
            summary.invariant_violations += 1
            summary.failures.append(f"{where}: the store folder is gone after {oracle.acked_ops} acknowledged ops")
        # else: killed before it made the store folder (an early kill on a loaded machine): nothing to check
        shutil.rmtree(copy, ignore_errors=True)
        summary.cycles = cycle
        summary.seconds = time.monotonic() - t0
        if progress and (cycle % progress_every == 0 or cycle == cycles or not summary.ok):
            progress(f"[{cycle}/{cycles}] {summary.seconds:.0f} s  acked {summary.acked_ops}  "
                     f"checks {summary.checks}  lost {summary.lost}  corrupt {summary.corrupt_reads}  "
                     f"resurrected {summary.resurrections}  invariant {summary.invariant_violations}  "
                     f"writer errors {summary.writer_errors}  compaction {summary.compaction}")
        if not summary.ok and not keep_going:
            break  # keep the store and journal as they are, for a post-mortem
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill -9 crash loop with an expected-state oracle")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--mode", choices=[*MODES, "mixed"], default="sync",
                    help="the writers' and the checks' durability; mixed: each picks one at random")
    ap.add_argument("--dir", help="work directory (store, journal); default: a new temporary one, "
                                  "removed after a clean run")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress-every", type=int, default=10)
    ap.add_argument("--keep-going", action="store_true", help="continue past a failed check")
    ap.add_argument("--json", help="also write the summary here as JSON")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bs-crash-"))
    print(f"crash loop: {args.cycles} cycles, mode {args.mode}, seed {seed}, work {work}", flush=True)
    summary = run(work, args.mode, args.cycles, seed=seed, threads=args.threads,
                  progress=lambda m: print(m, flush=True), progress_every=args.progress_every,
                  keep_going=args.keep_going)
    print(summary.report(), flush=True)
    if args.json:
        # not asdict(): it rebuilds a Counter from (key, value) pairs, counting the pairs as keys
        d: dict[str, Any] = {f.name: getattr(summary, f.name) for f in fields(summary)}
        d.update(kills=dict(summary.kills), hook_not_reached=dict(summary.hook_not_reached), seed=seed,
                 ok=summary.ok)
        Path(args.json).write_text(json.dumps(d, indent=2, default=str))
    if summary.ok and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
