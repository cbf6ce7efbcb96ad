"""vLLM (CPU) and transformers load the trained model folder and agree: proof that the HF format is right.

Both run in float32 on the same held-out prompt. Their first-token log-probabilities must agree (top-1
token equal, the top-20 log-probabilities within ``LOGPROB_TOLERANCE``), and both greedy continuations
are printed with how many of their tokens agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobs.tiny_model import close_llm
from jobs.trained_model.heldout import heldout_chunks, load_tokenizer

LOGPROB_TOLERANCE = 1e-3  # float32 in both; the two differ only in the order of their sums
PROMPT_TOKENS = 384
NEW_TOKENS = 16
TOP_K = 20


def transformers_run(model_dir: Path, ids: list[int]) -> tuple[dict[int, float], list[int]]:
    """(first-token log-probability of every token, greedy continuation) from transformers."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(x).logits[0, -1].float(), dim=-1)
        out = model.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return dict(enumerate(logprobs.tolist())), out[0, len(ids):].tolist()


def vllm_run(model_dir: Path, ids: list[int]) -> tuple[dict[int, float], list[int]]:
    """(first-token top-20 log-probabilities, greedy continuation) from vLLM on CPU."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0].outputs[0]
    finally:
        close_llm(llm)
    first = out.logprobs[0] if out.logprobs else {}
    return {t: lp.logprob for t, lp in first.items()}, list(out.token_ids)


def check(model_dir: Path, log=print) -> dict:
    """Raise AssertionError unless vLLM and transformers agree on the first token; return the figures."""
    ids = heldout_chunks(1, PROMPT_TOKENS, seed=0, model_dir=model_dir)[0]
    tok = load_tokenizer(model_dir)
    hf_lp, hf_seq = transformers_run(model_dir, ids)
    vl_lp, vl_seq = vllm_run(model_dir, ids)
    top_hf = max(hf_lp, key=lambda t: hf_lp[t])
    top_vl = max(vl_lp, key=lambda t: vl_lp[t])
    worst = max(abs(vl_lp[t] - hf_lp[t]) for t in vl_lp)
    agree = sum(a == b for a, b in zip(hf_seq, vl_seq))
    log(f"check: prompt {len(ids)} held-out tokens ...{tok.decode(ids[-40:])!r}")
    log(f"check: transformers -> {tok.decode(hf_seq)!r}")
    log(f"check: vLLM         -> {tok.decode(vl_seq)!r}")
    log(f"check: first token {top_hf} (transformers) {top_vl} (vLLM); top-{len(vl_lp)} log-prob max diff "
        f"{worst:.2e}; greedy tokens agreeing {agree}/{NEW_TOKENS}")
    assert len(vl_lp) >= TOP_K, f"vLLM returned {len(vl_lp)} log-probabilities, expected {TOP_K}"
    assert top_hf == top_vl, f"first token differs: transformers {top_hf}, vLLM {top_vl}"
    assert worst <= LOGPROB_TOLERANCE, f"log-probabilities differ by {worst:.2e} > {LOGPROB_TOLERANCE}"
    return {"first_token": top_hf, "max_logprob_diff": worst, "greedy_agreement": agree / NEW_TOKENS}
