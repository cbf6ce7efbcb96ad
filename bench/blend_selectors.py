"""Which covered tokens to recompute (issue 15): selectors compared at the same budget on two disjoint prompt sets.

    python -m bench.blend_selectors [--quick] [--prompts N] [--ratios 0.05,0.15,0.3] [--only NAME,...] [--json OUT]

Prompt sets: "bench" is bench.blend_fidelity's (seed 0); "disjoint" is built the same way from seed 1's
held-out chunks less every chunk of seed 0's pool, so no chunk is in both. Per prompt and ratio every
selection recomputes exactly the budget Selection.select counts, round(ratio * covered tokens) chunk
tokens (besides the uncovered rows and the last row): "kv-qw" (K and V deviation weighted by the
question's attention: Blender's default until 2026-12-07), "epic", "gradual-2" and "check-layer-2" (kv-qw
with CacheBlend's gradual filtering, or selecting at layer 2 after two full layers) run the Blender; the others score the covered rows at check layer 1 from the full
prefill's first two layers (what the blender has there: fresh q, K, V of every row) and the ratio-0
blend's cached K, V, and force their top rows through Blender(recompute=...):
- "deviation": K and V deviation (each scaled by its mean over the covered rows), no weighting;
- "attention": the question's attention at the check layer alone;
- "per-head-v": per KV head, the attention its query heads pay a token times the token's V deviation
  in that head, summed over heads (the first-order change of the question's attention output);
- "first-order": per-head-v plus the K term (the logit change |q.dK|/sqrt(d) times ||v - out||);
- "sinks-1": kv-qw's score, the first token of each chunk kept inside the budget;
- "per-chunk": kv-qw's score, each chunk its own share of the budget;
- "recency": kv-qw's score over the square root of the token's distance to the question (the oracle's
  rows lie mostly in the last chunk, kv-qw's spread over all chunks): Blender's default since
  2026-12-07 (`recency=0.5`; the same rows, checked on 6 prompts);
- "oracle-attn": bench.blend_fidelity's attention oracle (knows the full prefill).
Per selection: first-token top-1 agreement and KL(full || blended) (as bench.blend_fidelity), the KL
difference to kv-qw paired by prompt (mean and standard error), and the share of the oracle's
rows it picks. Progress on stderr; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import blockstore
from bench.blend_fidelity import CHUNK_PREFIX, QUESTIONS, last_row_attention, oracle_scores, prompts
from bench.common import REPO, machine_info, results_path, standard_args, write_json
from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, full_prefill
from blockstore.blend.compute import attend, finish_layer, qkv
from blockstore.blend.selection import deviation

# "kv-qw": Blender's default selection before "recency" (K+V deviation weighted by the question's attention at
# check layer 1), the baseline of every comparison here; the others add one option to it
BASE = "kv-qw"
BLENDER_SELECTIONS: dict[str, dict[str, Any]] = {
    BASE: {"recency": 0.0}, "epic": {"selector": "epic"}, "gradual-2": {"gradual": 2.0, "recency": 0.0},
    "check-layer-2": {"check_layer": 2, "recency": 0.0}}
SCORED = ("deviation", "attention", "per-head-v", "first-order", "sinks-1", "per-chunk", "recency", "oracle-attn")


def _say(msg: str) -> None:
    print(f"[blend-selectors {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def disjoint_prompts(model_dir: str, n: int, seed: int, exclude_seed: int = 0) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """As bench.blend_fidelity.prompts(model_dir, n, seed), from a pool with no chunk of exclude_seed's pool."""
    from jobs.trained_model import heldout_chunks, load_tokenizer  # noqa: PLC0415 - the model folder is optional

    tok = load_tokenizer(model_dir)
    size = max(40, n // 4)
    taken = {tuple(c) for c in heldout_chunks(size, 128, exclude_seed, model_dir)}
    pool = [c for c in heldout_chunks(3 * size, 128, seed, model_dir) if tuple(c) not in taken][:size]
    join, questions = tok.encode("\n\n").ids, [tok.encode(q).ids for q in QUESTIONS]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids, spans = [0], []
        for c in rng.sample(pool, rng.randint(3, 5)):
            spans.append((len(ids), len(ids) + len(c)))
            ids += list(c) + join
        out.append((ids[: -len(join)] + rng.choice(questions), spans))
    return out


def _question_attention(q: torch.Tensor, k: torch.Tensor, after: int) -> torch.Tensor:
    """[heads, question rows, N]: the attention of the rows from `after` on over every key, causal."""
    n = k.shape[0]
    keys = torch.arange(n, device=k.device)
    asking = min(after, n - 1)
    group = q.shape[1] // k.shape[1]
    s = torch.einsum("thd,nhd->htn", q[asking:].float(), k.float().repeat_interleave(group, dim=1)) / math.sqrt(q.shape[2])
    s.masked_fill_(keys[None, None, :] > keys[asking:][None, :, None], float("-inf"))
    return torch.softmax(s, -1)


def check_layer_scores(w: LlamaWeights, ids: torch.Tensor, spans: list[tuple[int, int]], covered: torch.Tensor,
                       cached: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per covered row, the scores of SCORED (but the oracle) at check layer 1."""
    n, after = int(ids.shape[0]), spans[-1][1]
    pos = torch.arange(n, device=w.device)
    q0, k0, v0 = qkv(w, w.layers[0], w.embed[ids], pos)
    hidden = finish_layer(w, w.layers[0], w.embed[ids], attend(q0, k0, v0, pos, pos, causal_all_rows=True))
    q, k, v = qkv(w, w.layers[1], hidden, pos)
    att = _question_attention(q, k, after)  # [H, T, N]
    group = q.shape[1] // k.shape[1]
    kv_head = torch.arange(q.shape[1], device=w.device) // group
    dev = deviation((k, v), cached, covered, "kv")
    base = dev.sqrt() * att.mean(dim=(0, 1))  # kv-qw's score
    dv = (v - cached[1]).float().norm(dim=-1)[:, kv_head].T  # [H, N]
    first_v = (att * dv[:, None, :]).sum(dim=(0, 1))
    dlogit = torch.einsum("thd,nhd->htn", q[min(after, n - 1):].float(), (k - cached[0]).float()[:, kv_head]).abs()
    out = torch.einsum("htn,nhd->thd", att, v.float()[:, kv_head])
    spread = (v.float()[:, kv_head][None] - out[:, None]).norm(dim=-1).permute(2, 0, 1)  # [H, T, N]
    first_k = (att * dlogit / math.sqrt(q.shape[2]) * spread).sum(dim=(0, 1))
    return {"deviation": dev, "attention": att.mean(dim=(0, 1)), "per-head-v": first_v,
            "first-order": first_v + first_k, "sinks-1": base, "per-chunk": base,
            "recency": base / (after - torch.arange(n, device=w.device)).clamp_min(1).float().sqrt()}


def _top(score: torch.Tensor, covered: torch.Tensor, budget: int, first: torch.Tensor | None = None) -> torch.Tensor:
    keep = torch.zeros_like(covered) if first is None else first.clone()
    left = budget - int((keep & covered).sum())
    if left > 0:
        masked = score.float().masked_fill(~covered | keep, float("-inf"))
        keep[torch.topk(masked, left).indices] = True
    return keep.nonzero().squeeze(1)


def forced_rows(name: str, score: torch.Tensor, covered: torch.Tensor, spans: list[tuple[int, int]],
                ratio: float) -> torch.Tensor:
    budget = int(round(ratio * int(covered.sum())))
    if name == "sinks-1" and budget >= len(spans):
        first = torch.zeros_like(covered)
        first[[s for s, _ in spans]] = True
        return _top(score, covered, budget, first)
    if name == "per-chunk":  # each chunk's share, the remainder to the best rows left
        first = torch.zeros_like(covered)
        for s, e in spans:
            share = int(ratio * (e - s))
            if share:
                first[s + torch.topk(score[s:e], share).indices] = True
        return _top(score, covered, budget, first)
    return _top(score, covered, budget)


def run_set(w: LlamaWeights, all_prompts: list[tuple[list[int], list[tuple[int, int]]]], ratios: Sequence[float],
            names: Sequence[str], scratch: str, label: str) -> dict[str, Any]:
    rows: dict[str, list[dict[str, float]]] = {}
    t0 = time.perf_counter()
    with blockstore.open(os.path.join(scratch, f"store-{label}")) as store:
        kv = ChunkKVStore(store, model_id=Blender.kv_model_id(w, CHUNK_PREFIX))
        make: Callable[..., Blender] = lambda **o: Blender(w, kv, chunk_prefix=CHUNK_PREFIX, overlap=False, **o)  # noqa: E731
        reuse = make(ratio=0.0)
        blenders = {(b, r): make(ratio=r, **BLENDER_SELECTIONS[b]) for b in names if b in BLENDER_SELECTIONS for r in ratios}
        for i, (ids, spans) in enumerate(all_prompts):
            t = torch.tensor(ids, device=w.device)
            ref = full_prefill(w, t)
            ref_logp, ref_top = F.log_softmax(ref.logits, -1), int(ref.logits.argmax())
            covered = torch.zeros(len(ids), dtype=torch.bool, device=w.device)
            for s, e in spans:
                covered[s:e] = True
            r0 = reuse.blend(ids, spans=spans)
            scores = check_layer_scores(w, t, spans, covered, (r0.keys[1], r0.values[1]))
            scores["oracle-attn"] = oracle_scores((ref.keys, ref.values), (r0.keys, r0.values), covered, 2,
                                                  last_row_attention(w, t))
            got: dict[str, Any] = {"0": r0}
            for r in ratios:
                oracle = set(forced_rows("oracle-attn", scores["oracle-attn"], covered, spans, r).tolist())
                for name in names:
                    if name in BLENDER_SELECTIONS:
                        res = blenders[(name, r)].blend(ids, spans=spans)
                    else:
                        res = reuse.blend(ids, spans=spans, recompute=forced_rows(name, scores[name], covered, spans, r))
                    logp = F.log_softmax(res.logits, -1)
                    picked = set(res.recomputed.tolist()) & set(covered.nonzero().squeeze(1).tolist())
                    rows.setdefault(f"{name}@{r:g}", []).append({
                        "top1": float(int(res.logits.argmax()) == ref_top),
                        "kl": float((ref_logp.exp() * (ref_logp - logp)).sum()),
                        "oracle_overlap": len(picked & oracle) / max(1, len(oracle))})
            logp = F.log_softmax(got["0"].logits, -1)
            rows.setdefault("0", []).append({"top1": float(int(got["0"].logits.argmax()) == ref_top),
                                             "kl": float((ref_logp.exp() * (ref_logp - logp)).sum()), "oracle_overlap": 0.0})
            if (i + 1) % 20 == 0:
                _say(f"{label}: {i + 1}/{len(all_prompts)} prompts ({time.perf_counter() - t0:.0f} s)")
    out: dict[str, Any] = {}
    for key, got_rows in rows.items():
        base = rows.get(f"{BASE}@{key.partition('@')[2]}", rows["0"])
        diff = [a["kl"] - b["kl"] for a, b in zip(got_rows, base)]
        out[key] = {"top1_agreement": statistics.fmean(r["top1"] for r in got_rows),
                    "kl": statistics.fmean(r["kl"] for r in got_rows),
                    "kl_minus_kv_qw": statistics.fmean(diff),
                    "kl_minus_kv_qw_se": statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0,
                    "oracle_overlap": statistics.fmean(r["oracle_overlap"] for r in got_rows),
                    "prompts": len(got_rows)}
    out["_seconds"] = time.perf_counter() - t0
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.blend_selectors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "blend_selectors", quick="20 prompts a set, ratio 0.15", full="200 prompts a set")
    ap.add_argument("--model", default=None, help="trained model folder (default jobs.trained_model's)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per set (default 200, --quick 20)")
    ap.add_argument("--ratios", default=None, help="comma-separated (default 0.05,0.15,0.3; --quick 0.15)")
    ap.add_argument("--only", default=None, help=f"comma-separated selections of {[*BLENDER_SELECTIONS, *SCORED]}")
    ap.add_argument("--sets", default="bench,disjoint", help="prompt sets: bench (seed 0), disjoint (seed 1)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from jobs.trained_model import DEFAULT_MODEL_DIR  # noqa: PLC0415 - jobs/ is the repository's, optional here

    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    scratch = args.dir or tempfile.mkdtemp(prefix="blend-selectors-", dir=os.path.join(REPO, "build"))
    model = args.model or str(DEFAULT_MODEL_DIR)
    n = args.prompts or (20 if args.quick else 200)
    ratios = [float(r) for r in (args.ratios or ("0.15" if args.quick else "0.05,0.15,0.3")).split(",")]
    names = args.only.split(",") if args.only else [*BLENDER_SELECTIONS, *SCORED]
    unknown = set(names) - {*BLENDER_SELECTIONS, *SCORED}
    if unknown:
        raise SystemExit(f"unknown selections {sorted(unknown)}")
    w = LlamaWeights.from_pretrained(model)
    torch.set_num_threads(1)  # an 11 M model's ops are too small for two threads to pay
    makers = {"bench": lambda: prompts(model, n, 0), "disjoint": lambda: disjoint_prompts(model, n, 1)}
    results = {s: run_set(w, makers[s](), ratios, names, scratch, s) for s in args.sets.split(",")}
    doc = {"selectors": results, "command": " ".join(sys.argv), "machine": machine_info(scratch),
           "torch": torch.__version__, "mode": "quick" if args.quick else "full"}
    write_json(results_path(args, "blend_selectors"), doc)
    print(json.dumps({s: {k: [round(v["top1_agreement"], 3), round(v["kl"], 4)] for k, v in r.items() if k[0] != "_"}
                      for s, r in results.items()}))


if __name__ == "__main__":
    main()
