"""Llama-architecture models with random weights and a locally trained tokenizer: ``tiny`` and ``speed``.

No model hub is reachable from the machines this project runs on, so the vLLM runs use a model the
project builds itself (``shared/notes/vllm-cpu.md``): 4 layers, hidden 256, intermediate 512, 4
attention heads, 2 KV heads, head_dim 64, float32, weights drawn with std 0.2 so that greedy output
is not constant, except the output projection (lm_head), drawn with std 0.02: logits of std about 0.3
rather than 3. Reusing cached KV changes the order of vLLM's float32 sums, and the log-probabilities
move with the logits' scale (3.6e-5 at std 0.2, measured); at 0.02 they stay within the 1e-5 the
end-to-end test asks for, while the top tokens are still far apart compared with that. One 256-token chunk of its KV is 4 layers x 2 (K, V) x 256 x 2 heads x 64 x 4 bytes
= 1 MiB.

The ``speed`` shape (``--shape speed``) is the same recipe at about 100 M parameters (8 layers, hidden
1024, intermediate 2816, 16 attention heads, 2 KV heads of 64): prefill costs about 88 M multiply-adds a
token while a token's KV is 8 KiB (GQA), so on a 2-core CPU recomputing a 256-token chunk takes far
longer than moving its 2 MiB of KV; that is the shape where reusing KV pays (issue 15). Its projection
weights are drawn with std 0.2 * sqrt(256 / 1024) = 0.1 (lm_head 0.01), so activations keep the tiny
model's scale.

Everything is deterministic: the training text comes from a seeded generator in this file, the
byte-level BPE tokenizer is trained on it with ``tokenizers``, and the weights come from a seeded
NumPy generator, so every run writes the same bytes. ``OUT_DIR/.tiny-model-stamp`` records the hash
of this file; a directory whose stamp matches is left alone.

    python -m jobs.tiny_model OUT_DIR [--shape tiny|speed] [--force] [--check]

``--check`` loads the result in vLLM (needs ``vllm-cpu``) and generates greedily.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Architecture (shared/notes/vllm-cpu.md). The vocabulary size comes from the trained tokenizer.
NUM_LAYERS = 4
HIDDEN = 256
INTERMEDIATE = 512
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 64
MAX_POSITIONS = 4096
WEIGHT_STD = 0.2
LM_HEAD_STD = 0.02  # logits of std ~0.3 (see the module docstring)
TARGET_VOCAB = 4096



@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    weight_std: float
    lm_head_std: float

    def params(self, vocab_size: int) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.num_layers * layer + 2 * vocab_size * self.hidden + self.hidden

    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4  # float32


SHAPES = {
    "tiny": Shape(NUM_LAYERS, HIDDEN, INTERMEDIATE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, WEIGHT_STD, LM_HEAD_STD),
    "speed": Shape(8, 1024, 2816, 16, 2, 64, 0.1, 0.01),
}

TEXT_SEED = 20261123
WEIGHT_SEED = 1234
LEXICON_SIZE = 3000
CORPUS_SENTENCES = 20000

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2

STAMP_NAME = ".tiny-model-stamp"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
_PUNCT = [".", ".", ".", "?", "!", ";"]


def script_hash(shape: str = "tiny") -> str:
    """Hash of this file and the shape: the version a stamp records (any edit rebuilds the model)."""
    return hashlib.sha256(Path(__file__).read_bytes() + shape.encode()).hexdigest()[:16]


class TextGenerator:
    """Seeded pseudo-English: a fixed syllable lexicon drawn with Zipf-like frequencies.

    The same generator (same lexicon) makes the tokenizer's training text and, with other seeds,
    the documents and conversations of the main job, so the tokenizer compresses both alike.
    """

    def __init__(self, seed: int) -> None:
        lex_rng = random.Random(TEXT_SEED)  # the lexicon never depends on the caller's seed
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < LEXICON_SIZE:
            n = lex_rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
            w = "".join(lex_rng.choice(_ONSETS) + lex_rng.choice(_VOWELS) + lex_rng.choice(_CODAS)
                        for _ in range(n))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        self.weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        n = self.rng.randint(4, 18)
        ws = self.rng.choices(self.words, weights=self.weights, k=n)
        if self.rng.random() < 0.15:
            ws.insert(self.rng.randrange(len(ws)), str(self.rng.randint(0, 9999)))
        if self.rng.random() < 0.2:
            ws[self.rng.randrange(len(ws))] += ","
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice(_PUNCT)

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))

    def corpus(self, sentences: int) -> Iterator[str]:
        for _ in range(sentences):
            yield self.sentence()


def train_tokenizer():  # -> tokenizers.Tokenizer
    """Byte-level BPE trained on the generated corpus; same merges and ids on every run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # A list, not an iterator: the trainer's pass over the text is then one deterministic sequence.
    tok.train_from_iterator(list(TextGenerator(TEXT_SEED).corpus(CORPUS_SENTENCES)), trainer=trainer)
    return tok


def model_config(vocab_size: int, shape: Shape = SHAPES["tiny"]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def random_weights(vocab_size: int, shape: Shape = SHAPES["tiny"]) -> dict:
    """HF Llama tensor names -> float32 arrays; projections ~ N(0, weight_std^2), norms = 1."""
    import numpy as np

    rng = np.random.default_rng(WEIGHT_SEED)
    hidden, inter = shape.hidden, shape.intermediate

    def normal(*dims: int, std: float = shape.weight_std):
        return (rng.standard_normal(dims, dtype=np.float32) * np.float32(std)).astype(np.float32)

    q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    t = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        t[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        t[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        t[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        t[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        t[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        t[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    t["model.norm.weight"] = np.ones(hidden, np.float32)
    t["lm_head.weight"] = normal(vocab_size, hidden, std=shape.lm_head_std)
    return t


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def is_built(out_dir: str | os.PathLike, shape: str = "tiny") -> bool:
    out = Path(out_dir)
    try:
        stamp = (out / STAMP_NAME).read_text().strip()
    except OSError:
        return False
    return stamp == script_hash(shape) and all((out / f).is_file() for f in MODEL_FILES)


def build(out_dir: str | os.PathLike, force: bool = False, log=None, shape: str = "tiny") -> Path:
    """Write the model of ``shape`` into ``out_dir`` unless a stamp from this version of the script is there."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    out = Path(out_dir)
    if not force and is_built(out, shape):
        if log:
            log(f"{shape} model: {out} already built by this version ({script_hash(shape)}), skipped")
        return out
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP_NAME).unlink(missing_ok=True)
    # Build in a sibling temp dir, then move file by file: a half-written directory never carries a stamp.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp") as tmp_s:
        tmp = Path(tmp_s)
        tok = train_tokenizer()
        vocab_size = tok.get_vocab_size()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MAX_POSITIONS
        )
        fast.save_pretrained(tmp)
        # transformers 5 writes its new class name; the older, still-accepted name loads in 4.x too.
        tc = json.loads((tmp / "tokenizer_config.json").read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write_json(tmp / "tokenizer_config.json", tc)
        if not (tmp / "special_tokens_map.json").exists():  # newer transformers fold it into the config
            _write_json(tmp / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
        _write_json(tmp / "config.json", model_config(vocab_size, SHAPES[shape]))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "do_sample": False})
        save_file(random_weights(vocab_size, SHAPES[shape]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in sorted(tmp.iterdir()):
            f.chmod(0o644)  # safetensors creates its file 0600
            os.replace(f, out / f.name)
    (out / STAMP_NAME).write_text(script_hash(shape) + "\n")
    if log:
        log(f"{shape} model: built in {out} (vocab {vocab_size}, "
            f"{SHAPES[shape].params(vocab_size) / 1e6:.0f} M parameters, version {script_hash(shape)})")
    return out


def close_llm(llm) -> None:
    """Shut a ``vllm.LLM`` down now, engine-core and worker processes included.

    Without this the interpreter's exit hangs on this vLLM version: multiprocessing's atexit hook
    joins the EngineCore process, which waits for a shutdown message nobody sends (seen here: the
    process sat in ``_exit_function`` for minutes after its last output).
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown(timeout=30)


def check(out_dir: str | os.PathLike) -> list[list[int]]:
    """Load the model in vLLM and generate greedily; raise if the output is constant."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out_dir), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    try:
        gen = TextGenerator(7)
        prompts = [gen.paragraph(3) for _ in range(4)]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    finally:
        close_llm(llm)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    for p, o in zip(prompts, outs):
        print(f"prompt {len(o.prompt_token_ids or [])} tokens: {p[:60]!r}...", file=sys.stderr)
        print(f"  -> {o.outputs[0].token_ids[:24]} {o.outputs[0].text[:80]!r}", file=sys.stderr)
    distinct = {t for seq in ids for t in seq}
    if len(distinct) < 4 or len({tuple(s) for s in ids}) < 2:
        raise RuntimeError(f"greedy output looks constant: {ids}")
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.tiny_model", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="tiny (4 layers, hidden 256) or speed (about 100 M parameters); default %(default)s")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    ap.add_argument("--check", action="store_true", help="load the model in vLLM and generate greedily")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    build(args.out_dir, force=args.force, log=log, shape=args.shape)
    if args.check:
        check(args.out_dir)
        log("tiny model: vLLM generated non-constant greedy output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
