"""Training loop: AdamW with warm-up and cosine decay on random windows of the corpus's token ids.

Runs on CUDA when there is a GPU (bfloat16 autocast, ``torch.compile`` when it works) and on the CPU
otherwise (float32). Every random choice comes from ``--seed``: the initial weights, the order of the
training windows. Given ``--time-budget`` instead of ``--steps``, a calibration of a few steps on a
throw-away copy of the optimizer measures the step time first, and the number of steps that fits is fixed
before the real run starts (and recorded, so ``--steps N`` repeats the run); the learning-rate schedule
is always a function of the step alone.

Writes the model folder: ``model.safetensors`` (bfloat16, HF names), ``config.json``,
``generation_config.json``, the corpus's tokenizer files, ``heldout.jsonl.gz`` and ``corpus.json``, and
``loss_curve.json`` (training loss at every step, held-out loss every ``eval_every`` steps, and the run's
facts: device, torch version, wall time, tokens seen) with its plot ``loss_curve.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.trained_model.corpus import TOKENIZER_FILES
from jobs.trained_model.llama import LlamaForCausalLM, LlamaShape, hf_config

COPIED_CORPUS_FILES = (*TOKENIZER_FILES, "heldout.jsonl.gz", "corpus.json")
CALIBRATION_STEPS = 12


@dataclass(frozen=True)
class TrainSettings:
    seq_len: int = 2048
    batch: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_windows: int = 32
    seed: int = 0


def lr_at(step: int, steps: int, s: TrainSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine down to ``lr * min_lr_ratio``."""
    warmup = min(s.warmup, max(1, steps // 10))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_tokens(path: Path, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype="<u2").astype(np.int32)).to(device)


def eval_offsets(n_tokens: int, s: TrainSettings) -> torch.Tensor:
    """Evenly spaced held-out windows: the same ones at every evaluation."""
    count = min(s.eval_windows, max(1, (n_tokens - 1) // s.seq_len))
    return torch.linspace(0, n_tokens - s.seq_len - 2, count).long()


def windows(data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = offsets.to(data.device)[:, None] + torch.arange(seq_len + 1, device=data.device)[None, :]
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def loss_of(model, ids: torch.Tensor, targets: torch.Tensor, use_bf16: bool) -> torch.Tensor:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(ids)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def heldout_loss(model, data: torch.Tensor, s: TrainSettings, use_bf16: bool) -> float:
    losses = []
    for off in eval_offsets(data.numel(), s).split(8):
        ids, targets = windows(data, off, s.seq_len)
        losses.append(loss_of(model, ids, targets, use_bf16).item() * len(off))
    return sum(losses) / len(eval_offsets(data.numel(), s))


def make_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _step(model, opt, data, gen, step, steps, s, use_bf16) -> torch.Tensor:
    for g in opt.param_groups:
        g["lr"] = lr_at(step, steps, s)
    offsets = torch.randint(0, data.numel() - s.seq_len - 1, (s.batch,), generator=gen)
    ids, targets = windows(data, offsets, s.seq_len)
    loss = loss_of(model, ids, targets, use_bf16)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def calibrate(raw, data, s, use_bf16, log) -> tuple[Any, float]:
    """Seconds per step, measured on a throw-away optimizer; returns the model to use (compiled if it ran)."""
    initial = {k: v.clone() for k, v in raw.state_dict().items()}
    candidates = [torch.compile(raw), raw] if data.is_cuda else [raw]
    for candidate in candidates:
        try:
            opt = make_optimizer(raw, s)
            gen = torch.Generator().manual_seed(s.seed + 1)
            _step(candidate, opt, data, gen, 0, 100, s, use_bf16)  # compiles
            sync(data)
            t0 = time.perf_counter()
            for i in range(CALIBRATION_STEPS):
                _step(candidate, opt, data, gen, i, 100, s, use_bf16)
            sync(data)
            per_step = (time.perf_counter() - t0) / CALIBRATION_STEPS
            model = candidate
            break
        except Exception as e:  # noqa: BLE001 - torch.compile fails in many ways; eager is the fallback
            log(f"train: {type(e).__name__} with {'compiled' if candidate is not raw else 'eager'} model: {e}")
    else:
        raise RuntimeError("training step failed in every mode")
    raw.load_state_dict(initial)  # the real run starts from the seeded weights
    log(f"train: {per_step * 1000:.1f} ms/step ({'compiled' if model is not raw else 'eager'})")
    return model, per_step


def sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def run_training(corpus: Path, out: Path, steps: int | None, time_budget: float | None,
                 s: TrainSettings, log=print, shape: LlamaShape | None = None) -> dict:
    """Train and write the model folder (module docstring); returns the loss-curve record.

    ``shape`` defaults to the committed model's (LlamaShape's defaults, the corpus's vocabulary).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.type == "cuda"
    torch.manual_seed(s.seed)
    vocab = json.loads((corpus / "corpus.json").read_text())["vocab_size"]
    shape = shape or LlamaShape(vocab_size=vocab)
    raw = LlamaForCausalLM(shape)
    raw.init_weights(s.seed)
    raw.to(device)
    train_data = load_tokens(corpus / "train.u16", device)
    held = load_tokens(corpus / "heldout.u16", device)
    log(f"train: {shape.parameter_count() / 1e6:.2f} M parameters, {train_data.numel()} train tokens, "
        f"{held.numel()} held-out tokens, device {device}")
    model: Any = raw  # the module, or its torch.compile wrapper
    if steps is None or device.type == "cuda":  # on CUDA also to learn whether torch.compile works
        model, per_step = calibrate(raw, train_data, s, use_bf16, log)
        steps = steps or max(20, int((time_budget or 60) / per_step))
    log(f"train: {steps} steps of {s.batch} x {s.seq_len} tokens")
    opt = make_optimizer(raw, s)
    gen = torch.Generator().manual_seed(s.seed)
    train_losses: list[torch.Tensor] = []
    held_curve: list[tuple[int, float]] = [(0, heldout_loss(model, held, s, use_bf16))]
    t0 = time.perf_counter()
    for step in range(steps):
        train_losses.append(_step(model, opt, train_data, gen, step, steps, s, use_bf16))
        if (step + 1) % s.eval_every == 0 or step + 1 == steps:
            held_curve.append((step + 1, heldout_loss(model, held, s, use_bf16)))
            log(f"step {step + 1}/{steps} train {train_losses[-1].item():.3f} held-out {held_curve[-1][1]:.3f} "
                f"lr {lr_at(step, steps, s):.2e} {time.perf_counter() - t0:.0f}s")
    sync(train_data)
    wall = time.perf_counter() - t0
    record = {
        "train_loss": [round(x, 5) for x in torch.stack(train_losses).float().cpu().tolist()],
        "heldout_loss": [[st, round(x, 5)] for st, x in held_curve],
        "run": {"steps": steps, "settings": asdict(s), "shape": asdict(shape), "wall_s": round(wall, 1),
                "tokens_seen": steps * s.batch * s.seq_len, "train_tokens": int(train_data.numel()),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "compiled": model is not raw, "seconds_per_step": round(wall / steps, 4)},
    }
    save_model(raw, shape, corpus, out, record)
    return record


def save_model(raw: LlamaForCausalLM, shape: LlamaShape, corpus: Path, out: Path, record: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in raw.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    write_json(out / "config.json", hf_config(shape))
    write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
                                                "do_sample": False})
    for name in COPIED_CORPUS_FILES:
        shutil.copyfile(corpus / name, out / name)
    write_json(out / "loss_curve.json", record)
    plot_losses(record, out / "loss_curve.png")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def plot_losses(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(range(1, len(record["train_loss"]) + 1), record["train_loss"], lw=0.6, label="train (batch)")
    held = np.asarray(record["heldout_loss"])
    ax.plot(held[:, 0], held[:, 1], "o-", ms=3, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(9.0, float(held[:, 1].max()) + 0.5))
    run = record["run"]
    ax.set_title(f"trained-llama: {run['steps']} steps, {run['tokens_seen'] / 1e6:.0f} M tokens, {run['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
