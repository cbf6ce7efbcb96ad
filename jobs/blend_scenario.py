"""The main job's blend scenario: documents and memory chunks come back in new orders and combinations,
and vLLM serves them with blended KV from blockstore (issue 15, item 4).

On the trained model (``jobs.trained_model``; random weights say nothing about which tokens matter):

1. Chunks of held-out text (documents, memory items) and short questions, all token ids. A prompt is
   ``chunk SEP chunk SEP ... SEP question`` with SEP the connector's separator string tokenized by the
   model's tokenizer (``blockstore.connector.blend_connector``), as LMCache's blend mode cuts prompts.
2. **Full prefill**: an ``LLM`` without any KV connector, prefix caching off, runs every prompt.
3. **Blend**: an ``LLM`` with vLLM's ``MultiConnector`` (the blend connector, then LMCache's MP connector
   when a server port is given). The *seed* prompts bring every chunk once (nothing is stored yet, so
   nothing is claimed: vLLM computes them and the connector stores their chunks after the step); the
   *mix* prompts then carry the same chunks in other orders and combinations with new questions, and
   the connector serves them blended.
4. What it shows: tokens served blended (the connector's own counters, and vLLM's num_cached_tokens),
   TTFT of the mix prompts against full prefill of the same prompts, and greedy agreement with full
   prefill (first token, and all ``MAX_TOKENS`` tokens).

``python -m jobs.main_job`` runs it after the prefix-reuse passes; ``tests/test_blend_connector.py``
runs it without the LMCache server.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockstore.connector.blend_connector import DEFAULT_SEPARATOR, multi_connector_config, separator_token_ids
from jobs import tiny_model
from jobs.trained_model import DEFAULT_MODEL_DIR, heldout_chunks

MAX_MODEL_LEN = 2048
MAX_TOKENS = 16
RATIO = 0.15


@dataclass
class BlendRequest:
    name: str
    ids: list[int]
    chunks: list[int]  # which chunks, in prompt order
    seed: bool  # brings its chunks for the first time


@dataclass
class BlendWorkload:
    requests: list[BlendRequest]
    description: str
    warmup_ids: list[int]

    @property
    def mixes(self) -> list[BlendRequest]:
        return [r for r in self.requests if not r.seed]


def build_blend_workload(model_dir: Path = DEFAULT_MODEL_DIR, quick: bool = False,
                         separator: str = DEFAULT_SEPARATOR) -> BlendWorkload:
    """Seed prompts that bring every chunk once, then mixes: 3-4 of the same chunks, shuffled, new question."""
    n_chunks, per_seed, n_mixes, chunk_tokens = (6, 3, 4, 280) if quick else (8, 4, 8, 320)
    sep = list(separator_token_ids(str(model_dir), separator))
    chunks = heldout_chunks(n_chunks, chunk_tokens, seed=1501, model_dir=model_dir)
    questions = heldout_chunks(n_chunks // per_seed + n_mixes + 1, 48, seed=1502, model_dir=model_dir)
    rng = random.Random(1503)

    def prompt(order: list[int], question: list[int]) -> list[int]:
        ids: list[int] = []
        for c in order:
            ids += chunks[c] + sep
        return ids + question

    reqs = [BlendRequest(f"seed{i}", prompt(list(range(i * per_seed, (i + 1) * per_seed)), questions[i]),
                         list(range(i * per_seed, (i + 1) * per_seed)), True) for i in range(n_chunks // per_seed)]
    for m in range(n_mixes):
        order = rng.sample(range(n_chunks), rng.choice((3, 4)))
        reqs.append(BlendRequest(f"mix{m}", prompt(order, questions[len(reqs)]), order, False))
    for r in reqs:
        if len(r.ids) > MAX_MODEL_LEN - MAX_TOKENS:
            raise ValueError(f"{r.name}: {len(r.ids)} tokens do not fit max_model_len {MAX_MODEL_LEN}")
    lens = [len(r.ids) for r in reqs]
    desc = (f"{len(reqs) - n_mixes} seed prompts bring {n_chunks} held-out chunks of <= {chunk_tokens} tokens; "
            f"{n_mixes} mixes recombine 3-4 of them in new orders with new questions; prompts {min(lens)}-"
            f"{max(lens)} tokens, separator {separator!r} = {len(sep)} tokens")
    return BlendWorkload(reqs, desc, questions[-1])


@dataclass
class Served:
    name: str
    token_ids: list[int]
    cached_tokens: int
    ttft_s: float | None


@dataclass
class BlendOutcome:
    workload: BlendWorkload
    full: list[Served]
    blended: list[Served]
    counters: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def mix_pairs(self) -> list[tuple[Served, Served]]:
        names = {r.name for r in self.workload.mixes}
        return [(f, b) for f, b in zip(self.full, self.blended, strict=True) if f.name in names]

    def first_token_agreement(self) -> float:
        pairs = self.mix_pairs()
        return sum(f.token_ids[:1] == b.token_ids[:1] for f, b in pairs) / len(pairs)

    def sequence_agreement(self) -> float:
        pairs = self.mix_pairs()
        return sum(f.token_ids == b.token_ids for f, b in pairs) / len(pairs)

    def token_agreement(self) -> float:
        """Greedy tokens equal to full prefill's, position by position, up to the first difference."""
        pairs = self.mix_pairs()
        agree = 0
        for f, b in pairs:
            for x, y in zip(f.token_ids, b.token_ids):
                if x != y:
                    break
                agree += 1
        return agree / sum(len(f.token_ids) for f, _ in pairs)

    def ttft_median_ms(self, which: list[Served]) -> float | None:
        names = {r.name for r in self.workload.mixes}
        xs = [s.ttft_s for s in which if s.name in names and s.ttft_s]
        return 1000 * statistics.median(xs) if xs else None


def make_llm(model_dir: Path, transfer: dict[str, Any] | None):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
               enable_prefix_caching=False, disable_log_stats=False, seed=0,
               kv_transfer_config=None if transfer is None else KVTransferConfig(**transfer))


def serve_all(llm, workload: BlendWorkload, log: Callable[[str], None], label: str) -> list[Served]:
    """One request at a time (a mix can use what a seed stored; each TTFT is the request's own)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=workload.warmup_ids)], sp, use_tqdm=False)  # one-off set-up
    out: list[Served] = []
    for r in workload.requests:
        res = llm.generate([TokensPrompt(prompt_token_ids=r.ids)], sp, use_tqdm=False)[0]
        ttft = getattr(res.metrics, "first_token_latency", None) if res.metrics is not None else None
        out.append(Served(r.name, list(res.outputs[0].token_ids), res.num_cached_tokens or 0, ttft or None))
        log(f"  blend/{label} | {r.name}: {len(r.ids)} prompt tokens, {out[-1].cached_tokens} served by a "
            f"connector, TTFT {1000 * (ttft or 0):.1f} ms")
    return out


def run_blend_scenario(model_dir: Path, store: Path, workload: BlendWorkload, log: Callable[[str], None],
                       lmcache_port: int | None = None, ratio: float = RATIO) -> BlendOutcome:
    """Full prefill, then the blend engine on ``store`` (emptied by the caller); engines closed on return."""
    stats = store.parent / f"{store.name}-connector-stats.json"
    stats.unlink(missing_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    llm = make_llm(model_dir, None)
    try:
        full = serve_all(llm, workload, log, "full prefill")
    finally:
        tiny_model.close_llm(llm)
    timings["full prefill engine"] = time.perf_counter() - t
    t = time.perf_counter()
    llm = make_llm(model_dir, multi_connector_config(store, lmcache_port, ratio=ratio, stats_path=str(stats)))
    try:
        blended = serve_all(llm, workload, log, "blend")
    finally:
        tiny_model.close_llm(llm)
    timings["blend engine"] = time.perf_counter() - t
    try:
        counters = json.loads(stats.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"the blend connector wrote no counters to {stats}: {e}") from e
    return BlendOutcome(workload, full, blended, counters, timings)


def report_lines(o: BlendOutcome) -> list[str]:
    c = o.counters
    served = sum(b.cached_tokens for _, b in o.mix_pairs())
    mix_tokens = sum(len(r.ids) for r in o.workload.mixes)
    full_ms, blend_ms = o.ttft_median_ms(o.full), o.ttft_median_ms(o.blended)
    ratio = f" ({full_ms / blend_ms:.2f}x)" if full_ms and blend_ms else ""
    lines = [f"blend workload: {o.workload.description}",
             f"{'request':<8}{'tokens':>8}{'chunks':>14}{'blended':>9}{'TTFT full':>11}{'TTFT blend':>12}"
             f"{'1st tok':>9}{'16 tok':>8}"]
    for r, f, b in zip(o.workload.requests, o.full, o.blended, strict=True):
        lines.append(f"{r.name:<8}{len(r.ids):>8}{','.join(map(str, r.chunks)):>14}{b.cached_tokens:>9}"
                     f"{1000 * (f.ttft_s or 0):>9.1f}ms{1000 * (b.ttft_s or 0):>10.1f}ms"
                     f"{'=' if f.token_ids[:1] == b.token_ids[:1] else 'DIFF':>9}"
                     f"{'=' if f.token_ids == b.token_ids else 'DIFF':>8}")
    lines += [
        f"mixes: {served}/{mix_tokens} prompt tokens served blended (vLLM's count); connector: "
        f"{c.get('requests_blended')} requests blended, {c.get('tokens_written')} tokens written into vLLM's "
        f"cache, {c.get('tokens_reused')} from stored chunks, {c.get('tokens_recomputed')} recomputed by the "
        f"blender, {c.get('chunks_hit')} chunk hits, {c.get('chunks_stored')} chunks stored, "
        f"{c.get('load_failures')} failures; blend {c.get('blend_seconds', 0):.2f}s in all",
        f"TTFT median of the mixes: full prefill {full_ms or 0:.1f} ms, blended {blend_ms or 0:.1f} ms{ratio}",
        f"greedy agreement with full prefill (mixes, ratio {RATIO}): first token {o.first_token_agreement():.0%}, "
        f"all {MAX_TOKENS} tokens {o.sequence_agreement():.0%}, tokens before the first difference "
        f"{o.token_agreement():.0%}",
    ]
    return lines


def report_json(o: BlendOutcome) -> dict[str, Any]:
    return {"requests": len(o.workload.requests), "mixes": len(o.workload.mixes),
            "served_blended_tokens": sum(b.cached_tokens for _, b in o.mix_pairs()),
            "connector": o.counters, "ttft_ms_median_full": o.ttft_median_ms(o.full),
            "ttft_ms_median_blended": o.ttft_median_ms(o.blended),
            "first_token_agreement": o.first_token_agreement(), "sequence_agreement": o.sequence_agreement(),
            "token_agreement": o.token_agreement(), "timings_s": o.timings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.blend_scenario",
                                 description="The main job's blend scenario on its own (no LMCache server).")
    ap.add_argument("--store", required=True,
                    help="chunk KV store directory; must be absent or empty unless --reset-store")
    ap.add_argument("--reset-store", action="store_true", help="allow emptying a non-empty --store")
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="trained model folder (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="6 chunks, 4 mixes")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    for k, v in {"DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                 "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(k, v)
    store = Path(args.store)
    # a folder the user named may hold a store they keep: emptied only when asked (as the main job's --store)
    if store.exists() and any(store.iterdir()):
        if not args.reset_store:
            raise SystemExit(f"--store {store} is not empty; pass --reset-store to let the scenario empty it")
        shutil.rmtree(store)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    outcome = run_blend_scenario(Path(args.model), store, build_blend_workload(Path(args.model), args.quick), log)
    print("\n".join(report_lines(outcome)), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(outcome), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
