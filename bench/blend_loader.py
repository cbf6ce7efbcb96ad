"""The blend's layer loader with and without a thread that wants the GIL (issue 15).

A warm blend on a GPU host loads each layer's chunk KV on loader threads while the main thread issues the
blend's GPU ops, holding the GIL almost all the time. A loader thread coming back from a C read waits for
the GIL (up to the interpreter's switch interval, 5 ms), so what matters is how often it needs it. This
bench compares three read paths of `LayerStream` on the same records in one run:

- `read_located`: a layer through `Store.read_located` (one C call per block, Python between them: the
  loader before this change);
- `one_call`: a layer as one `bs_read_files` call over every chunk's block (blockstore/blend/layer_reads.py),
  by Python reader threads;
- `c_readers`: every layer by reader threads each in ONE C call (`bs_layer_read`, blockstore/blend/layer_loader.py),
  no Python between layers: the loader's default.

Each is timed alone and beside a "contender" thread that runs Python without pause (a stand-in for the
op-issuing thread), whose progress during the load is also reported against its progress alone: what the
loader's Python takes from it. Records have the 8B shape's layout (32 layers, 8 KV heads of 128, bf16:
2 MiB per 512-token chunk and layer), written here with random contents; the load is warm (page cache),
from layer 1 on, into CPU memory. Medians of interleaved repeats, min-max beside them.

    python -m bench.blend_loader [--quick] [--tokens 4096] [--repeats 7] [--readers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import blockstore
from bench.blend import _warm_read_ceiling
from bench.common import machine_info, results_path, spread, standard_args, write_json
from blockstore.blend import ChunkKVStore, chunk_kv
from blockstore.blend.chunk_kv import KVLayout

LAYOUT = KVLayout(32, 8, 128, "bfloat16")  # Llama-3-8B's KV
CHUNK_TOKENS = 512
FIRST_LAYER = 1  # the blend's check layer: layers from it on are streamed
PATHS = ("read_located", "one_call", "c_readers")


def _say(msg: str) -> None:
    print(f"[blend_loader {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _Contender(threading.Thread):
    """Runs Python bytecode without pause until stopped; `rounds` counts its progress."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.rounds = 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for i in range(200):
                total += i
            self.rounds += 1


def _contender_rate(seconds: float) -> float:
    """Rounds per second of a contender alone."""
    c = _Contender()
    c.start()
    time.sleep(seconds)
    c.stop.set()
    c.join()
    return c.rounds / seconds


@contextlib.contextmanager
def _path(name: str) -> Iterator[None]:
    """LayerStream reads through `name`: c_readers is the default; one_call turns the C readers off
    (Python readers, a C call a layer), read_located the one-call path too."""
    real, real_wanted = chunk_kv.LayerReads.open, chunk_kv.LayerLoader.wanted
    if name == "read_located":
        chunk_kv.LayerReads.open = classmethod(lambda cls, *a, **k: None)  # type: ignore[assignment]
    if name != "c_readers":
        chunk_kv.LayerLoader.wanted = classmethod(lambda cls, reads: False)  # type: ignore[assignment]
    try:
        yield
    finally:
        chunk_kv.LayerReads.open = real  # type: ignore[method-assign]
        chunk_kv.LayerLoader.wanted = real_wanted  # type: ignore[method-assign]


def _stream(kv: ChunkKVStore, cids: Sequence[bytes], readers: int) -> float:
    t0 = time.perf_counter()
    s = kv.stream_layers(cids, first_layer=FIRST_LAYER, readers=readers)
    try:
        for layer in range(FIRST_LAYER, s.layers):
            s.layer(layer)
    finally:
        s.close()
    return time.perf_counter() - t0


def _timed(kv: ChunkKVStore, cids: Sequence[bytes], path: str, contended: bool, readers: int) -> tuple[float, float]:
    """(seconds to stream every layer, the contender's rounds per second meanwhile; 0 without one)."""
    with _path(path):
        if not contended:
            return _stream(kv, cids, readers), 0.0
        c = _Contender()
        c.start()
        time.sleep(0.02)  # running before the load starts
        start_rounds, t0 = c.rounds, time.perf_counter()
        seconds = _stream(kv, cids, readers)
        rate = (c.rounds - start_rounds) / (time.perf_counter() - t0)
        c.stop.set()
        c.join()
        return seconds, rate


def _store_chunks(store: blockstore.Store, tokens: int) -> tuple[ChunkKVStore, list[bytes], int]:
    kv = ChunkKVStore(store, model_id="bench-blend-loader", layout=LAYOUT)
    g = torch.Generator().manual_seed(0)
    cids = []
    shape = (CHUNK_TOKENS, LAYOUT.kv_heads, LAYOUT.head_dim)
    for i in range(tokens // CHUNK_TOKENS):
        layers = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2)]  # contents do not matter
        ids = torch.arange(i * CHUNK_TOKENS, (i + 1) * CHUNK_TOKENS)
        cids.append(kv.put(ids, [layers[0]] * LAYOUT.layers, [layers[1]] * LAYOUT.layers, torch.arange(CHUNK_TOKENS)))
    read_bytes = len(cids) * (LAYOUT.layers - FIRST_LAYER) * LAYOUT.layer_bytes(CHUNK_TOKENS)
    return kv, cids, read_bytes


def run(tokens: int, repeats: int, readers: int, scratch: str) -> dict[str, Any]:
    with blockstore.open(os.path.join(scratch, "store")) as store:
        if store.backend.name != "native":
            raise SystemExit("bench.blend_loader needs the C core (the one-call path is native only)")
        kv, cids, read_bytes = _store_chunks(store, tokens)
        for path in PATHS:  # warm: page cache, buffers, threads
            _timed(kv, cids, path, False, readers)
        runs: dict[str, list[float]] = {}
        rates: dict[str, list[float]] = {}
        alone: list[float] = []
        for rep in range(repeats):
            alone.append(_contender_rate(0.2))
            order = PATHS if rep % 2 == 0 else PATHS[::-1]  # interleaved, alternating first
            for contended in (False, True):
                for path in order:
                    name = f"{path}{'_contended' if contended else ''}"
                    seconds, rate = _timed(kv, cids, path, contended, readers)
                    runs.setdefault(name, []).append(seconds)
                    if contended:
                        rates.setdefault(name, []).append(rate)
            _say(f"repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in runs.items()))
        ceiling = _warm_read_ceiling(scratch, read_bytes, readers, LAYOUT.layers - FIRST_LAYER)
    med = {k: statistics.median(v) for k, v in runs.items()}
    alone_rate = statistics.median(alone)
    return {
        "tokens": tokens, "chunks": len(cids), "readers": readers, "read_bytes": read_bytes,
        "GBps": {k: read_bytes / v / 1e9 for k, v in med.items()},
        "page_cache_ceiling_GBps": ceiling / 1e9,
        "one_call_speedup": med["read_located"] / med["one_call"],
        "one_call_speedup_contended": med["read_located_contended"] / med["one_call_contended"],
        "c_readers_speedup": med["one_call"] / med["c_readers"],
        "c_readers_speedup_contended": med["one_call_contended"] / med["c_readers_contended"],
        "contention_slowdown": {p: med[f"{p}_contended"] / med[p] for p in PATHS},
        # the contender's progress during the load, as a share of its progress alone: 1.0 = the loader took
        # nothing from it
        "contender_share": {k: statistics.median(v) / alone_rate for k, v in rates.items()},
        "seconds": {k: spread(v) for k, v in runs.items()},
        "contender_rounds_per_s_alone": spread(alone),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.blend_loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "blend_loader", quick="2k tokens, 3 repeats", full="4k tokens (448 MiB), 7 repeats")
    ap.add_argument("--tokens", type=int, default=None, help="prompt tokens in chunks of 512 (default 4096, --quick 2048)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--readers", type=int, default=None,
                    help=f"loader threads (default chunk_kv.DEFAULT_READERS here: {chunk_kv.DEFAULT_READERS})")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    tokens = args.tokens or (2048 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 7)
    readers = args.readers or chunk_kv.DEFAULT_READERS
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)  # --dir names where scratch goes: made if missing, as the other benches do
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        doc = {"bench": "blend_loader", "machine": machine_info(scratch),
               "command": "python -m bench.blend_loader " + shlex.join(sys.argv[1:] if argv is None else argv),
               **run(tokens, repeats, readers, scratch)}
    out = results_path(args, "blend_loader")
    write_json(out, doc)
    _say(f"wrote {out}; reproduce: {doc['command']}")
    print({k: doc[k] for k in ("one_call_speedup", "one_call_speedup_contended", "c_readers_speedup",
                                "c_readers_speedup_contended", "contention_slowdown",
                                "contender_share", "GBps", "page_cache_ceiling_GBps")})


if __name__ == "__main__":
    main()
