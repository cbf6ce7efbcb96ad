"""Continue training a model folder so that blended chunk KV reads like a full prefill (issue 15).

    python -m jobs.models.finetune_block_attention CORPUS OUT [--base jobs/models/trained-llama] --steps N

CORPUS is the folder ``python -m jobs.trained_model corpus`` wrote (``train.u16`` or ``train.u16.xz``,
``heldout.u16``); the base model is the committed ``trained-llama`` unless ``--base`` names another.
Each step takes one batch of ordinary causal windows of the training split (the base's own objective, so
the model stays a language model under full attention) and one batch of block sequences
(``jobs.models.block_attention``: chunks encoded on their own, then text reading them, as the blender
reuses chunk KV): next-token cross-entropy on both, plus ``kl_weight`` x KL(full attention || block
attention) on the rows after the chunks, the full-attention side computed by the same model without a
gradient (self-distillation: the blend is pulled towards the model's own full prefill, which is what
blending fidelity compares with). AdamW, linear warm-up then cosine decay, gradient clip 1.0, fixed seed
(weights are the base's; the seed fixes the order of windows and sequences), bfloat16 autocast on CUDA.

Measured before the first step and every ``eval_every`` steps, on held-out text only: the held-out loss
under full causal attention (the same 32 windows of 2048 tokens as the base's training run, so the
numbers compare with its loss curve), and on a fixed set of held-out block sequences the answer rows'
cross-entropy under block and full attention, their KL, and how often both pick the same next token.
Writes OUT as an HF Llama folder (weights in bfloat16), the base's tokenizer and held-out files, and
``loss_curve.json`` / ``loss_curve.png`` (every step's losses, the evaluations, the run's facts), then
``MANIFEST.sha256``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.models.block_attention import IGNORE, BlockSpec, answer_kl, block_forward, make_block_batch
from jobs.trained_model.heldout import DEFAULT_MODEL_DIR, load_tokenizer
from jobs.trained_model.llama import LlamaForCausalLM, LlamaShape, hf_config
from jobs.trained_model.manifest import write_manifest
from jobs.trained_model.train import TrainSettings, heldout_loss, loss_of, make_optimizer, windows, write_json

BASE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "heldout.jsonl.gz", "corpus.json")


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    causal_batch: int = 16
    seq_len: int = 2048
    block_batch: int = 32
    kl_weight: float = 1.0
    # Weight of KL(full || block) with the gradient through the full-attention side instead (0: off): pulls
    # the model's full prefill towards what it computes from reused chunk KV as well, the other half of
    # making the two agree; the causal batch keeps the full-attention language model anchored.
    full_grad: float = 0.0
    eval_every: int = 100
    eval_windows: int = 32  # held-out windows for the full-attention loss: the base's 32 x 2048
    eval_seq_len: int = 2048
    eval_blocks: int = 128  # held-out block sequences
    seed: int = 0
    time_budget: float = 0.0  # seconds of training (0: none): fixes `steps` once the warm-up's steps are timed


def lr_at(step: int, s: FinetuneSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_base(model_dir: Path, device: torch.device) -> LlamaForCausalLM:
    """The model folder's weights (bfloat16 on disk) in float32, in the training module."""
    from safetensors.torch import load_file  # noqa: PLC0415 - as train.py: only the training needs it

    cfg = json.loads((model_dir / "config.json").read_text())
    shape = LlamaShape(**{k: cfg[k] for k in LlamaShape.__dataclass_fields__ if k in cfg})
    model = LlamaForCausalLM(shape)
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match config.json (missing {missing}, unexpected {unexpected})")
    return model.to(device)


def load_stream(corpus: Path, name: str) -> np.ndarray:
    """A token stream of the corpus folder, from NAME or its xz-compressed NAME.xz."""
    path = corpus / name
    raw = path.read_bytes() if path.exists() else lzma.decompress((corpus / f"{name}.xz").read_bytes())
    return np.frombuffer(raw, dtype="<u2").astype(np.int32)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, held: torch.Tensor, blocks: list, s: FinetuneSettings,
             use_bf16: bool) -> dict[str, float]:
    """Held-out loss under full causal attention and the block-vs-full figures (module docstring)."""
    model.eval()
    causal = heldout_loss(model, held, TrainSettings(seq_len=s.eval_seq_len, eval_windows=s.eval_windows), use_bf16)
    sums = {"block_ce": 0.0, "full_ce": 0.0, "kl": 0.0, "top1": 0.0}
    rows = 0
    for batch in blocks:
        with torch.autocast(held.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            full, block = model(batch.ids).float(), block_forward(model, batch).float()
        answer = batch.answer & (batch.targets != IGNORE)
        n = int(answer.sum())
        sums["block_ce"] += float(F.cross_entropy(block[answer], batch.targets[answer], reduction="sum"))
        sums["full_ce"] += float(F.cross_entropy(full[answer], batch.targets[answer], reduction="sum"))
        sums["kl"] += float(answer_kl(full, block, answer)) * n
        sums["top1"] += float((full[answer].argmax(-1) == block[answer].argmax(-1)).sum())
        rows += n
    model.train()
    return {"heldout_loss": round(causal, 5),
            **{f"heldout_answer_{k}": round(v / rows, 5) for k, v in sums.items()}}


def _step(model: LlamaForCausalLM, opt: torch.optim.Optimizer, train: torch.Tensor, train_np: np.ndarray,
          gen: torch.Generator, rng: np.random.Generator, step: int, join: list[int], s: FinetuneSettings,
          use_bf16: bool) -> torch.Tensor:
    for g in opt.param_groups:
        g["lr"] = lr_at(step, s)
    offsets = torch.randint(0, train.numel() - s.seq_len - 1, (s.causal_batch,), generator=gen)
    causal = loss_of(model, *windows(train, offsets, s.seq_len), use_bf16)
    causal.backward()  # frees the causal batch's graph before the block batch's
    batch = make_block_batch(train_np, rng, s.block_batch, join).to(train.device)
    with torch.autocast(train.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        with torch.set_grad_enabled(s.full_grad > 0):
            full = model(batch.ids)
        block = block_forward(model, batch)
    ce = F.cross_entropy(block.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    kl = answer_kl(full.detach(), block, batch.answer)
    loss = ce + s.kl_weight * kl
    if s.full_grad > 0:
        loss = loss + s.full_grad * answer_kl(full, block.detach(), batch.answer)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack((causal.detach(), ce.detach(), kl.detach()))  # no sync with the GPU each step


def check_same_tokenizer(corpus: Path, base: Path) -> None:
    """Refuse a corpus whose token ids come from another tokenizer than the model's (a corpus built on
    another machine trains its own: rebuild it with ``corpus OUT --tokenizer MODEL_DIR``)."""
    ours, theirs = corpus / "tokenizer.json", base / "tokenizer.json"
    if ours.exists() and ours.read_bytes() != theirs.read_bytes():
        raise SystemExit(f"finetune: {corpus} was encoded with another tokenizer than {base}'s; rebuild it with "
                         f"`python -m jobs.trained_model corpus {corpus} --tokenizer {base}`")


def run_finetune(corpus: Path, base: Path, out: Path, s: FinetuneSettings, log=print) -> dict[str, Any]:
    """Fine-tune ``base`` and write ``out`` (module docstring); returns the loss-curve record."""
    check_same_tokenizer(corpus, base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.type == "cuda"
    torch.manual_seed(s.seed)
    model = load_base(base, device)
    train_np, held_np = load_stream(corpus, "train.u16"), load_stream(corpus, "heldout.u16")
    train, held = torch.from_numpy(train_np).to(device), torch.from_numpy(held_np).to(device)
    join = load_tokenizer(base).encode("\n\n").ids
    eval_rng = np.random.default_rng(s.seed + 1)  # the same held-out block sequences at every evaluation
    blocks = [make_block_batch(held_np, eval_rng, 16, join).to(device) for _ in range(max(1, s.eval_blocks // 16))]
    opt = make_optimizer(model, TrainSettings(weight_decay=s.weight_decay))
    gen, rng = torch.Generator().manual_seed(s.seed), np.random.default_rng(s.seed)
    log(f"finetune: {base} on {device}, {train.numel()} train tokens, {s.steps} steps of {s.causal_batch} x "
        f"{s.seq_len} causal + {s.block_batch} block sequences")
    evals = [{"step": 0, **evaluate(model, held, blocks, s, use_bf16)}]
    log(f"finetune: before {evals[0]}")
    losses: list[torch.Tensor] = []
    t0 = time.perf_counter()
    step = 0
    while step < s.steps:
        losses.append(_step(model, opt, train, train_np, gen, rng, step, join, s, use_bf16))
        step += 1
        if s.time_budget and step == s.warmup:  # the schedule after the warm-up depends on `steps`: set it now
            if train.is_cuda:
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t0) / step
            s = replace(s, steps=max(step + 1, min(s.steps, int(s.time_budget / per_step))))
            log(f"finetune: {per_step * 1000:.0f} ms a step, {s.steps} steps fit in {s.time_budget:.0f} s")
        if step % s.eval_every == 0 or step == s.steps:
            evals.append({"step": step, **evaluate(model, held, blocks, s, use_bf16)})
            last = losses[-1].tolist()
            log(f"step {step}/{s.steps} causal {last[0]:.3f} block {last[1]:.3f} kl {last[2]:.4f} "
                f"{time.perf_counter() - t0:.0f}s eval {evals[-1]}")
    wall = time.perf_counter() - t0
    curves = torch.stack(losses).float().cpu().T.tolist()
    record = {
        "train_loss": {name: [round(x, 5) for x in curves[i]] for i, name in enumerate(("causal", "block", "kl"))},
        "evaluations": evals,
        "run": {"base": str(base), "settings": asdict(s), "block_spec": asdict(BlockSpec()), "wall_s": round(wall, 1),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "seconds_per_step": round(wall / max(1, s.steps), 4)},
    }
    save_model(model, base, out, record)
    return record


def save_model(model: LlamaForCausalLM, base: Path, out: Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", hf_config(model.shape))
    for name in BASE_FILES:
        if (base / name).exists():
            shutil.copyfile(base / name, out / name)
    write_json(out / "loss_curve.json", record)
    plot_record(record, out / "loss_curve.png")
    write_manifest(out)


def plot_record(record: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    steps = range(1, len(record["train_loss"]["causal"]) + 1)
    for name in ("causal", "block"):
        ax.plot(steps, record["train_loss"][name], lw=0.5, label=f"train, {name} (batch)")
    ev = record["evaluations"]
    x = [e["step"] for e in ev]
    ax.plot(x, [e["heldout_loss"] for e in ev], "o-", ms=3, label="held-out, full causal attention")
    ax.plot(x, [e["heldout_answer_block_ce"] for e in ev], "s-", ms=3, label="held-out answer rows, block")
    ax.plot(x, [e["heldout_answer_full_ce"] for e in ev], "^-", ms=3, label="held-out answer rows, full")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax2.plot(x, [e["heldout_answer_kl"] for e in ev], "o-", ms=3, label="KL(full || block), answer rows")
    ax2.plot(x, [1 - e["heldout_answer_top1"] for e in ev], "s-", ms=3, label="next token differs")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    run = record["run"]
    fig.suptitle(f"block-attention fine-tune of {Path(run['base']).name}: {len(steps)} steps, {run['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    d = FinetuneSettings()
    ap = argparse.ArgumentParser(prog="python -m jobs.models.finetune_block_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="the corpus folder (train.u16 or train.u16.xz, heldout.u16)")
    ap.add_argument("out", type=Path, help="the model folder to write")
    ap.add_argument("--base", type=Path, default=DEFAULT_MODEL_DIR, help="the model folder to start from")
    for name, value in asdict(d).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"({value})")
    args = ap.parse_args(argv)
    s = FinetuneSettings(**{k: getattr(args, k) for k in asdict(d)})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    record = run_finetune(args.corpus, args.base, args.out, s, log=log)
    first, last = record["evaluations"][0], record["evaluations"][-1]
    log(f"finetune: held-out loss (full attention) {first['heldout_loss']} -> {last['heldout_loss']}, answer-row "
        f"KL {first['heldout_answer_kl']} -> {last['heldout_answer_kl']}, wall {record['run']['wall_s']} s")
    print(json.dumps({"before": first, "after": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
