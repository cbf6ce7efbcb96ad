"""The warm blend against its floor, the hot blend, by loader reader count (issue 15).

The hot blend (every chunk's KV already in the model's device memory, `Blender.blend(resident=...)`) is the
best a warm blend can do on a machine: the same compute with no load. This bench times, in one process and
interleaved, a full prefill, the hot blend, and warm blends (the chunk KV in the page cache, read through the
store by the layer loader) with several reader counts, on a random model of a named shape: what the loads
still cost (warm / hot) and which reader count serves the machine best. Chunks of 512 tokens, a suffix of
the rest, ratio 0.15, the blender's defaults otherwise. Medians of the repeats, min-max beside them.

    python -m bench.blend_floor --device cuda --shape llama-8b [--lengths 4096,8192] [--readers 6,8,12,16]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

import blockstore
from bench.blend import _timer
from bench.common import machine_info, results_path, spread, standard_args, write_json
from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, chunk_kv, full_prefill

CHUNK_TOKENS = 512


def one_length(w: LlamaWeights, store: blockstore.Store, tokens: int, readers: Sequence[int], repeats: int) -> dict[str, Any]:
    timed = _timer(w.device)
    g = torch.Generator().manual_seed(tokens)
    n = max(1, (tokens - 1) // CHUNK_TOKENS)
    chunks = [torch.randint(3, w.config.vocab_size, (CHUNK_TOKENS,), generator=g) for _ in range(n)]
    prompt = torch.cat([*chunks, torch.randint(3, w.config.vocab_size, (tokens - n * CHUNK_TOKENS,), generator=g)])
    spans = [(i * CHUNK_TOKENS, (i + 1) * CHUNK_TOKENS) for i in range(n)]
    kv = ChunkKVStore(store, ns=f"floor-{tokens}", model_id=Blender.kv_model_id(w))
    hot = Blender(w, kv, ratio=0.15)
    cids = [hot.store_chunk(c) for c in chunks]
    os.sync()
    resident = {c: x for c, x in zip(cids, kv.load_many(cids, device=w.device)) if x is not None}
    warm = {r: Blender(w, kv, ratio=0.15, readers=r) for r in readers}
    runs: dict[str, list[float]] = {"full": [], "hot": [], **{f"warm_{r}": [] for r in readers}}
    for b in warm.values():  # warm-up: kernels, allocators, the page cache
        b.blend(prompt, spans=spans)
    hot.blend(prompt, spans=spans, resident=resident)
    for _ in range(repeats):
        runs["full"].append(timed(lambda: full_prefill(w, prompt)))
        runs["hot"].append(timed(lambda: hot.blend(prompt, spans=spans, resident=resident)))
        for r, b in warm.items():
            runs[f"warm_{r}"].append(timed(lambda b=b: b.blend(prompt, spans=spans)))  # type: ignore[misc]
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = min(readers, key=lambda r: med[f"warm_{r}"])
    return {"tokens": tokens, "chunks": n, "ms": {k: spread([s * 1e3 for s in v]) for k, v in runs.items()},
            "speedup_vs_full": {k: med["full"] / v for k, v in med.items() if k != "full"},
            "warm_vs_hot": {r: med[f"warm_{r}"] / med["hot"] for r in readers},
            "best_readers": best, "default_readers": chunk_kv.DEFAULT_READERS}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.blend_floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "blend_floor", quick="the cpu-125m shape at 1k tokens, 2 repeats",
                  full="the given shape and lengths, 7 repeats")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--shape", default="cpu-125m", help="model shape (blockstore.blend.SHAPES; default cpu-125m)")
    ap.add_argument("--lengths", default=None, help="prompt lengths, comma-separated (default 4096,8192; --quick 1024)")
    ap.add_argument("--readers", default=None, help="reader counts to time, comma-separated (default 6,8,12,16; --quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; --quick 2)")
    return ap.parse_args(argv)


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise SystemExit(f"--{what} must be comma-separated integers >= 1, got {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quick = bool(args.quick)
    lengths = _ints(args.lengths or ("1024" if quick else "4096,8192"), "lengths")
    readers = _ints(args.readers or ("2" if quick else "6,8,12,16"), "readers")
    repeats = args.repeats or (2 if quick else 7)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = LlamaWeights.random(args.shape, 0, device=device, dtype=dtype)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch, blockstore.open(os.path.join(scratch, "s")) as store:
        per_length = [one_length(w, store, n, readers, repeats) for n in lengths]
        doc = {"bench": "blend_floor", "machine": machine_info(scratch), "shape": args.shape, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "command": "python -m bench.blend_floor " + shlex.join(sys.argv[1:] if argv is None else argv),
               "per_length": per_length}
    out = results_path(args, "blend_floor")
    write_json(out, doc)
    print(f"wrote {out}; reproduce: {doc['command']}", file=sys.stderr)
    print({p["tokens"]: {"warm_vs_hot": {r: round(v, 3) for r, v in p["warm_vs_hot"].items()},
                         "speedup_vs_full": {k: round(v, 2) for k, v in p["speedup_vs_full"].items()}}
           for p in per_length})


if __name__ == "__main__":
    main()
