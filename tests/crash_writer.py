"""Writer subprocess of the kill -9 crash loop (tests/crash_loop.py). Not a test module.

Opens the store with the background compactor running eagerly (small blocks, a low invalid-ratio
threshold, no write budget, short pass interval: it copies and reclaims blocks all through the run),
prints "opened", then runs writer threads until it is killed: puts and batched puts into several
partitions, overwrites, deletes, chunk records put, updated (new timestamps: the session index moves)
and deleted, and batched reads of fixed groups (which teach compaction what to relocate). Each
thread owns a disjoint set of keys, so every key's operations are sequential.

Every mutation is journaled before it is issued (`I op name version`) and after it is acknowledged
(`A op name version`), each line one O_APPEND write(2), so kill -9 loses no line the writer finished.
Values are derived from (key, version) and name both, so the supervisor can tell a lost write from a
stale one from corrupt bytes. The supervisor passes the state it verified after the last kill
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

KEYS = 40
CHUNKS = 8
BLOCK_SIZE = 256 << 10
SIZES = [100, 3000, 20_000, 60_000, 150_000]
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
# groups read together (key numbers); each thread reads only the groups of the keys it owns
GROUPS = [[0, 2, 4, 6], [8, 10, 12], [14, 16, 18, 20, 22], [1, 3, 5], [7, 9, 11, 13], [15, 17, 19, 21]]


def key_name(k: int) -> str:
    return f"k{k}"


def chunk_name(c: int) -> str:
    return f"c{c}"


def value_for(key: int, version: int) -> bytes:
    """The payload of put (key, version): names both, then bytes derived from them."""
    rng = random.Random(key * 1_000_003 + version)
    head = b"k%d|v%d|" % (key, version)
    return head + rng.randbytes(rng.choice(SIZES))


def parse_value(raw: bytes) -> tuple[int, int] | None:
    """(key, version) of a payload `value_for` wrote, or None if these bytes are not one."""
    try:
        k, v, _rest = raw[:40].split(b"|", 2)
        key, version = int(k[1:]), int(v[1:])
    except ValueError:
        return None
    return (key, version) if k[:1] == b"k" and v[:1] == b"v" and value_for(key, version) == raw else None


def chunk_text(c: int, version: int) -> str:
    return f"chunk {c} version {version} " + "remembered " * (version % 50)


def parse_chunk(text: str) -> tuple[int, int] | None:
    parts = text.split(" ", 4)
    try:
        c, version = int(parts[1]), int(parts[3])
    except (IndexError, ValueError):
        return None
    return (c, version) if chunk_text(c, version) == text else None


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

    def run(self, rng: random.Random, keys: list[int], chunks: list[int]) -> None:
        groups = [g for g in GROUPS if all(k in keys for k in g)]
        while True:
            op = rng.random()
            if op < 0.40:
                batch = rng.sample(keys, rng.randint(1, 4))
                vs = [self.version() for _ in batch]
                for k, v in zip(batch, vs):
                    self.journal(f"I put {key_name(k)} {v}")
                part = rng.choice([None, "p1", "p2", "p3"])
                self.s.put_many([(b"k%d" % k, value_for(k, v)) for k, v in zip(batch, vs)], partition=part)
                for k, v in zip(batch, vs):
                    self.journal(f"A put {key_name(k)} {v}")
                    self.state[key_name(k)] = v
            elif op < 0.55:
                k = rng.choice(keys)
                v = self.version()
                self.journal(f"I put {key_name(k)} {v}")
                self.s.put(b"k%d" % k, value_for(k, v))
                self.journal(f"A put {key_name(k)} {v}")
                self.state[key_name(k)] = v
            elif op < 0.70:
                k = rng.choice(keys)
                self.journal(f"I del {key_name(k)} 0")
                self.s.delete(b"k%d" % k)
                self.journal(f"A del {key_name(k)} 0")
                self.state[key_name(k)] = None
            elif op < 0.80:
                c = rng.choice(chunks)
                v = self.version()
                self.journal(f"I chunk {chunk_name(c)} {v}")
                self.s.put_chunk(USER, SESSION, chunk_name(c), chunk_text(c, v), ts_ns=v,
                                 meta={"v": v}, kv_keys=[b"k%d" % c])
                self.journal(f"A chunk {chunk_name(c)} {v}")
                self.state[chunk_name(c)] = v
            elif op < 0.85:
                c = rng.choice(chunks)
                self.journal(f"I cdel {chunk_name(c)} 0")
                self.s.delete_chunk(USER, SESSION, chunk_name(c))
                self.journal(f"A cdel {chunk_name(c)} 0")
                self.state[chunk_name(c)] = None
            else:
                self.check_reads(rng, keys, chunks, groups)

    def check_reads(self, rng: random.Random, keys: list[int], chunks: list[int], groups: list[list[int]]) -> None:
        if groups and rng.random() < 0.7:
            group = rng.choice(groups)  # a batched read: compaction learns the group from it
            got = self.s.get_many([b"k%d" % k for k in group])
        else:  # single reads of any keys (a one-key request teaches compaction nothing)
            group = rng.sample(keys, 3)
            got = [self.s.get(b"k%d" % k) for k in group]
        for k, g in zip(group, got):
            want = self.state.get(key_name(k))
            seen = None if g is None else parse_value(bytes(g))
            if (g is None) != (want is None) or (g is not None and seen != (k, want)):
                self.fail(f"{key_name(k)}: expected version {want}, read {seen if g is not None else 'absent'}")
        c = rng.choice(chunks)
        ch = self.s.get_chunk(USER, SESSION, chunk_name(c))
        want = self.state.get(chunk_name(c))
        seen = None if ch is None else parse_chunk(ch.text)
        if (ch is None) != (want is None) or (ch is not None and seen != (c, want)):
            self.fail(f"{chunk_name(c)}: expected version {want}, read {seen if ch is not None else 'absent'}")


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
            keys = [k for k in range(KEYS) if k % args.threads == t]
            chunks = [c for c in range(CHUNKS) if c % args.threads == t]
            w.run(random.Random(rng.randrange(2**62) + t), keys, chunks)
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
        nid = store.namespace_id("default") or 0
        try:
            while True:
                sfx = key_suffix(nid, SPACE_KV, b"k%d" % crng.randrange(KEYS))
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
