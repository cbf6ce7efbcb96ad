"""The mutation loop for sanitizer runs (`fuzz/run.py --sanitize`), where libFuzzer cannot be used.

Why not libFuzzer there: the sanitized C core needs gcc's ASan runtime preloaded into the (not
instrumented) Python interpreter, and that runtime defines the `__sanitizer_cov_*` callbacks itself,
so atheris' Python coverage reaches ASan's stubs instead of libFuzzer: libFuzzer sees no coverage and
keeps a single input of the corpus (atheris' fix, libFuzzer linked into Python with clang, is not
available with gcc). So this loop does what libFuzzer would do without feedback: it runs every corpus
input once (the coverage-guided runs' corpus, fuzz/out/<target>/corpus, holds the inputs that reached
new Python branches, which through the pure-Python twin stand for the C parsers' branches), then
mutates random corpus inputs (bit flips, interesting integers at random offsets, inserts, erases,
copies, splices). The targets' checksum fix-ups keep mutated records well-formed enough to go deep.

Takes the libFuzzer flags the runner passes (-runs=, -max_total_time=, -max_len=, -seed=,
-artifact_prefix=) and corpus directories or single files (files: run each once, as libFuzzer does).
A Python exception is written as crash-<sha1> and the loop exits 77 (as atheris does); a sanitizer
report aborts the process, and the input it was running is left in <artifact_prefix>current-input,
which the runner renames to crash-<sha1>.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
import traceback
from collections.abc import Callable

INTERESTING = [0, 1, 2, 7, 8, 63, 64, 65, 127, 128, 255, 256, 4095, 4096, 4097, 65535, 65536, 65537,
               0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF]


def _flags(args: list[str]) -> tuple[dict[str, str], list[str]]:
    flags, paths = {}, []
    for a in args:
        if a.startswith("-") and "=" in a:
            k, v = a[1:].split("=", 1)
            flags[k] = v
        elif not a.startswith("-"):
            paths.append(a)
    return flags, paths


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], max_len: int) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(b)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # a random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n:  # an interesting integer, 1/2/4/8 bytes little-endian
            width = rng.choice((1, 2, 4, 8))
            i = rng.randrange(n)
            v = rng.choice(INTERESTING) + rng.choice((-1, 0, 0, 1))
            b[i : i + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
        elif op == 3:  # insert random or repeated bytes
            i = rng.randrange(n + 1)
            k = rng.randint(1, 32)
            b[i:i] = bytes([rng.randrange(256)]) * k if rng.random() < 0.5 else rng.randbytes(k)
        elif op == 4 and n > 1:  # erase a range
            i = rng.randrange(n)
            del b[i : i + rng.randint(1, max(1, n // 8))]
        elif op == 5 and n > 1:  # copy a range elsewhere
            i, j = rng.randrange(n), rng.randrange(n)
            k = rng.randint(1, max(1, n // 8))
            b[j : j + k] = b[i : i + k]
        elif op == 6 and corpus:  # splice with another input
            other = rng.choice(corpus)
            cut = rng.randrange(len(b) + 1)
            b = b[:cut] + other[rng.randrange(len(other) + 1) :]
        elif op == 7 and n:  # truncate
            del b[rng.randrange(n) :]
    return bytes(b[:max_len])


def _crash(data: bytes, prefix: str) -> str:
    path = f"{prefix}crash-{hashlib.sha1(data).hexdigest()}"
    with open(path, "wb") as f:
        f.write(data)
    return path


def run(test_one_input: Callable[[bytes], None], args: list[str]) -> int:
    flags, paths = _flags(args)
    prefix = flags.get("artifact_prefix", "./")
    if all(os.path.isfile(p) for p in paths) and paths:  # reproduce: each file once
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            print(f"Running: {p}", file=sys.stderr, flush=True)
            test_one_input(data)
            print(f"Executed {p}", file=sys.stderr, flush=True)
        return 0
    max_len = int(flags.get("max_len", "4096"))
    runs = int(flags.get("runs", "-1"))
    seconds = float(flags.get("max_total_time", "0"))
    rng = random.Random(int(flags.get("seed", "0")) or None)
    corpus: list[bytes] = []
    for d in paths:
        for name in sorted(os.listdir(d)):
            full = os.path.join(d, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    corpus.append(f.read()[:max_len])
    if not corpus:
        corpus.append(b"")
    cur = os.open(f"{prefix}current-input", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.monotonic()
    done = 0
    print(f"INFO: blind mutation loop over {len(corpus)} corpus inputs (no coverage feedback)", file=sys.stderr)
    while (runs < 0 or done < runs) and (not seconds or time.monotonic() - t0 < seconds):
        data = corpus[done] if done < len(corpus) else mutate(rng, rng.choice(corpus), corpus, max_len)
        os.ftruncate(cur, 0)
        os.pwrite(cur, data, 0)
        try:
            test_one_input(data)
        except Exception:
            print("\n === Uncaught Python exception: ===", file=sys.stderr)
            traceback.print_exc()
            print(f"Test unit written to {_crash(data, prefix)}", file=sys.stderr)
            print(f"stat::number_of_executed_units: {done + 1}", file=sys.stderr, flush=True)
            return 77
        done += 1
        if done & (done - 1) == 0 and done >= 1024:
            print(f"#{done}\tpulse  exec/s: {done / max(1e-9, time.monotonic() - t0):.0f}", file=sys.stderr, flush=True)
    os.close(cur)
    os.unlink(f"{prefix}current-input")
    took = time.monotonic() - t0
    print(f"stat::number_of_executed_units: {done}", file=sys.stderr)
    print(f"stat::average_exec_per_sec: {done / max(took, 1e-9):.0f}", file=sys.stderr)
    print(f"Done {done} runs in {int(took)} second(s)", file=sys.stderr, flush=True)
    return 0
