"""The engine demo without vLLM or LMCache (`python -m jobs.demo`): KV tensors and agent memory.

Writes the KV cache of a few multi-turn conversations (one tensor per 256-token chunk, as LMCache
stores them) and the chunk records of their sessions, closes the store, reopens it, reads every
record back (verified against its checksum and against what was written), and prints the stats.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import numpy as np

import blockstore

LAYERS, HEADS, HEAD_DIM, CHUNK_TOKENS = 8, 4, 64, 256


def kv_chunk(rng: np.random.Generator) -> np.ndarray:
    # (K and V, layers, tokens, heads, head_dim) in float16: 1 MiB per 256-token chunk
    return rng.standard_normal((2, LAYERS, CHUNK_TOKENS, HEADS, HEAD_DIM), dtype=np.float32).astype(np.float16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="store directory (default: a fresh temporary directory, removed after)")
    ap.add_argument("--users", type=int, default=4, help="users (each with one session)")
    ap.add_argument("--turns", type=int, default=6, help="turns per conversation")
    ap.add_argument("--durability", choices=["cache", "sync"], default="sync")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = args.path or tempfile.mkdtemp(prefix="blockstore-demo-")
    rng = np.random.default_rng(args.seed)
    written: dict[bytes, np.ndarray] = {}
    t0 = time.perf_counter()
    with blockstore.open(path, durability=args.durability) as store:
        for u in range(args.users):
            user, session = f"user{u}", "s0"
            for turn in range(args.turns):
                # the prompt grows by one chunk per turn; earlier chunks are reused, only the new one is stored
                key = f"model=tiny-llama/user{u}/chunk{turn}".encode()
                kv = kv_chunk(rng)
                store.put_tensor(key, kv, ns="tiny-llama", partition=f"{user}/{session}")
                written[key] = kv
                store.put_chunk(user, session, f"turn{turn}", f"user {u} says something in turn {turn}",
                                meta={"turn": turn}, kv_keys=[key], ns="memory")
            # the agent revises one memory and forgets another: an update and a delete
            store.put_chunk(user, session, "turn0", f"user {u} (revised) opening message", ns="memory")
            store.delete_chunk(user, session, f"turn{args.turns - 1}", ns="memory")
    write_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with blockstore.open(path, durability=args.durability) as store:
        keys = list(written)
        got = store.get_tensors(keys, ns="tiny-llama")
        bad = [k for k, g in zip(keys, got) if g is None or not np.array_equal(g, written[k])]
        chunks = store.list_chunks("user0", "s0", ns="memory")
        stats = store.stats()
    read_s = time.perf_counter() - t0

    print(f"store: {path}")
    mib = sum(a.nbytes for a in written.values()) / 2**20
    print(f"wrote {len(written)} KV chunks ({mib:.0f} MiB) and {args.users * args.turns} memory chunks "
          f"in {write_s:.2f}s ({args.durability} mode)")
    print(f"reopened and read back {len(keys)} KV chunks in {read_s:.2f}s: {len(keys) - len(bad)} identical, {len(bad)} wrong")
    revised = next(c for c in chunks if c.chunk_id == "turn0")
    print(f"user0's memory, in temporal order: {[c.chunk_id for c in chunks]} (turn0 revised: {revised.text!r})")
    for name, value in stats.as_dict().items():
        print(f"  {name:<22} {value:.3f}" if isinstance(value, float) else f"  {name:<22} {value:,}")
    if not args.path:
        shutil.rmtree(path, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
