"""Blended chunk KV (issue 15): fidelity on the trained model, and time to first token against full
prefill and prefix-only reuse, with the chunk KV read through the store warm and cold beside the disk.

    python -m bench.blend [--quick]                      # fidelity + CPU speed -> bench/results/blend[_quick].json
    python -m bench.blend --speed-only --device cuda --shape llama-8b --machine h100 --json OUT.json
    python -m bench.blend --merge OUT.json               # put a GPU run's "ttft" entry into blend.json
    ... --speed-only --kv-format int8                    # the speed part over 8-bit chunk KV (ttft "<machine>-int8")

Fidelity: bench.blend_fidelity.fidelity (see its docstring: prompts, metrics, the selectors and the
offline oracles).

Speed: a random model of a named shape (blockstore.blend.SHAPES), prompts of LENGTH tokens made of
512-token chunks and a 32-token suffix, chunk KV stored beforehand (os.sync after). Per repeat, in
this order: full prefill; blend at 0.15 with the chunk KV already on the device (hot: a memory tier in
front of the store, read once before the repeats); blend at 0.15 with the store's files in the page
cache (warm; also with 1, 4 and 8 loader threads instead of chunk_kv's default, and with each layer
read in 2 and 4 pieces: diagnostics of the loader; on CUDA also hot and warm with V selection, `*_v`, and
without CUDA graphs, `*_eager` (the blender's default: graphs are opt-in; the `blend_*` rows use them), whose capture cost per bucket is reported under `cuda_graphs`, and warm
without them on 4 loader threads, `blend_warm_before`; `graphs_vs_eager`: how far the two hot blends'
rows, logits and last-layer K are apart) and after Store.drop_page_cache() (cold), both with
the layer-by-layer loader; cold without it (one batched read, then compute: what the overlap buys);
prefix-only reuse (the first chunk reused in place, everything after it computed: what a prefix cache
gives the same prompt); the load alone, warm and cold (request to all chunk KV in memory,
ChunkKVStore.load_many) and the layer loader alone, warm (stream_warm: every layer from the check
layer to the device, no compute); and three ceilings: the disk's cold read (bench.ceilings.raw_read of a
file of the same size), the page cache's (the bytes the warm blend reads, from a cached file into
page-aligned memory by up to 8 threads, no store) and host->GPU (one pinned copy of those
bytes). The floor a cold blend cannot beat is KV bytes / the disk ceiling. The warm floor is the best
any design could do warm on that machine, loads overlapped with compute layer by layer: the slowest of
(read at the page-cache ceiling, host->GPU at the pinned ceiling, the hot blend's compute);
warm_floor_speedup = full prefill / that (warm_floor_serial_*: the three one after another).
--profile adds, per length, one hot blend under torch.profiler (wall vs summed kernel time, kernel and
op counts, the top kernels) and the masked attention call timed with each SDPA backend. Medians over
repeats, with the spread. Progress goes to stderr; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

import blockstore
from bench.blend_fidelity import fidelity, plot_fidelity
from bench.ceilings import MiB, Payloads, raw_read, raw_write
from bench.common import REPO, cpu_busy_s, engine_state, machine_info, spread, write_json
from bench.report import machine_line, reproduce_line
from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, flex, full_prefill, fused_rope, graphs
from blockstore.blend.chunk_kv import DEFAULT_READERS, LayerStream
from blockstore.blend.kv_codec import KV_FORMATS
from blockstore.reader import aligned_buffer

CHUNK_TOKENS = 512
SUFFIX_TOKENS = 32
# besides the loader's default (LayerStream.PIECES): a diagnostic of the warm blend, measured on two H100
# hosts (bench/README.md) and settled; () saves the device time
PIECES_TRIED: tuple[int, ...] = ()


def _say(msg: str) -> None:
    print(f"[blend {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- speed


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    return timed


def _disk_ceiling(scratch: str, nbytes: int) -> float:
    """Cold sequential read of a raw file of `nbytes` (rounded up to MiB): bytes per second."""
    n = -(-nbytes // MiB)
    path = os.path.join(scratch, "ceiling.bin")
    raw_write(path, Payloads(), n, durable=False)
    os.sync()
    arena = aligned_buffer(64 * MiB)
    dst = [arena[i * MiB : (i + 1) * MiB] for i in range(64)]
    seconds = raw_read(path, n, dst, cold=True, verify=False)
    os.unlink(path)
    return n * MiB / seconds


def _warm_read_ceiling(scratch: str, nbytes: int, threads: int, pieces: int) -> float:
    """The page-cache read ceiling, no store: `nbytes` (rounded up to MiB) read from a file already in
    the page cache into page-aligned memory by `threads` threads, cut into `pieces` parts claimed in
    turn (as the blend's loader threads claim layers): bytes per second. A first pass faults the
    destination in, as the blend's reused buffers are; the second is timed."""
    size = -(-nbytes // MiB) * MiB
    path = os.path.join(scratch, "warm-ceiling.bin")
    raw_write(path, Payloads(), size // MiB, durable=False)  # buffered: the pages stay cached
    dst = aligned_buffer(size)
    bounds = [size * i // pieces for i in range(pieces + 1)]
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(piece: int) -> None:
            offset, end = bounds[piece], bounds[piece + 1]
            while offset < end:
                got = os.preadv(fd, [dst[offset:end]], offset)
                if got <= 0:
                    raise OSError(f"short read at {offset} of {path}")
                offset += got

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(pieces)))
            t0 = time.perf_counter()
            list(pool.map(read, range(pieces)))
            return size / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)


def _h2d_ceiling(nbytes: int, device: torch.device) -> float | None:
    """Host->GPU copy of `nbytes` from pinned memory, one copy after a warm-up: bytes per second (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes / (time.perf_counter() - t0)


def _with_pieces(pieces: int, fn: Callable[[], Any]) -> Any:
    """fn() with the layer loader cutting each layer into `pieces` reads (LayerStream.PIECES)."""
    default = getattr(LayerStream, "PIECES", 1)
    LayerStream.PIECES = pieces
    try:
        return fn()
    finally:
        LayerStream.PIECES = default


COMPILED_SWITCHES = ("BLOCKSTORE_BLEND_FLEX", "BLOCKSTORE_BLEND_FUSED_ROPE")


def _with_compiled(on: bool, fn: Callable[[], Any]) -> Any:
    """fn() with the blend's torch.compile kernels on or off: scattered-row attention through
    FlexAttention (blockstore/blend/flex.py) and the one-kernel RoPE rotation (fused_rope.py)."""
    before = {k: os.environ.get(k) for k in COMPILED_SWITCHES}
    os.environ.update({k: "1" if on else "0" for k in COMPILED_SWITCHES})
    try:
        return fn()
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def _stream_all(kv: ChunkKVStore, cids: Sequence[bytes], device: torch.device, first_layer: int) -> None:
    """The warm blend's loads alone: every layer from `first_layer` through the layer-by-layer loader
    to the device, no compute (what the loader moves when nothing waits on it)."""
    stream = kv.stream_layers(cids, device=device, first_layer=first_layer)
    try:
        for layer in range(first_layer, stream.layers):
            stream.layer(layer)
    finally:
        stream.close()


def _profile_hot(blend: Blender, prompt: torch.Tensor, spans: list[tuple[int, int]],
                 resident: dict[bytes, Any]) -> dict[str, Any]:
    """One hot blend under torch.profiler: wall time, the GPU's busy time (sum of kernel times), the
    number of kernels and of top-level torch ops. Wall far above kernel time = the blend is bound by
    the CPU issuing ops (Python and dispatch), not by the GPU."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 - only with --profile

    cuda = blend.w.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        blend.blend(prompt, spans=spans, resident=resident)
        if cuda:
            torch.cuda.synchronize(blend.w.device)
        wall = time.perf_counter() - t0
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    top_ops = [e for e in events if e.name.startswith("aten::") and (e.cpu_parent is None or
                                                                      not e.cpu_parent.name.startswith("aten::"))]
    avg = prof.key_averages()
    by_device = sorted(avg, key=lambda e: -getattr(e, "self_device_time_total", 0))[:12]
    by_count = sorted((e for e in avg if e.key.startswith("aten::")), key=lambda e: -e.count)[:12]
    return {
        "wall_s_profiled": wall,
        "gpu_kernel_s": sum(getattr(e, "device_time", 0) for e in kernels) / 1e6,
        "kernels": len(kernels), "top_level_ops": len(top_ops),
        "top_kernels_ms": {e.key[:80]: round(getattr(e, "self_device_time_total", 0) / 1e3, 3) for e in by_device},
        "top_op_counts": {e.key: e.count for e in by_count},
    }


def _attention_backends(w: LlamaWeights, n_rows: int, n_keys: int) -> dict[str, float | str]:
    """ms per masked attention call of `n_rows` scattered query rows over `n_keys` keys (the blend's
    later layers) with each SDPA backend allowed alone, and the causal full-prefill call for scale."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415 - only with --profile

    from blockstore.blend.compute import attend  # noqa: PLC0415

    c, dev = w.config, w.device
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n_rows, c.num_attention_heads, c.head_dim, device=dev, dtype=w.dtype, generator=g)
    k = torch.randn(n_keys, c.num_key_value_heads, c.head_dim, device=dev, dtype=w.dtype, generator=g)
    v = torch.randn_like(k)
    k_pos = torch.arange(n_keys, device=dev)
    q_pos = torch.randperm(n_keys, device=dev, generator=g)[:n_rows].sort().values
    out: dict[str, float | str] = {}

    def ms(fn: Callable[[], Any]) -> float:
        fn()
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) * 100

    for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH", "FLASH_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                out[name] = ms(lambda: attend(q, k, v, q_pos, k_pos))
        except (RuntimeError, AttributeError) as exc:
            out[name] = f"unavailable: {str(exc)[:120]}"
    out["default"] = ms(lambda: attend(q, k, v, q_pos, k_pos))
    qf = torch.randn(n_keys, c.num_attention_heads, c.head_dim, device=dev, dtype=w.dtype, generator=g)
    out["full_prefill_causal"] = ms(lambda: attend(qf, k, v, k_pos, k_pos, causal_all_rows=True))
    return out


def _one_length(w: LlamaWeights, store: blockstore.Store, length: int, repeats: int, scratch: str,
                seed: int, profile: bool = False, kv_format: str = "model") -> dict[str, Any]:
    device, timed = w.device, _timer(w.device)
    g = torch.Generator().manual_seed(seed + length)
    n_chunks = (length - SUFFIX_TOKENS) // CHUNK_TOKENS
    chunks = [torch.randint(3, w.config.vocab_size, (CHUNK_TOKENS,), generator=g) for _ in range(n_chunks)]
    prompt = torch.cat([*chunks, torch.randint(3, w.config.vocab_size, (SUFFIX_TOKENS,), generator=g)])
    spans = [(i * CHUNK_TOKENS, (i + 1) * CHUNK_TOKENS) for i in range(n_chunks)]
    kv = ChunkKVStore(store, model_id=Blender.kv_model_id(w, kv_format=kv_format))

    def blender(**opts: Any) -> Blender:  # every blend of the run reads the records of one format
        return Blender(w, kv, kv_format=kv_format, **opts)

    # the blend_* rows replay CUDA graphs on a GPU (opt-in: blender.DEFAULT_CUDA_GRAPHS is off); the *_eager
    # rows are the default path
    blend = blender(ratio=0.15, cuda_graphs=True)
    serial = blender(ratio=0.15, overlap=False)
    prefix = blender(ratio=0.0, check_layer=0)
    cids = [blend.store_chunk(c) for c in chunks]
    os.sync()
    locs = store.locate_many([kv.layer_key(c, i) for c in cids for i in range(w.config.num_hidden_layers)], ns=kv.ns)
    kv_bytes = sum(loc.payload_len for loc in locs if loc is not None)
    one_reader = blender(ratio=0.15, readers=1)
    eight_readers = blender(ratio=0.15, readers=8)
    four_readers = blender(ratio=0.15, readers=4)  # chunk_kv.DEFAULT_READERS on 16 cores before 2026-12-07 (now 8)
    # the default selection before 2026-12-06 (V deviation alone): what the default (K+V deviation weighted
    # by the question's attention, the better one on the trained model) costs against it
    v_only = blender(ratio=0.15, deviation="v", query_weighted=False)
    eager = blender(ratio=0.15, cuda_graphs=False)  # the later layers issued op by op (before graphs.py)
    before = blender(ratio=0.15, cuda_graphs=False, readers=4)  # the loader's default threads, as before graphs
    resident = {c: got for c, got in zip(cids, kv.load_many(cids, device=device)) if got is not None}  # hot tier
    runs: dict[str, list[float]] = {k: [] for k in ("full", "blend_hot", "blend_warm", "blend_warm_1reader", "blend_warm_4readers",
                                                    "blend_warm_8readers", "blend_cold",
                                                    "blend_cold_serial", "prefix_warm", "load_warm", "load_cold",
                                                    "stream_warm", "disk_ceiling_Bps", "warm_read_ceiling_Bps",
                                                    "h2d_Bps", *(f"blend_warm_pieces{n}" for n in PIECES_TRIED),
                                                    *(("blend_hot_eager", "blend_warm_eager", "blend_warm_before", "blend_hot_v",
                                                       "blend_warm_v", "blend_hot_compiled", "blend_warm_compiled",
                                                       "blend_hot_graphs_compiled", "blend_warm_graphs_compiled")
                                                      if device.type == "cuda" else ()))}
    # the threads and parts the warm blend reads with: its loader's threads, one layer each from the check layer
    pieces = w.config.num_hidden_layers - blend.check_layer
    # the page-cache ceiling's threads: at least the loader's, up to 8 (a floor must not be set low by
    # reading with fewer threads than the machine could use)
    threads = max(1, min(max(DEFAULT_READERS, min(8, os.cpu_count() or 1)), pieces))
    read_bytes = kv_bytes * pieces // w.config.num_hidden_layers
    last: dict[str, Any] = {}
    # warm-up: kernels, allocator, page cache; the graphs of a bucket are captured on its CAPTURE_AFTER-th blend
    first = [blend.blend(prompt, spans=spans) for _ in range(graphs.CAPTURE_AFTER)]
    timed(lambda: full_prefill(w, prompt))
    first_s = [timed(lambda fn=fn: first.append(fn(prompt, spans=spans)))  # type: ignore[misc]
               for fn in [v_only.blend] * graphs.CAPTURE_AFTER + [eager.blend]]
    # what capturing the graphs of each (tokens, rows) bucket cost, once (the default and V selections
    # may recompute different numbers of rows: two buckets)
    capture = {"capture_s": [r.timings["graph_capture_s"] for r in first if "graph_capture_s" in r.timings],
               "first_blend_s": first_s,
               "buckets": [f"{k[0]}x{k[1]}" for k in w.graph_buckets], "failure": graphs.failure()}
    # the default (eager) blend with the torch.compile kernels on (FlexAttention, flex.py; the fused RoPE,
    # fused_rope.py): the first two calls compile them
    flex_first_s = [timed(lambda: _with_compiled(True, lambda: eager.blend(prompt, spans=spans, resident=resident)))
                    for _ in range(2)] if device.type == "cuda" else []
    # the graphs with FlexAttention captured in them (graphs.FLEX): compiled, then captured on the
    # CAPTURE_AFTER-th blend of their bucket
    graphs_flex_first_s = [timed(lambda: _with_compiled(True, lambda: blend.blend(prompt, spans=spans, resident=resident)))
                           for _ in range(graphs.CAPTURE_AFTER)] if device.type == "cuda" else []
    for rep in range(repeats):
        runs["full"].append(timed(lambda: full_prefill(w, prompt)))
        runs["blend_hot"].append(timed(lambda: blend.blend(prompt, spans=spans, resident=resident)))
        runs["blend_warm"].append(timed(lambda: last.update(warm=blend.blend(prompt, spans=spans))))
        runs["blend_warm_1reader"].append(timed(lambda: one_reader.blend(prompt, spans=spans)))
        runs["blend_warm_4readers"].append(timed(lambda: four_readers.blend(prompt, spans=spans)))
        runs["blend_warm_8readers"].append(timed(lambda: eight_readers.blend(prompt, spans=spans)))
        if device.type == "cuda":  # the same blend without CUDA graphs: what they buy, in this run
            runs["blend_hot_eager"].append(timed(lambda: eager.blend(prompt, spans=spans, resident=resident)))
            runs["blend_warm_eager"].append(timed(lambda: eager.blend(prompt, spans=spans)))
            runs["blend_warm_before"].append(timed(lambda: before.blend(prompt, spans=spans)))
            runs["blend_hot_v"].append(timed(lambda: v_only.blend(prompt, spans=spans, resident=resident)))
            runs["blend_warm_v"].append(timed(lambda: v_only.blend(prompt, spans=spans)))
            runs["blend_hot_compiled"].append(timed(lambda: _with_compiled(True, lambda: eager.blend(prompt, spans=spans,
                                                                                          resident=resident))))
            runs["blend_warm_compiled"].append(timed(lambda: _with_compiled(True, lambda: eager.blend(prompt, spans=spans))))
            runs["blend_hot_graphs_compiled"].append(timed(lambda: _with_compiled(True, lambda: blend.blend(
                prompt, spans=spans, resident=resident))))
            runs["blend_warm_graphs_compiled"].append(timed(lambda: _with_compiled(True, lambda: blend.blend(prompt, spans=spans))))
        for pieces in PIECES_TRIED:  # what cutting each layer's read into pieces buys
            runs[f"blend_warm_pieces{pieces}"].append(
                timed(lambda n=pieces: _with_pieces(n, lambda: blend.blend(prompt, spans=spans))))  # type: ignore[misc]
        store.drop_page_cache()
        runs["blend_cold"].append(timed(lambda: last.update(cold=blend.blend(prompt, spans=spans))))
        store.drop_page_cache()
        runs["blend_cold_serial"].append(timed(lambda: serial.blend(prompt, spans=spans)))
        runs["prefix_warm"].append(timed(lambda: prefix.blend(prompt, spans=spans[:1])))
        runs["load_warm"].append(timed(lambda: kv.load_many(cids, device=device)))
        runs["stream_warm"].append(timed(lambda: _stream_all(kv, cids, device, blend.check_layer)))
        store.drop_page_cache()
        runs["load_cold"].append(timed(lambda: kv.load_many(cids, device=device)))
        runs["disk_ceiling_Bps"].append(_disk_ceiling(scratch, kv_bytes))
        runs["warm_read_ceiling_Bps"].append(_warm_read_ceiling(scratch, read_bytes, threads, pieces))
        runs["h2d_Bps"].append(_h2d_ceiling(read_bytes, device) or 0.0)
        _say(f"  {length} tokens, repeat {rep + 1}/{repeats}: full {runs['full'][-1]:.3f} s, blend warm "
             f"{runs['blend_warm'][-1]:.3f} s, cold {runs['blend_cold'][-1]:.3f} s")
    prof: dict[str, Any] = {}
    if profile:
        prof = {"blend_hot": _profile_hot(blend, prompt, spans, resident),
                "full_prefill_s": timed(lambda: full_prefill(w, prompt))}
        if device.type == "cuda":
            rows = len(last["warm"].recomputed) if "warm" in last else int(0.15 * length)
            prof["attention_ms_by_backend"] = _attention_backends(w, rows, length)
    med = {k: statistics.median(v) for k, v in runs.items()}
    # the graphs' blend against the eager one, hot, default selection: rows, logits, last layer's K
    got, ref = blend.blend(prompt, spans=spans, resident=resident), eager.blend(prompt, spans=spans, resident=resident)
    agreement = {"same_rows": bool(torch.equal(got.recomputed.cpu(), ref.recomputed.cpu())),
                 "logits_max_diff": float((got.logits - ref.logits).abs().max()), "logits_abs_max": float(ref.logits.abs().max()),
                 "last_k_max_diff": float((got.keys[-1].float() - ref.keys[-1].float()).abs().max()),
                 "last_k_abs_max": float(ref.keys[-1].float().abs().max())}
    flex_doc: dict[str, Any] = {}
    if device.type == "cuda":  # FlexAttention against SDPA with a mask, hot, the same blender
        fgot = _with_compiled(True, lambda: eager.blend(prompt, spans=spans, resident=resident))
        flex_doc = {"first_blend_s": flex_first_s, "failure": flex.failure(), "rope_failure": fused_rope.failure(),
                    "same_rows": bool(torch.equal(fgot.recomputed.cpu(), ref.recomputed.cpu())),
                    "logits_max_diff": float((fgot.logits - ref.logits).abs().max()),
                    "same_top1": int(fgot.logits.argmax()) == int(ref.logits.argmax())}
        ggot = _with_compiled(True, lambda: blend.blend(prompt, spans=spans, resident=resident))
        flex_doc["graphs"] = {"first_blends_s": graphs_flex_first_s, "buckets": [str(k) for k in w.graph_buckets],
                              "flex_buckets": sum(bool(getattr(b, "flex", False)) for b in w.graph_buckets.values()),
                              "failure": graphs.failure(),
                              "same_rows": bool(torch.equal(ggot.recomputed.cpu(), ref.recomputed.cpu())),
                              "logits_max_diff": float((ggot.logits - ref.logits).abs().max()),
                              "same_top1": int(ggot.logits.argmax()) == int(ref.logits.argmax())}
    floor = kv_bytes / med["disk_ceiling_Bps"]
    # the best any design could do warm on this machine: the bytes the blend reads (the layers from the
    # check layer on) at the page cache's read ceiling, over the host->GPU link at its pinned-copy
    # ceiling, and the blend's compute with the KV in memory (hot), all three overlapped (layer by
    # layer: the floor is the slowest of them), or one after another (the serial floor)
    read_s = read_bytes / med["warm_read_ceiling_Bps"]
    h2d_s = read_bytes / med["h2d_Bps"] if med["h2d_Bps"] else 0.0
    warm_floor = max(read_s, h2d_s, med["blend_hot"])
    warm_floor_serial = read_s + h2d_s + med["blend_hot"]
    return {
        "tokens": length, "chunks": n_chunks, "kv_bytes": kv_bytes, "kv_format": kv_format,
        "speedup_hot": med["full"] / med["blend_hot"], "speedup_warm": med["full"] / med["blend_warm"], "speedup_cold": med["full"] / med["blend_cold"],
        "speedup_prefix": med["full"] / med["prefix_warm"],
        **({"speedup_hot_eager": med["full"] / med["blend_hot_eager"],
            "speedup_warm_eager": med["full"] / med["blend_warm_eager"],
            "speedup_hot_v": med["full"] / med["blend_hot_v"], "speedup_warm_v": med["full"] / med["blend_warm_v"],
            "speedup_warm_before": med["full"] / med["blend_warm_before"],
            "speedup_hot_compiled": med["full"] / med["blend_hot_compiled"],
            "speedup_warm_compiled": med["full"] / med["blend_warm_compiled"], "compiled": flex_doc,
            "speedup_hot_graphs_compiled": med["full"] / med["blend_hot_graphs_compiled"],
            "speedup_warm_graphs_compiled": med["full"] / med["blend_warm_graphs_compiled"],
            "cuda_graphs": capture} if "blend_hot_eager" in med else {}),
        "graphs_vs_eager": agreement,
        "overlap_gain_cold": med["blend_cold_serial"] / med["blend_cold"],
        "cold_floor_s": floor, "blend_cold_vs_floor": med["blend_cold"] / floor,
        "load_cold_vs_floor": med["load_cold"] / floor,
        "store_cold_GBps": kv_bytes / med["load_cold"] / 1e9, "disk_ceiling_GBps": med["disk_ceiling_Bps"] / 1e9,
        "readers_gain_warm": med["blend_warm_1reader"] / med["blend_warm"],
        "warm_read_ceiling_GBps": med["warm_read_ceiling_Bps"] / 1e9, "warm_read_threads": threads,
        "store_warm_GBps": kv_bytes / med["load_warm"] / 1e9,
        "stream_warm_GBps": read_bytes / med["stream_warm"] / 1e9, "read_bytes": read_bytes,
        "h2d_GBps": med["h2d_Bps"] / 1e9 if med["h2d_Bps"] else None,
        "warm_floor_s": warm_floor, "warm_floor_speedup": med["full"] / warm_floor,
        "warm_floor_serial_s": warm_floor_serial, "warm_floor_serial_speedup": med["full"] / warm_floor_serial,
        "warm_floor_parts_s": {"read_at_page_cache_ceiling": read_s, "h2d_at_pinned_ceiling": h2d_s,
                               "blend_hot": med["blend_hot"]},
        "blend_warm_vs_floor": med["blend_warm"] / warm_floor,
        **({"profile": prof} if prof else {}),
        "blend_timings_last": {k: v.timings for k, v in last.items()},  # load_s, load_wait_s, ... of one run
        "seconds": {k: spread(v) for k, v in runs.items() if not k.endswith("_Bps")},
    }


def speed(device: str, shape: str, dtype: torch.dtype, lengths: Sequence[int], repeats: int, scratch: str,
          seed: int = 0, profile: bool = False, kv_format: str = "model") -> dict[str, Any]:
    t0 = time.perf_counter()
    w = LlamaWeights.random(shape, seed, device=device, dtype=dtype)
    params = (sum(getattr(lw, f.name).numel() for lw in w.layers for f in dataclasses.fields(lw) if f.init)
              + w.embed.numel() + w.lm_head.numel())
    _say(f"speed: {shape} ({params / 1e6:.0f} M parameters, {dtype}) on {device}, lengths {list(lengths)}")
    per_length = []
    with blockstore.open(os.path.join(scratch, f"speed-store-{shape}")) as store:
        for length in lengths:
            per_length.append(_one_length(w, store, length, repeats, scratch, seed, profile, kv_format))
    return {**headline(per_length), "model": {"shape": shape, "parameters": params, "dtype": str(dtype)},
            "kv_format": kv_format,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "seconds": time.perf_counter() - t0}


def headline(per_length: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the issue asks for, at the shortest length >= 4k tokens (else the longest), and
    the shortest length where a cold blend beats a full prefill."""
    per_length = sorted(per_length, key=lambda r: r["tokens"])
    best = next((r for r in per_length if r["tokens"] >= 4096), per_length[-1])
    return {
        "speedup_vs_full_prefill": best["speedup_warm"], "speedup_cold_vs_full_prefill": best["speedup_cold"],
        "speedup_hot_vs_full_prefill": best["speedup_hot"],
        "speedup_prefix_only": best["speedup_prefix"], "at_tokens": best["tokens"], "ratio": 0.15,
        "warm_floor_speedup": best.get("warm_floor_speedup"), "warm_read_ceiling_GBps": best.get("warm_read_ceiling_GBps"),
        "cold_floor_s": best["cold_floor_s"], "blend_cold_vs_floor": best["blend_cold_vs_floor"],
        "cold_crossover_tokens": next((r["tokens"] for r in per_length if r["speedup_cold"] > 1.0), None),
        "per_length": per_length,
    }


# ----------------------------------------------------------------------------------------- report


def plot(doc: dict[str, Any], stem: str) -> list[str]:
    """Fidelity vs ratio and TTFT vs prompt length, next to the JSON."""
    import matplotlib  # noqa: PLC0415 - optional, plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    if any(not k.startswith("_") for k in doc.get("fidelity", {})):  # bench.blend_fidelity draws it
        written.append(plot_fidelity(doc["fidelity"], f"{stem}_fidelity.png"))
    ttft = doc.get("ttft", {})
    if ttft:
        fig, axes = plt.subplots(1, len(ttft), figsize=(5 * len(ttft), 4), squeeze=False)
        for ax, (machine, res) in zip(axes[0], ttft.items()):
            rows = res["per_length"]
            xs = [r["tokens"] for r in rows]
            for key, label in (("full", "full prefill"), ("blend_hot", "blend 0.15 hot (KV in memory)"),
                               ("blend_warm", "blend 0.15 warm"),
                               ("blend_cold", "blend 0.15 cold"), ("prefix_warm", "prefix-only reuse")):
                ax.plot(xs, [r["seconds"][key]["median"] for r in rows], "-o", label=label)
            ax.plot(xs, [r["cold_floor_s"] for r in rows], ":", label="cold floor (KV bytes / disk)")
            floored = [r for r in rows if r.get("warm_floor_s") and r.get("h2d_GBps") is not None]
            if floored:  # the overlapped warm floor: max(page-cache read, host->GPU, hot compute)
                ax.plot([r["tokens"] for r in floored], [r["warm_floor_s"] for r in floored], "--",
                        label="warm floor (overlapped: max of read, H2D, hot)")
            ax.set_title(f"{machine}: {res['model']['shape']}")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("time to first token (s)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(f"{stem}_ttft.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plots(doc: dict[str, Any], out_dir: str) -> list[str]:
    """bench.report's hook: the PNGs of a results document."""
    return plot(doc, os.path.join(out_dir, "blend_quick" if doc.get("mode") == "quick" else "blend"))


def summary_markdown(doc: dict[str, Any]) -> str:
    """bench.report's hook: the headline tables, the machine and the command."""
    lines = ["| config | top-1 agreement | 16-token sequence agreement | KL |", "|---|---|---|---|"]
    for k, v in doc.get("fidelity", {}).items():
        if not k.startswith("_"):
            lines.append(f"| {k} | {v['top1_agreement']:.3f} | {v['seq_agreement']:.3f} | {v['kl']:.4f} |")
    lines += ["", "| machine | model | at tokens | blend 0.15 warm vs full | warm floor vs full | cold vs full | "
              "hot vs full | cold vs floor |", "|---|---|---|---|---|---|---|---|"]
    for machine, r in doc.get("ttft", {}).items():
        floor = f"{r['warm_floor_speedup']:.2f}x" if r.get("warm_floor_speedup") else "not measured"
        lines.append(f"| {machine} | {r['model']['shape']} | {r['at_tokens']} | {r['speedup_vs_full_prefill']:.2f}x | "
                     f"{floor} | {r['speedup_cold_vs_full_prefill']:.2f}x | {r.get('speedup_hot_vs_full_prefill', 0):.2f}x | "
                     f"{r['blend_cold_vs_floor']:.2f}x |")
    return "\n".join([*lines, "", machine_line(doc), "", reproduce_line(doc)])


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    fid = {k: {m: round(v[m], 4) for m in ("top1_agreement", "seq_agreement", "kl")}
           for k, v in doc.get("fidelity", {}).items() if not k.startswith("_")}
    ttft = {machine: {k: v for k, v in res.items() if k not in ("per_length", "seconds")}
            for machine, res in doc.get("ttft", {}).items()}
    return {"fidelity": fid, "ttft": ttft}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.blend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 fidelity prompts; CPU speed at 1024 tokens only")
    ap.add_argument("--full", action="store_true", help="the default mode (bench.report passes it)")
    ap.add_argument("--json", help="results file (default bench/results/blend.json, --quick: blend_quick.json)")
    ap.add_argument("--model", default=None, help="trained model folder (default jobs.trained_model's)")
    ap.add_argument("--prompts", type=int, default=None, help="fidelity prompts (default 200, --quick 30)")
    ap.add_argument("--fidelity-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fidelity-device", default=None, help="device of the fidelity part (default --device)")
    ap.add_argument("--shape", default="cpu-125m", help="speed model shape (blockstore.blend.SHAPES)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--machine", default=None, help="name of the ttft entry (default cpu-2core or the GPU's)")
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default a temp dir in build/)")
    ap.add_argument("--merge", default=None, help="merge this file's fidelity and ttft entries into --json and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-format", default="model", choices=KV_FORMATS,
                    help="chunk KV records of the speed part: the model's dtype, or int8 (kv_codec.py; the default "
                         "ttft entry's name gets '-int8')")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one hot blend per length (kernels, ops) and time the attention backends")
    return ap.parse_args(argv)


def _merge(path: str, into: str) -> dict[str, Any]:
    with open(path) as f:
        new = json.load(f)
    doc = json.load(open(into)) if os.path.exists(into) else {}
    for key in ("machine", "command", "mode"):  # bench.report's machine and reproduce lines: the first run merged
        if key in new and key not in doc:
            doc[key] = new[key]
    if new.get("fidelity"):
        doc["fidelity"] = new["fidelity"]
        doc.setdefault("runs", {})["fidelity"] = new.get("run", {})
    for machine, res in new.get("ttft", {}).items():
        # runs of one length each (a GPU lease runs them one by one) add up to one entry per machine
        old = doc.get("ttft", {}).get(machine, {})
        lengths = {r["tokens"]: r for r in old.get("per_length", []) + res["per_length"]}
        doc.setdefault("ttft", {})[machine] = {**res, **headline(list(lengths.values()))}
        doc.setdefault("runs", {})[f"ttft.{machine}.{','.join(str(n) for n in sorted(lengths))}"] = new.get("run", {})
    return doc


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out_path = args.json or os.path.join(REPO, "bench", "results", "blend_quick.json" if args.quick else "blend.json")
    if args.merge:
        merged = _merge(args.merge, out_path)
        write_json(out_path, merged)
        plot(merged, os.path.splitext(out_path)[0])
        print(json.dumps(summary(merged)))
        return
    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    scratch = args.dir or tempfile.mkdtemp(prefix="blend-", dir=os.path.join(REPO, "build"))
    torch.manual_seed(args.seed)
    busy0 = cpu_busy_s()
    doc: dict[str, Any] = json.load(open(out_path)) if os.path.exists(out_path) else {}
    threads = torch.get_num_threads()
    run = {"command": shlex.join(getattr(sys, "orig_argv", sys.argv)), "machine": machine_info(scratch),
           "engine": engine_state(), "torch": torch.__version__, "threads": threads}
    if not args.speed_only:
        from jobs.trained_model import DEFAULT_MODEL_DIR  # noqa: PLC0415 - jobs/ is the repository's, optional here

        model = args.model or str(DEFAULT_MODEL_DIR)
        _say(f"fidelity on {model}")
        doc["fidelity"] = fidelity(model, args.prompts or (30 if args.quick else 200), args.seed, scratch,
                                   args.fidelity_device or args.device, variants=not args.quick)
        torch.set_num_threads(threads)
        doc.setdefault("runs", {})["fidelity"] = run
    if not args.fidelity_only:
        cuda = args.device.startswith("cuda")
        dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
        default_lengths = "1024" if args.quick else ("2048,4096,8192")
        lengths = [int(x) for x in (args.lengths or default_lengths).split(",")]
        machine = args.machine or ("cpu-2core" if not cuda else torch.cuda.get_device_name(0).split()[1].lower()) + (
            "" if args.kv_format == "model" else f"-{args.kv_format}")
        doc.setdefault("ttft", {})[machine] = speed(args.device, args.shape, dtype, lengths,
                                                    args.repeats or (2 if args.quick else 3), scratch, args.seed,
                                                    args.profile, args.kv_format)
        doc.setdefault("runs", {})[f"ttft.{machine}"] = run
    busy1 = cpu_busy_s()
    run["cpu_busy_s"] = {"machine": busy1[0] - busy0[0], "this_process": busy1[1] - busy0[1]}
    doc["run"] = run
    doc.update(machine=run["machine"], command=run["command"], mode="quick" if args.quick else "full")
    write_json(out_path, doc)
    try:
        _say(f"plots: {plot(doc, os.path.splitext(out_path)[0])}")
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the results
        _say(f"plot failed: {exc}")
    _say(f"reproduce: {run['command']}")
    print(json.dumps(summary(doc)))


if __name__ == "__main__":
    main()
