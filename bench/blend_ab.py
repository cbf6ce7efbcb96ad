"""Blend TTFT of this tree's blend code against an earlier revision's, in ONE process (issue 15).

GPU hosts of one kind differ by up to 30 % (bench/README.md, blend section), so a speed-up is only read off
two codes timed on the same host; here they also share the weights, the stored chunks and the page cache,
and their repeats interleave. The baseline is an earlier revision's `blockstore/blend/` loaded as a
package of its own (`blend_baseline`; the engine beneath both is this tree's). Two steps, because a device
machine gets a copy of the working tree without its git history:

    python -m bench.blend_ab --prepare REV                 # here: REV's blockstore/blend -> build/blend-baseline
    python -m bench.blend_ab --device cuda --shape llama-8b --lengths 4096,8192 --repeats 3   # there; carry
                                                           # build/blend-baseline

Per length: full prefill; hot (chunk KV already on the device), warm (page cache) and cold (after
`drop_page_cache`) blends of both codes at ratio 0.15, and on CUDA this tree's without CUDA graphs (the
`*_eager` rows, the blender's default; the `new_*` rows use the opt-in graphs; what capturing each bucket cost is under `cuda_graphs`); each code's loader alone; the page-cache, host->device and disk ceilings; and whether
both codes pick the same rows and how far their logits and last-layer K are apart. Medians of the
repeats, min-max beside them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import blockstore
from bench.blend import CHUNK_TOKENS, SUFFIX_TOKENS, _disk_ceiling, _h2d_ceiling, _timer, _warm_read_ceiling
from bench.common import REPO, machine_info, results_path, spread, standard_args, write_json
from blockstore.blend import Blender, ChunkKVStore, LlamaConfig, LlamaWeights, full_prefill, graphs

BASELINE_DIR = os.path.join(REPO, "build", "blend-baseline")
PACKAGE = "blend_baseline"
# this code's blender with the baseline's selection (V deviation, no question weighting: the default
# before 2026-12-06), so the two codes pick the same rows and only the code differs
SAME_SELECTION: dict[str, Any] = {"deviation": "v", "query_weighted": False}


def _say(msg: str) -> None:
    print(f"[blend_ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(rev: str, out_dir: str) -> str:
    """Write revision `rev`'s blockstore/blend/*.py into out_dir/blend_baseline, its imports of
    blockstore.blend renamed to the package's own; returns the package folder."""
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "blockstore/blend/"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    pkg = os.path.join(out_dir, PACKAGE)
    os.makedirs(pkg, exist_ok=True)
    for path in names:
        if not path.endswith(".py"):
            continue
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout
        with open(os.path.join(pkg, os.path.basename(path)), "w", encoding="utf-8") as f:
            f.write(re.sub(r"\bblockstore\.blend\b", PACKAGE, text))
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True, text=True).stdout
    with open(os.path.join(pkg, "REVISION"), "w", encoding="utf-8") as f:
        f.write(commit)
    return pkg


def _stream_all(kv: Any, cids: Sequence[bytes], device: torch.device, first_layer: int) -> None:
    stream = kv.stream_layers(cids, device=device, first_layer=first_layer)
    try:
        for layer in range(first_layer, stream.layers):
            stream.layer(layer)
    finally:
        stream.close()


def _agreement(new: Any, old: Any) -> dict[str, Any]:
    return {"same_rows": bool(torch.equal(new.recomputed.cpu(), old.recomputed.cpu())),
            "logits_max_diff": float((new.logits - old.logits).abs().max()),
            "logits_abs_max": float(old.logits.abs().max()),
            "top1_same": int(new.logits.argmax()) == int(old.logits.argmax()),
            "last_k_max_diff": float((new.keys[-1].float() - old.keys[-1].float()).abs().max()),
            "last_k_abs_max": float(old.keys[-1].float().abs().max())}


def _old_model_id(base: Any, w: LlamaWeights) -> str:
    """The chunk KV model id the revision `base` checks (per dtype since 9d3eb4f; the weights' id before)."""
    kv_model_id = getattr(base.Blender, "kv_model_id", None)
    return kv_model_id(w) if kv_model_id is not None else w.model_id


def _one_length(w: LlamaWeights, base: Any, store: blockstore.Store, length: int, repeats: int,
                scratch: str) -> dict[str, Any]:
    dev, timed = w.device, _timer(w.device)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(length)
    n_chunks = (length - SUFFIX_TOKENS) // CHUNK_TOKENS
    chunks = [torch.randint(3, w.config.vocab_size, (CHUNK_TOKENS,), generator=g) for _ in range(n_chunks)]
    prompt = torch.cat([*chunks, torch.randint(3, w.config.vocab_size, (SUFFIX_TOKENS,), generator=g)])
    spans = [(i * CHUNK_TOKENS, (i + 1) * CHUNK_TOKENS) for i in range(n_chunks)]
    kv, kv_old = ChunkKVStore(store, model_id=Blender.kv_model_id(w)), base.ChunkKVStore(store, model_id=_old_model_id(base, w))
    new, old = Blender(w, kv, ratio=0.15, cuda_graphs=True, **SAME_SELECTION), base.Blender(w, kv_old, ratio=0.15)
    eager = Blender(w, kv, ratio=0.15, cuda_graphs=False, **SAME_SELECTION)
    cids = [new.store_chunk(c) for c in chunks]
    os.sync()
    kv_bytes = sum(loc.payload_len for loc in store.locate_many(
        [kv.layer_key(c, i) for c in cids for i in range(w.config.num_hidden_layers)], ns=kv.ns) if loc is not None)
    hot_new = {c: x for c, x in zip(cids, kv.load_many(cids, device=dev)) if x is not None}  # a memory tier
    hot_old = {c: x for c, x in zip(cids, kv_old.load_many(cids, device=dev)) if x is not None}
    calls: dict[str, Callable[[], Any]] = {
        "full": lambda: full_prefill(w, prompt),
        "old_hot": lambda: old.blend(prompt, spans=spans, resident=hot_old),
        "new_hot": lambda: new.blend(prompt, spans=spans, resident=hot_new),
        "old_warm": lambda: old.blend(prompt, spans=spans),
        "new_warm": lambda: new.blend(prompt, spans=spans),
        **({"new_hot_eager": lambda: eager.blend(prompt, spans=spans, resident=hot_new),
            "new_warm_eager": lambda: eager.blend(prompt, spans=spans)} if cuda else {}),
        "old_loader": lambda: _stream_all(kv_old, cids, dev, old.check_layer),
        "new_loader": lambda: _stream_all(kv, cids, dev, new.check_layer),
    }
    capture = [new.blend(prompt, spans=spans, resident=hot_new).timings.get("graph_capture_s")  # once per bucket,
               for _ in range(graphs.CAPTURE_AFTER)][-1]  # on its CAPTURE_AFTER-th blend
    warmup = {name: [timed(fn) for _ in range(2)] for name, fn in calls.items()}
    agreement = {"new": _agreement(calls["new_hot"](), calls["old_hot"]()),
                 "new_warm": _agreement(calls["new_warm"](), calls["old_warm"]())}
    if cuda:
        agreement["new_eager"] = _agreement(calls["new_hot_eager"](), calls["old_hot"]())
    runs: dict[str, list[float]] = {name: [] for name in [*calls, "old_cold", "new_cold"]}
    for rep in range(repeats):
        order = list(calls) if rep % 2 == 0 else list(calls)[::-1]
        for name in order:
            runs[name].append(timed(calls[name]))
        for name, blender in (("old_cold", old), ("new_cold", new)):
            store.drop_page_cache()
            runs[name].append(timed(lambda b=blender: b.blend(prompt, spans=spans)))  # type: ignore[misc]
        _say(f"{length} tokens, repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    layers = w.config.num_hidden_layers
    read_bytes = kv_bytes * (layers - new.check_layer) // layers
    page_cache = max(_warm_read_ceiling(scratch, read_bytes, 8, layers - new.check_layer) for _ in range(2))
    h2d = max((_h2d_ceiling(read_bytes, dev) or 0.0) for _ in range(2))
    disk = _disk_ceiling(scratch, kv_bytes)
    read_s, h2d_s = read_bytes / page_cache, (read_bytes / h2d if h2d else 0.0)
    blends = [k for k in runs if k != "full" and not k.endswith("_loader")]
    return {
        "tokens": length, "chunks": n_chunks, "kv_bytes": kv_bytes, "read_bytes": read_bytes,
        "speedup_vs_full_prefill": {k: med["full"] / med[k] for k in blends},
        "new_vs_old": {kind: med[f"old_{kind}"] / med[f"new_{kind}"] for kind in ("hot", "warm", "cold", "loader")},
        "loader_GBps": {k: read_bytes / med[k] / 1e9 for k in ("old_loader", "new_loader")},
        "page_cache_GBps": page_cache / 1e9, "h2d_GBps": h2d / 1e9, "disk_GBps": disk / 1e9,
        # the best a loader overlapped layer by layer could do warm with each code's hot compute (bench/blend.py)
        "warm_floor_speedup": {k: med["full"] / max(read_s, h2d_s, med[k])
                               for k in ("old_hot", "new_hot", "new_hot_eager") if k in med},
        "cold_vs_floor": {k: med[k] / (kv_bytes / disk) for k in ("old_cold", "new_cold")},
        "agreement": agreement, "warmup_s": warmup,
        "cuda_graphs": {"capture_s": capture, "buckets": [f"{k[0]}x{k[1]}" for k in w.graph_buckets],
                        "failure": graphs.failure()},
        "seconds": {k: spread(v) for k, v in runs.items()},
    }


# ops that make no kernel (views, allocations, metadata): left out of the count of compute ops
_NO_KERNEL = {"aten::view", "aten::as_strided", "aten::slice", "aten::select", "aten::transpose", "aten::reshape",
              "aten::expand", "aten::unsqueeze", "aten::empty", "aten::empty_like", "aten::detach", "aten::alias",
              "aten::t", "aten::permute", "aten::split", "aten::chunk", "aten::narrow", "aten::lift_fresh",
              "aten::_reshape_alias", "aten::squeeze", "aten::empty_strided", "aten::result_type", "aten::item",
              "aten::_local_scalar_dense", "aten::is_nonzero", "aten::unbind", "aten::split_with_sizes", "aten::to",
              "aten::_to_copy", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous"}


def op_counts(base: Any, scratch: str) -> dict[str, Any]:
    """Top-level torch ops of one hot and one warm blend, both codes, on the CPU, for a model of the 8B's
    structure (32 layers, 32 query heads over 8 KV heads) at toy widths and 7 chunks of 64 tokens: the
    count follows the structure, not the widths, and on a GPU each compute op is at least one kernel
    launch (what bounds the blend's later layers: bench/README.md)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 - only for this count

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=16)
    w = LlamaWeights.random(cfg, 0)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(3, 256, (64,), generator=g) for _ in range(7)]
    prompt = torch.cat([*chunks, torch.randint(3, 256, (32,), generator=g)])
    spans = [(i * 64, (i + 1) * 64) for i in range(7)]
    out: dict[str, Any] = {}
    with blockstore.open(os.path.join(scratch, "ops")) as store:
        kv, kv_old = ChunkKVStore(store, model_id=Blender.kv_model_id(w)), base.ChunkKVStore(store, model_id=_old_model_id(base, w))
        codes = {"new": (Blender(w, kv, ratio=0.15, **SAME_SELECTION), kv), "old": (base.Blender(w, kv_old, ratio=0.15), kv_old)}
        cids = [codes["new"][0].store_chunk(c) for c in chunks]
        logits = {}
        for code, (blender, store_kv) in codes.items():
            hot = dict(zip(cids, store_kv.load_many(cids)))
            for kind, resident in (("hot", hot), ("warm", None)):
                blender.blend(prompt, spans=spans, resident=resident)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    logits[code, kind] = blender.blend(prompt, spans=spans, resident=resident).logits
                top = [e.name for e in prof.events() if e.name.startswith("aten::")
                       and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
                out[f"{code}_{kind}"] = {"top_level_ops": len(top),
                                         "compute_ops": sum(1 for name in top if name not in _NO_KERNEL)}
    out["logits_equal"] = all(torch.equal(logits["new", k], logits["old", k]) for k in ("hot", "warm"))
    return out


def run(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    sys.path.insert(0, args.baseline)
    base = importlib.import_module(PACKAGE)
    revision = open(os.path.join(args.baseline, PACKAGE, "REVISION"), encoding="utf-8").read().strip()
    if args.op_count:
        return {"baseline_revision": revision, "op_counts": op_counts(base, scratch)}
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = LlamaWeights.random(args.shape, 0, device=device, dtype=dtype)
    _say(f"{args.shape} on {device}; baseline blend code of {revision[:12]}")
    per_length = []
    with blockstore.open(os.path.join(scratch, "store")) as store:
        for length in args.lengths:
            per_length.append(_one_length(w, base, store, length, args.repeats, scratch))
    return {"baseline_revision": revision, "shape": args.shape, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "per_length": per_length}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.blend_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "blend_ab", quick="one length, 2 repeats", full="the given lengths, 3 repeats")
    ap.add_argument("--prepare", metavar="REV", help="write REV's blend code into --baseline and exit")
    ap.add_argument("--baseline", default=BASELINE_DIR, help=f"the prepared baseline (default {BASELINE_DIR})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="cpu-125m", help="model shape (blockstore.blend.SHAPES)")
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 4096,8192; --quick 1056)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--op-count", action="store_true",
                    help="count torch ops per blend of both codes on the CPU instead of timing (-> blend_ab_ops.json)")
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in (args.lengths or ("1056" if args.quick else "4096,8192")).split(",")]
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prepare:
        _say(f"baseline written to {prepare(args.prepare, args.baseline)}")
        return
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)  # --dir names where scratch goes: made if missing, as the other benches do
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        doc = {"bench": "blend_ab", "machine": machine_info(scratch),
               "command": "python -m bench.blend_ab " + shlex.join(sys.argv[1:] if argv is None else argv),
               **run(args, scratch)}
    out = results_path(args, "blend_ab_ops" if args.op_count else "blend_ab")
    write_json(out, doc)
    _say(f"wrote {out}; reproduce: {doc['command']}")
    print(doc["op_counts"] if args.op_count else {p["tokens"]: {"speedup": p["speedup_vs_full_prefill"],
                                                                "new_vs_old": p["new_vs_old"]} for p in doc["per_length"]})


if __name__ == "__main__":
    main()
