"""Fidelity of blended chunk KV on the trained model (issue 15), with an offline oracle beside the selectors.

    python -m bench.blend_fidelity [--quick] [--device cuda] [--prompts N] [--only NAME,...] [--json OUT]
                                   [--kv-format int8]

Prompts: 3-5 held-out chunks (jobs.trained_model.heldout_chunks) in shuffled orders, joined by a blank
line, after <s>, with a question-like suffix. Chunk KV is computed once per chunk, on its own after <s>
(positions 1..n; "0.15-no-chunk-prefix": without <s>, at 0..n-1), stored, and read back through the
store. Each prompt is blended with explicit spans and compared with its full prefill: first-token top-1
agreement, 16-token greedy sequence agreement (all 16 equal, decoded with the same forward from the
blended KV), prefix agreement (tokens equal before the first difference, as a share of 16), and
KL(full || blended) of the first token.

Configs: each ratio of RATIOS for the deviation selector (Blender's defaults otherwise), "epic-<r>" for
the first-tokens-of-each-chunk selector at the same budget, and the oracles, which know the full prefill
(so no selector can run them) and pick the same number of chunk tokens:
- "oracle-<r>": the tokens whose cached K and V deviate most from the full prefill's, summed over the
  layers after the check layer (each layer's K and V terms scaled by their mean over the chunk tokens):
  what a selector that could see the final layers would recompute;
- "oracle-attn-<r>": the same deviation weighted by the attention the last token pays each token in the
  full prefill, layer by layer: the deviations the first token actually reads.
Without --quick also ratios past 0.30 (where top-1 reaches 0.98; the attention oracle at 0.5 and 0.7) and
other selections at 0.15 (VARIANTS_015).
With --kv-format int8, each config but the oracles runs twice, its chunk KV stored in the model's dtype and
("<name>@int8") in 8 bits (kv_codec.py), the two on the same prompts; "_paired" holds the per-prompt differences
(int8 minus model: mean, standard error, prompts where they differ) and the default results file is
blend_fidelity_int8[_quick].json. Every chunk is stored before the first prompt, so every blend reads its
chunks' KV from the store (a chunk first computed by a blend would be used at full precision there).
Per config, the top-1 flips that are near ties (the reference's top two logits < NEAR_TIE apart) are
counted, and top-1 agreement on the other prompts given. Progress goes to stderr; the last stdout line is
the JSON summary. bench.blend runs the same fidelity() into blend.json's "fidelity".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import blockstore
from bench.common import REPO, machine_info, results_path, standard_args, write_json
from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, chunk_id, full_prefill, greedy_decode
from blockstore.blend.compute import attend, finish_layer, qkv
from blockstore.blend.kv_codec import DEFAULT_KV_FORMAT, KV_FORMATS

RATIOS = (0.0, 0.05, 0.15, 0.30, 1.0)
EPIC_RATIOS = (0.05, 0.15, 0.30)
ORACLE_RATIOS = (0.05, 0.15, 0.30)
ORACLES = ("oracle", "oracle-attn")
CURVE_RATIOS = (0.5, 0.7, 0.85)  # past 0.30: where top-1 agreement reaches the 0.98 target
# other selections at the 0.15 budget (name suffix -> Blender options; the plain ratios use V_SELECTION,
# deviation on V, and check layer 1): CacheBlend's deviation on K, K and V together, two attention
# sinks per chunk inside the budget, later check layers, and the deviation weighted by the question's
# attention at the check layer (query_weighted), and gradual filtering (twice the budget at the check layer,
# narrowed at the next)
# The plain ratios and the variants are pinned to the V deviation without question weighting (Blender's
# default until 2026-12-06, when "kv-qw" became it), so every recorded row keeps its meaning.
# Pinned to no distance weighting (recency 0) too, Blender's default since 2026-12-07 20:30 UTC ("kv-qw-r").
V_SELECTION: dict[str, Any] = {"deviation": "v", "query_weighted": False, "recency": 0.0}
VARIANTS_015: dict[str, dict[str, Any]] = {
    "k": {"deviation": "k"}, "kv": {"deviation": "kv"}, "sink2": {"sink_tokens": 2},
    "check2": {"check_layer": 2}, "check3": {"check_layer": 3}, "k-check3": {"deviation": "k", "check_layer": 3},
    "qw": {"query_weighted": True}, "kv-qw": {"deviation": "kv", "query_weighted": True},
    "g2": {"gradual": 2.0}, "kv-qw-g2": {"deviation": "kv", "query_weighted": True, "gradual": 2.0},
    "kv-g2": {"deviation": "kv", "gradual": 2.0}, "kv-qw-g3": {"deviation": "kv", "query_weighted": True, "gradual": 3.0},
    "kv-qw-r": {"deviation": "kv", "query_weighted": True, "recency": 0.5}}
DEFAULT_VARIANT = "kv-qw-r"  # Blender's defaults, spelled out; the full run has it at every ratio of EPIC_RATIOS
NEAR_TIE = 0.5  # logits: a reference whose top two first tokens are closer than this is a near tie
DECODE = 16
QUESTIONS = (
    "\n\nQuestion: What is the main point of the text above?\nAnswer:",
    "\n\nQ: Which of the passages above explains how to use something, and how?\nA:",
    "\n\nSummarize the passages above in one sentence:\n",
    "\n\nQuestion: What does the second passage say?\nAnswer: The second passage",
)
CHUNK_PREFIX = (0,)  # <s>: fidelity's chunk KV is computed after it (Blender's chunk_prefix)


def _say(msg: str) -> None:
    print(f"[blend-fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompts(model_dir: str, n: int, seed: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """n prompts (token ids, chunk spans): <s>, 3-5 held-out chunks in a random order, a question."""
    from jobs.trained_model import heldout_chunks, load_tokenizer  # noqa: PLC0415 - the model folder is optional

    tok = load_tokenizer(model_dir)
    pool = heldout_chunks(max(40, n // 4), 128, seed, model_dir)
    join = tok.encode("\n\n").ids
    questions = [tok.encode(q).ids for q in QUESTIONS]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids, spans = [0], []  # <s>
        for c in rng.sample(pool, rng.randint(3, 5)):  # a random subset in a random order
            spans.append((len(ids), len(ids) + len(c)))
            ids += list(c) + join
        out.append((ids[: -len(join)] + rng.choice(questions), spans))
    return out


@torch.inference_mode()
def last_row_attention(w: LlamaWeights, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the full prefill's attention of the last token over every row, averaged over heads: [N]."""
    n = int(ids.shape[0])
    pos = torch.arange(n, device=w.device)
    hidden = w.embed[ids.to(w.device)]
    out = []
    for layer in w.layers:
        q, k, v = qkv(w, layer, hidden, pos)
        group = q.shape[1] // k.shape[1]
        scores = torch.einsum("hd,nhd->hn", q[-1].float(), k.float().repeat_interleave(group, dim=1))
        out.append(torch.softmax(scores / math.sqrt(q.shape[2]), dim=-1).mean(dim=0))
        hidden = finish_layer(w, layer, hidden, attend(q, k, v, pos, pos, causal_all_rows=True))
    return out


def oracle_scores(ref_kv: tuple[list[torch.Tensor], list[torch.Tensor]],
                  reuse_kv: tuple[list[torch.Tensor], list[torch.Tensor]], covered: torch.Tensor,
                  first_layer: int, attention: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per row: how far the KV of pure reuse (ratio 0) is from the full prefill's in the layers from
    `first_layer` on, K and V each scaled by its mean over the covered rows in each layer; with
    `attention` (last_row_attention), each layer's term weighted by the last token's attention to the row."""
    score = torch.zeros(covered.shape[0], device=covered.device)
    for layer in range(first_layer, len(ref_kv[0])):
        term = torch.zeros_like(score)
        for ref, got in ((ref_kv[0][layer], reuse_kv[0][layer]), (ref_kv[1][layer], reuse_kv[1][layer])):
            d = (ref.float() - got.float()).pow(2).sum(dim=(1, 2))
            term += d / d[covered].mean().clamp_min(1e-30)
        score += term * attention[layer] if attention is not None else term
    return score


def oracle_rows(score: torch.Tensor, covered: torch.Tensor, ratio: float) -> torch.Tensor:
    budget = int(round(ratio * int(covered.sum())))
    masked = torch.where(covered, score, torch.full_like(score, -1.0))
    return torch.topk(masked, budget).indices if budget else torch.empty(0, dtype=torch.int64)


def _configs(variants: bool, only: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {f"{r:g}": {"ratio": r, **V_SELECTION}
                                          for r in RATIOS + (CURVE_RATIOS if variants else ())}
    configs.update({f"epic-{r:g}": {"ratio": r, "selector": "epic"} for r in EPIC_RATIOS})
    configs.update({f"{o}-{r:g}": {"ratio": r, "oracle": o} for o in ORACLES for r in ORACLE_RATIOS})
    if variants:
        configs.update({f"oracle-attn-{r:g}": {"ratio": r, "oracle": "oracle-attn"} for r in CURVE_RATIOS[:2]})
        configs.update({f"0.15-{name}": {"ratio": 0.15, **V_SELECTION, **opts} for name, opts in VARIANTS_015.items()})
        configs.update({f"{r:g}-{DEFAULT_VARIANT}": {"ratio": r, **V_SELECTION, **VARIANTS_015[DEFAULT_VARIANT]}
                        for r in EPIC_RATIOS})
    configs["0.15-no-chunk-prefix"] = {"ratio": 0.15, **V_SELECTION, "chunk_prefix": ()}
    if only:  # any ratio with a variant's options too: "0.3-kv-qw-g2"
        for name in set(only) - set(configs):
            ratio, _, variant = name.partition("-")
            if ratio.replace(".", "", 1).isdigit() and variant in VARIANTS_015:
                configs[name] = {"ratio": float(ratio), **V_SELECTION, **VARIANTS_015[variant]}
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise SystemExit(f"unknown configs {unknown}; known: {sorted(configs)}")
        configs = {name: configs[name] for name in only}
    return {"0": {"ratio": 0.0, **V_SELECTION}, **configs}  # the oracles need pure reuse's KV


def _row(ids: list[int], res: Any, seq: list[int], ref_seq: list[int], ref_logp: torch.Tensor,
         margin: float) -> dict[str, float]:
    logp = F.log_softmax(res.logits, -1)
    return {
        "top1": float(seq[0] == ref_seq[0]),
        "seq": float(seq == ref_seq),
        "tokens": next((i for i, (a, b) in enumerate(zip(seq, ref_seq)) if a != b), len(seq)) / DECODE,
        "kl": float((ref_logp.exp() * (ref_logp - logp)).sum()),
        "recomputed_share": len(res.recomputed) / len(ids),
        "margin": margin, "ref_p1": float(ref_logp.max().exp()),
    }


def _summarise(got: list[dict[str, float]]) -> dict[str, Any]:
    decided = [r["top1"] for r in got if r["margin"] >= NEAR_TIE]
    return {
        "top1_agreement": statistics.fmean(r["top1"] for r in got),
        # the same, on the prompts whose reference is not a near tie (a flip there needs a real error)
        "top1_agreement_decided": statistics.fmean(decided) if decided else None,
        "top1_misses_near_tie": sum(1 for r in got if not r["top1"] and r["margin"] < NEAR_TIE),
        "top1_misses": sum(1 for r in got if not r["top1"]),
        "seq_agreement": statistics.fmean(r["seq"] for r in got),
        "prefix_agreement": statistics.fmean(r["tokens"] for r in got),
        "kl": statistics.fmean(r["kl"] for r in got),
        "kl_median": statistics.median(r["kl"] for r in got),
        "recomputed_share": statistics.fmean(r["recomputed_share"] for r in got),
        "prompts": len(got),
    }


def _paired(rows: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per "<name>@<format>" config: its per-prompt metrics minus <name>'s (the same prompts), as mean, standard
    error and the prompts where the two differ."""
    out: dict[str, Any] = {}
    for name, got in rows.items():
        base = rows.get(name.partition("@")[0]) if "@" in name else None
        if not base:
            continue
        out[name] = {}
        for metric in ("top1", "seq", "tokens", "kl"):
            d = [a[metric] - b[metric] for a, b in zip(got, base)]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
            out[name][metric] = {"mean": statistics.fmean(d), "se": se, "differ": sum(1 for x in d if x != 0.0)}
    return out


def _store_chunks(blenders: dict[str, Blender], all_prompts: Sequence[tuple[list[int], list[tuple[int, int]]]]) -> None:
    """Every chunk of the prompts into every chunk KV store (one blender of each store computes them)."""
    one_each = {id(b.kv): b for b in blenders.values()}
    for blender in one_each.values():
        for ids, spans in all_prompts:
            for s, e in spans:
                if not blender.kv.contains([chunk_id(ids[s:e])])[0]:
                    blender.store_chunk(ids[s:e])


def fidelity(model_dir: str, n_prompts: int, seed: int, scratch: str, device: str = "cpu",
             variants: bool = True, only: Sequence[str] | None = None,
             kv_formats: Sequence[str] = (DEFAULT_KV_FORMAT,)) -> dict[str, Any]:
    """`variants`: also the ratios past 0.30 and the other selections at 0.15 (--quick leaves them out);
    `only`: just these configs (names as in the results; pure reuse "0" always runs: the oracles use it);
    `kv_formats`: besides the model's dtype, each config (not the oracles) again as "<name>@<format>"."""
    w = LlamaWeights.from_pretrained(model_dir, device=device)  # float32 on any device
    if device == "cpu":  # an 11 M model's ops are too small for two threads to pay (2x slower on a busy VM)
        torch.set_num_threads(1)
    configs = _configs(variants, only)
    configs.update({f"{name}@{fmt}": {**opts, "kv_format": fmt} for fmt in kv_formats if fmt != DEFAULT_KV_FORMAT
                    for name, opts in list(configs.items()) if "oracle" not in opts})
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    t0 = time.perf_counter()
    all_prompts = prompts(model_dir, n_prompts, seed)
    with blockstore.open(os.path.join(scratch, "fidelity-store")) as store:
        stores: dict[tuple[tuple[int, ...], str], ChunkKVStore] = {}
        blenders = {}
        for name, opts in configs.items():
            opts = {k: v for k, v in opts.items() if k != "oracle"}
            prefix = tuple(opts.pop("chunk_prefix", CHUNK_PREFIX))
            fmt = opts.get("kv_format", DEFAULT_KV_FORMAT)
            if (prefix, fmt) not in stores:  # one chunk KV store per chunk prefix and format (its model_id says which)
                stores[prefix, fmt] = ChunkKVStore(store, model_id=Blender.kv_model_id(w, prefix, fmt))
            # one batched read per blend: fidelity times nothing, and the result is the same either way
            blenders[name] = Blender(w, stores[prefix, fmt], chunk_prefix=prefix, overlap=False, **opts)
        _store_chunks(blenders, all_prompts)
        for i, (ids, spans) in enumerate(all_prompts):
            ref = full_prefill(w, torch.tensor(ids))
            ref_seq = greedy_decode(w, ref.keys, ref.values, ref.logits, DECODE)
            ref_logp = F.log_softmax(ref.logits, -1)
            top2 = ref.logits.topk(2).values
            margin = float(top2[0] - top2[1])
            covered = torch.zeros(len(ids), dtype=torch.bool, device=w.device)
            for s, e in spans:
                covered[s:e] = True
            scores: dict[str, torch.Tensor] = {}
            reuse_kv: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # pure reuse's, config "0" (first)
            for name, blender in blenders.items():
                oracle = configs[name].get("oracle")
                forced = None
                if oracle:
                    if oracle not in scores:
                        attention = last_row_attention(w, torch.tensor(ids)) if oracle == "oracle-attn" else None
                        scores[oracle] = oracle_scores((ref.keys, ref.values), reuse_kv, covered,
                                                       blender.check_layer + 1, attention)
                    forced = oracle_rows(scores[oracle], covered, blender.ratio)
                res = blender.blend(ids, spans=spans, recompute=forced)
                if name == "0":
                    reuse_kv = (res.keys, res.values)
                seq = greedy_decode(w, res.keys, res.values, res.logits, DECODE, until_differs=ref_seq)
                rows[name].append(_row(ids, res, seq, ref_seq, ref_logp, margin))
            if (i + 1) % 10 == 0:
                _say(f"fidelity {i + 1}/{len(all_prompts)} prompts ({time.perf_counter() - t0:.0f} s)")
    out: dict[str, Any] = {name: _summarise(got) for name, got in rows.items()}
    if len(kv_formats) > 1:
        out["_paired"] = _paired(rows)
    out["_setup"] = {"model_dir": os.path.relpath(os.path.abspath(model_dir), REPO), "model_id": w.model_id,
                     "prompts": len(all_prompts),
                     "mean_prompt_tokens": statistics.fmean(len(p[0]) for p in all_prompts),
                     "chunks_per_prompt": "3-5", "tokens_per_chunk": "64-128", "decode_tokens": DECODE,
                     "device": str(w.device), "dtype": str(w.dtype), "chunk_prefix": list(CHUNK_PREFIX),
                     "kv_formats": list(kv_formats),
                     "near_tie_logits": NEAR_TIE,
                     "near_tie_share": statistics.fmean(r["margin"] < NEAR_TIE for r in rows["0"]),
                     "reference_top1_prob_median": statistics.median(r["ref_p1"] for r in rows["0"]),
                     "seconds": time.perf_counter() - t0}
    return out


def _curve(fid: dict[str, Any], prefix: str, suffix: str = "") -> list[tuple[float, dict[str, Any]]]:
    """(ratio, results) of the configs named "<prefix><ratio><suffix>", in ratio order."""
    out = []
    for name, res in fid.items():
        rest = name.removeprefix(prefix).removesuffix(suffix)
        if name.startswith(prefix) and name.endswith(suffix) and rest.replace(".", "", 1).isdigit():
            out.append((float(rest), res))
    return sorted(out, key=lambda p: p[0])


def plot_fidelity(fid: dict[str, Any], path: str) -> str:
    """Top-1 agreement vs recompute ratio: the selectors, the oracles and the 0.98 target; 16-token
    sequence agreement of the default selector beside them."""
    import matplotlib  # noqa: PLC0415 - optional, plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prefix, suffix, label, style in (
            ("", "", "deviation on V (default)", "-o"), ("epic-", "", "first tokens (EPIC)", "-^"),
            ("", "-kv-qw-g2", "K+V, question-weighted, gradual", "-v"),
            ("", f"-{DEFAULT_VARIANT}", "K+V, question-weighted, recency (the default)", "-s"),
            ("oracle-", "", "oracle: KV off most (final layers)", ":x"),
            ("oracle-attn-", "", "oracle: KV off x last-token attention", ":D")):
        pts = _curve(fid, prefix, suffix)
        if pts and (prefix or suffix):  # at ratio 0 every selection is pure reuse, at 1 a full prefill
            pts = sorted(pts + [(r, fid[k]) for r, k in ((0.0, "0"), (1.0, "1")) if k in fid], key=lambda p: p[0])
        if pts:
            ax.plot([p[0] for p in pts], [p[1]["top1_agreement"] for p in pts], style, ms=4, label=f"{label}: top-1")
    pts = _curve(fid, "")
    ax.plot([p[0] for p in pts], [p[1]["seq_agreement"] for p in pts], "--s", ms=3, label="deviation on V: 16 tokens")
    ax.axhline(0.98, color="grey", lw=0.8, ls="--", label="target 0.98 (top-1 at 0.15)")
    ax.set_xlabel("recompute ratio (share of chunk tokens)")
    ax.set_ylabel("agreement with full prefill")
    setup = fid.get("_setup", {})
    ax.set_title(f"{setup.get('model_dir', '')}, {setup.get('prompts', '?')} prompts", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def summary(fid: dict[str, Any]) -> dict[str, Any]:
    return {k: {m: round(v[m], 4) for m in ("top1_agreement", "seq_agreement", "kl")}
            for k, v in fid.items() if not k.startswith("_")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.blend_fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    standard_args(ap, "blend_fidelity", quick="30 prompts, no variants", full="200 prompts with the variants")
    ap.add_argument("--model", default=None, help="trained model folder (default jobs.trained_model's)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 200, --quick 30)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated config names (e.g. 0.15,oracle-0.15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-format", default=DEFAULT_KV_FORMAT, choices=KV_FORMATS,
                    help="also each config with its chunk KV in this format, beside the model's dtype (int8: "
                         "results in blend_fidelity_int8.json by default)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from jobs.trained_model import DEFAULT_MODEL_DIR  # noqa: PLC0415 - jobs/ is the repository's, optional here

    os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
    scratch = args.dir or tempfile.mkdtemp(prefix="blend-fidelity-", dir=os.path.join(REPO, "build"))
    model = args.model or str(DEFAULT_MODEL_DIR)
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    _say(f"fidelity on {model}")
    fid = fidelity(model, args.prompts or (30 if args.quick else 200), args.seed, scratch, args.device,
                   variants=not args.quick, only=args.only.split(",") if args.only else None,
                   kv_formats=tuple(dict.fromkeys((DEFAULT_KV_FORMAT, args.kv_format))))
    doc = {"fidelity": fid, "command": command, "machine": machine_info(scratch), "torch": torch.__version__,
           "mode": "quick" if args.quick else "full"}
    out = results_path(args, "blend_fidelity" if args.kv_format == DEFAULT_KV_FORMAT else f"blend_fidelity_{args.kv_format}")
    write_json(out, doc)
    _say(f"plot: {plot_fidelity(fid, os.path.splitext(out)[0] + '.png')}")
    _say(f"reproduce: {command}")
    print(json.dumps(summary(fid)))


if __name__ == "__main__":
    main()
