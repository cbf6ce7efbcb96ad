"""Writer subprocess of the kill -9 crash loop (tests/crash_loop.py). Not a test module.

Opens the store with the background compactor running eagerly (small blocks, a low invalid-ratio
threshold, no write budget, short pass interval: it copies and reclaims blocks all through the run),
prints "opened", then runs writer threads until it is killed. Every operation goes to one of three
namespaces (tenant_records.NAMESPACES), each with small records and large ones (1/16 of the block or
more): puts and batched puts into several partitions (the chunk session's among them), overwrites,
deletes, chunk records put, updated (new timestamps: the session index moves) and deleted, batched
reads of fixed groups of small and large records (which teach compaction what to relocate and copy),
and batched reads of small records drawn at random (on which placement sends a namespace's large
records to a lineage of their own, `NAME\0\0\0large`: the supervisor counts those blocks). Each
thread owns a disjoint set of records in every namespace, so every record's operations are sequential.

Every mutation is journaled before it is issued (`I op name version`, a name is `<namespace>/<key>`)
and after it is acknowledged (`A op name version`), each line one O_APPEND write(2), so kill -9 loses
no line the writer finished. Values are derived from (name, version) and name both, so the supervisor
can tell a lost write from a stale one, from another namespace's or key's bytes, from corrupt bytes. The supervisor passes the state it verified after the last kill
(`--expected`, JSON name -> version or null); the writer checks its own reads against it and exits 3
on a mismatch ("nothing corrupt is read", also while compaction moves records under the readers).

With `--kill-hook NAME --kill-after N` the writer kills itself (SIGKILL) at the Nth firing of that
named hook point (blockstore/hooks.py), printing "killed-at NAME" first; `recovery.scanned` fires
during the open, i.e. inside recovery. Every 100 ms it prints the compactor's running totals
(`compaction PASSES GC_BYTES RELOCATED_BYTES BLOCKS_RECLAIMED`; all but passes count since the store
was created, as persisted, plus this process's work).

    python tests/crash_writer.py --store S --journal J --mode sync --seed 1 --cycle 3 \\
        [--expected E.json] [--kill-hook write.appended --kill-after 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import traceback
from typing import Any

import blockstore
from blockstore import hooks
from blockstore.errors import BlockstoreError
from blockstore.keys import SPACE_KV, key_suffix

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tenant_records import NAMESPACES, draw, large_size  # noqa: E402

BLOCK_SIZE = 256 << 10
# per namespace (tenant_records.NAMESPACES): small records, and large ones (1/16 of the block or more: where the
# namespace's reads draw among its small records, placement writes them to a lineage of their own)
SMALL_KEYS, LARGE_KEYS, CHUNKS = 16, 6, 4
SMALL_SIZES = [100, 1000, 3000, 9000]
LARGE_SIZES = [large_size(BLOCK_SIZE), 40_000, 90_000, 150_000]
USER, SESSION = "u", "s"
# compaction that moves data all the time: every sealed block with 10 % dead bytes is a GC victim, a
# group read once is due for relocation, no budget, a pass every 50 ms, copies unpaced
COMPACTION: dict[str, Any] = {
    "policy": "full", "gc_invalid_ratio": 0.1, "min_hits": 1, "relocation_slack": 0,
    "relocation_budget": float("inf"), "gc_budget": float("inf"), "interval_s": 0.05, "rate_mb_s": 10_000.0,
    # copies of records several groups read (docs/copies.md), wherever the writer retires them with their key
    "max_copies": 1,
}
OPEN_KW: dict[str, Any] = {"block_size": BLOCK_SIZE, "max_open_blocks": 4, "idle_seal_seconds": 1.0}
# groups read together in every namespace, each of small and large records (relocation and copies move both);
# each thread reads only the groups of the keys it owns (with 2 threads: even numbers, odd numbers)
GROUPS = [["s0", "s2", "L0", "s4"], ["s6", "L2", "s8"], ["L4", "s10", "s12"],
          ["s1", "s3", "L1"], ["s5", "L3", "s7", "s9"], ["L5", "s11", "s13"]]
# a write's partition: none (the namespace), callers' partitions, or the chunk session's (KV beside its chunks);
# requests read across many of them, so placement soon writes a namespace as one lineage (placement_choice.py)
PARTITIONS: list[str | bytes | None] = [None, *(f"p{i}" for i in range(8)),
                                        blockstore.Store.session_partition(USER, SESSION)]


def key_names(ns: str) -> list[str]:
    """Every KV record name of a namespace: "<ns>/s<i>" (small), "<ns>/L<i>" (large)."""
    return [f"{ns}/s{i}" for i in range(SMALL_KEYS)] + [f"{ns}/L{i}" for i in range(LARGE_KEYS)]


def chunk_names(ns: str) -> list[str]:
    return [f"{ns}/c{i}" for i in range(CHUNKS)]


ALL_KEYS = [n for ns in NAMESPACES for n in key_names(ns)]
ALL_CHUNKS = [n for ns in NAMESPACES for n in chunk_names(ns)]


def split(name: str) -> tuple[str, bytes]:
    """(namespace, key) of a record name: "t1/s3" -> ("t1", b"s3")."""
    ns, key = name.split("/", 1)
    return ns, key.encode()


def value_for(name: str, version: int) -> bytes:
    """The payload of put (name, version): names both, then bytes derived from them (large for an L key)."""
    rng = random.Random(f"{name}#{version}")
    head = f"{name}|v{version}|".encode()
    return head + rng.randbytes(rng.choice(LARGE_SIZES if "/L" in name else SMALL_SIZES))


def parse_value(raw: bytes) -> tuple[str, int] | None:
    """(name, version) of a payload `value_for` wrote, or None if these bytes are not one."""
    try:
        n, v, _rest = raw[:60].split(b"|", 2)
        name, version = n.decode(), int(v[1:])
    except (ValueError, UnicodeDecodeError):
        return None
    return (name, version) if v[:1] == b"v" and "/" in name and value_for(name, version) == raw else None


def chunk_text(name: str, version: int) -> str:
    return f"chunk {name} version {version} " + "remembered " * (version % 50)


def parse_chunk(text: str) -> tuple[str, int] | None:
    parts = text.split(" ", 4)
    try:
        name, version = parts[1], int(parts[3])
    except (IndexError, ValueError):
        return None
    return (name, version) if chunk_text(name, version) == text else None


class Writer:
    def __init__(self, store: blockstore.Store, journal_fd: int, cycle: int, expected: dict[str, int | None]) -> None:
        self.s = store
        self.fd = journal_fd
        self.base = cycle * 1_000_000  # versions unique across cycles without reading the journal
        self.counter = 0
        self.lock = threading.Lock()
        self.state: dict[str, int | None] = dict(expected)  # what each name holds (acked)

    def journal(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def version(self) -> int:
        with self.lock:
            self.counter += 1
            return self.base + self.counter

    def fail(self, what: str) -> None:
        sys.stderr.write(f"READ-MISMATCH {what}\n")
        sys.stderr.flush()
        os._exit(3)

    def put(self, ns: str, names: list[str], partition: str | bytes | None, one: bool = False) -> None:
        """Put new versions of `names` (all of `ns`) in one call, journaled before and after."""
        vs = [self.version() for _ in names]
        for n, v in zip(names, vs):
            self.journal(f"I put {n} {v}")
        if one:
            self.s.put(split(names[0])[1], value_for(names[0], vs[0]), ns=ns)
        else:
            self.s.put_many([(split(n)[1], value_for(n, v)) for n, v in zip(names, vs)], ns=ns, partition=partition)
        for n, v in zip(names, vs):
            self.journal(f"A put {n} {v}")
            self.state[n] = v

    def run(self, rng: random.Random, owned: set[str]) -> None:
        """Operations on the records of every namespace this thread owns (`owned`: names)."""
        keys = {ns: [n for n in key_names(ns) if n in owned] for ns in NAMESPACES}
        chunks = {ns: [n for n in chunk_names(ns) if n in owned] for ns in NAMESPACES}
        groups = {ns: [[f"{ns}/{k}" for k in g] for g in GROUPS if all(f"{ns}/{k}" in owned for k in g)]
                  for ns in NAMESPACES}
        while True:
            op = rng.random()
            ns = rng.choice(NAMESPACES)
            if op < 0.28:
                self.put(ns, rng.sample(keys[ns], rng.randint(1, 4)), rng.choice(PARTITIONS))
            elif op < 0.38:
                self.put(ns, [rng.choice(keys[ns])], None, one=True)
            elif op < 0.48:  # small and large records alike
                n = rng.choice(keys[ns])
                self.journal(f"I del {n} 0")
                self.s.delete(split(n)[1], ns=ns)
                self.journal(f"A del {n} 0")
                self.state[n] = None
            elif op < 0.56:
                n = rng.choice(chunks[ns])
                v = self.version()
                self.journal(f"I chunk {n} {v}")
                self.s.put_chunk(USER, SESSION, split(n)[1].decode(), chunk_text(n, v), ts_ns=v,
                                 meta={"v": v}, kv_keys=[split(n)[1].replace(b"c", b"s")], ns=ns)
                self.journal(f"A chunk {n} {v}")
                self.state[n] = v
            elif op < 0.60:
                n = rng.choice(chunks[ns])
                self.journal(f"I cdel {n} 0")
                self.s.delete_chunk(USER, SESSION, split(n)[1].decode(), ns=ns)
                self.journal(f"A cdel {n} 0")
                self.state[n] = None
            else:
                self.check_reads(rng, ns, keys[ns], chunks[ns], groups[ns])

    def check(self, ns: str, names: list[str], *, batched: bool) -> None:
        """Read `names` (of `ns`) in one request or one by one; exit 3 on a value other than the state's."""
        if batched:
            got = self.s.get_many([split(n)[1] for n in names], ns=ns)
        else:
            got = [self.s.get(split(n)[1], ns=ns) for n in names]
        for n, g in zip(names, got):
            want = self.state.get(n)
            seen = None if g is None else parse_value(bytes(g))
            if (g is None) != (want is None) or (g is not None and seen != (n, want)):
                self.fail(f"{n}: expected version {want}, read {seen if g is not None else 'absent'}")

    def check_reads(self, rng: random.Random, ns: str, keys: list[str], chunks: list[str],
                    groups: list[list[str]]) -> None:
        r = rng.random()
        if groups and r < 0.35:  # a group of small and large records: compaction learns it from the batched read
            self.check(ns, rng.choice(groups), batched=True)
        elif r < 0.8:  # single reads of any keys (a one-key request teaches compaction nothing)
            self.check(ns, rng.sample(keys, 3), batched=False)
        # small records drawn at random: placement puts the namespace's large records apart
        self.check(ns, [n.decode() for n in draw(rng, [n.encode() for n in keys if "/s" in n], 6)], batched=True)
        n = rng.choice(chunks)
        ch = self.s.get_chunk(USER, SESSION, split(n)[1].decode(), ns=ns)
        want = self.state.get(n)
        seen = None if ch is None else parse_chunk(ch.text)
        if (ch is None) != (want is None) or (ch is not None and seen != (n, want)):
            self.fail(f"{n}: expected version {want}, read {seen if ch is not None else 'absent'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--journal", required=True)
    ap.add_argument("--mode", choices=["sync", "cache"], required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--cycle", type=int, required=True)
    ap.add_argument("--expected")
    ap.add_argument("--kill-hook")
    ap.add_argument("--kill-after", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.kill_hook:
        count = [0]
        hook = args.kill_hook

        def maybe_die(*_a: object) -> None:
            count[0] += 1
            if count[0] >= args.kill_after:
                os.write(1, f"killed-at {hook}\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.register(hook, maybe_die)
    expected: dict[str, int | None] = {}
    if args.expected and os.path.exists(args.expected):
        with open(args.expected, encoding="utf-8") as f:
            expected = json.load(f)
    fd = os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    store = blockstore.open(args.store, durability=args.mode, compaction=COMPACTION, **OPEN_KW)
    print("opened", flush=True)  # the supervisor's kill timer starts here, not at process start
    w = Writer(store, fd, args.cycle, expected)
    rng = random.Random(args.seed)

    def thread_main(t: int) -> None:
        try:
            # a thread owns the records of number i (s<i>, L<i>, c<i>) with i % threads == t, in every namespace
            owned = {n for n in ALL_KEYS + ALL_CHUNKS if int(n.rsplit("/", 1)[1][1:]) % args.threads == t}
            w.run(random.Random(rng.randrange(2**62) + t), owned)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(2)

    def report_compaction() -> None:
        # what the compactor has done in this process, for the supervisor's summary (the totals it
        # persists lag behind: they are written after each pass, and a kill often comes first)
        while True:
            c = store.compactor
            if c is not None:  # running totals (loaded from the store at open, so report the change)
                os.write(1, f"compaction {c.passes} {c.gc_bytes} {c.relocated_bytes} {c.reclaimed}\n".encode())
            threading.Event().wait(0.1)

    def place_copies() -> None:
        # copies of any key (docs/copies.md), racing the writers' puts and deletes and the compactor: a
        # copy computed from a value a writer replaced meanwhile must write nothing, and the writers'
        # reads must never see its bytes (invariant 8); some copies are dropped again, as GC does
        crng = random.Random(args.seed ^ 0x5EED)
        try:
            while True:
                ns, key = split(crng.choice(ALL_KEYS))  # small and large records of every namespace
                nid = store.namespace_id(ns)
                if nid is None:  # not written yet
                    threading.Event().wait(0.005)
                    continue
                sfx = key_suffix(nid, SPACE_KV, key)
                value = store.dir.get_locations([sfx])[0]
                if value is not None and not value.copies:
                    try:
                        payload = store.read_locations([value.primary()])[0]
                    except BlockstoreError:
                        continue  # its block went (a writer or GC emptied it): nothing to copy
                    store.place_copies([(sfx, value, payload)], partition=b"copies")
                elif value is not None and crng.random() < 0.3:
                    store.place_copies([], partition=b"copies", drops=[(sfx, value, value.places()[-1])])
                threading.Event().wait(0.005)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(2)

    threads = [threading.Thread(target=thread_main, args=(t,), daemon=True) for t in range(args.threads)]
    threads.append(threading.Thread(target=report_compaction, daemon=True))
    threads.append(threading.Thread(target=place_copies, daemon=True))
    for th in threads:
        th.start()
    for th in threads:
        th.join()  # never returns: the writers run until the kill


if __name__ == "__main__":
    main()
