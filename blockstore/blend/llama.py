"""A Llama model's weights as plain tensors: loaded from a Hugging Face folder (config.json plus
safetensors) or drawn at random for speed measurements, in the shapes `blockstore.blend.compute`
runs. No nn.Module: the blender calls the pieces of a layer on chosen token rows, which a module's
forward does not let it do.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import xxhash
from safetensors.torch import load_file

from blockstore.errors import InvalidArgument


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture facts a forward needs (names as in Hugging Face's LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        """From a config.json's contents. RoPE scaling is refused: re-rotating cached K by a position
        delta is exact only for plain RoPE (LMCache's blender has the same limit)."""
        if raw.get("rope_scaling"):
            raise InvalidArgument(f"rope_scaling {raw['rope_scaling']!r} is not supported by the blender")
        heads = int(raw["num_attention_heads"])
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw and raw[f.name] is not None}
        values.setdefault("num_key_value_heads", heads)
        values.setdefault("head_dim", int(raw["hidden_size"]) // heads)
        cfg = cls(**values)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise InvalidArgument(f"{cfg.num_attention_heads} attention heads is not a multiple of "
                                  f"{cfg.num_key_value_heads} KV heads")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named shapes for speed runs (random weights): "cpu-125m" is prefill-bound on a 2-core CPU without
# taking minutes per prompt; "llama-8b" is Llama-3-8B's shape (bf16 on a GPU).
SHAPES: dict[str, LlamaConfig] = {
    "cpu-125m": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=12, num_key_value_heads=4, head_dim=64),
    "llama-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
}


@dataclass
class LayerWeights:
    """One layer's weights. q and k projections live in one tensor (qk_proj), gate and up in another
    (gate_up_proj): one matmul each instead of two, and on a GPU, where a blend's later layers run a
    few hundred rows, each op saved is ~10 us of launch. q_proj, k_proj, gate_proj and up_proj are views
    of them (no second copy)."""

    input_norm: torch.Tensor
    q_proj: torch.Tensor  # [heads * head_dim, hidden], as nn.Linear stores it
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    qk_proj: torch.Tensor = field(init=False, repr=False)  # [(heads + kv_heads) * head_dim, hidden]
    gate_up_proj: torch.Tensor = field(init=False, repr=False)  # [2 * intermediate, hidden]
    o_proj_t: torch.Tensor = field(init=False, repr=False)  # o_proj.T and down_proj.T: views made once,
    down_proj_t: torch.Tensor = field(init=False, repr=False)  # not one transpose op a layer a forward

    def __post_init__(self) -> None:
        self.qk_proj = torch.cat((self.q_proj, self.k_proj))
        self.q_proj, self.k_proj = self.qk_proj.split((self.q_proj.shape[0], self.k_proj.shape[0]))
        self.gate_up_proj = torch.cat((self.gate_proj, self.up_proj))
        self.gate_proj, self.up_proj = self.gate_up_proj.chunk(2)
        self.o_proj_t, self.down_proj_t = self.o_proj.T, self.down_proj.T


_LAYER_NAMES = {
    "input_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj", "post_norm": "post_attention_layernorm",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}


@dataclass
class LlamaWeights:
    config: LlamaConfig
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, hidden]
    model_id: str
    # CUDA graphs of blends on these weights (graphs.py), by bucket, oldest first: they bake in these
    # tensors' addresses, so they live and die with them
    graph_buckets: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    graph_sightings: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)  # graphs.wanted

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def from_pretrained(cls, model_dir: str, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, model_id: str | None = None) -> LlamaWeights:
        """A Hugging Face Llama folder: config.json and one or more *.safetensors files."""
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                config = LlamaConfig.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{model_dir}: not a Llama model folder ({exc})") from exc
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
            tensors.update(load_file(path))
        if not tensors:
            raise InvalidArgument(f"{model_dir}: no *.safetensors file")

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                raise InvalidArgument(f"{model_dir}: weight {name} missing")
            return tensors[name].to(device=device, dtype=dtype)

        layers = [LayerWeights(**{field: take(f"model.layers.{i}.{hf}.weight") for field, hf in _LAYER_NAMES.items()})
                  for i in range(config.num_hidden_layers)]
        embed = take("model.embed_tokens.weight")
        lm_head = embed if config.tie_word_embeddings or "lm_head.weight" not in tensors else take("lm_head.weight")
        ident = model_id or f"{os.path.basename(os.path.normpath(model_dir))}:{_digest(tensors)}"
        return cls(config, embed, layers, take("model.norm.weight"), lm_head, ident)

    @classmethod
    def random(cls, config: LlamaConfig | str, seed: int = 0, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, std: float = 0.02) -> LlamaWeights:
        """Random weights (normal, `std`; norms 1) in a named shape (SHAPES) or a given config: for
        speed, where what the weights say does not matter. Drawn on `device`, so an 8B shape costs
        seconds on a GPU."""
        cfg = SHAPES[config] if isinstance(config, str) else config
        gen = torch.Generator(device=device).manual_seed(seed)
        c = cfg

        def draw(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        layers = [LayerWeights(ones(c.hidden_size), draw(q_out, c.hidden_size), draw(kv_out, c.hidden_size),
                               draw(kv_out, c.hidden_size), draw(c.hidden_size, q_out), ones(c.hidden_size),
                               draw(c.intermediate_size, c.hidden_size), draw(c.intermediate_size, c.hidden_size),
                               draw(c.hidden_size, c.intermediate_size))
                  for _ in range(c.num_hidden_layers)]
        embed = draw(c.vocab_size, c.hidden_size)
        lm_head = embed if c.tie_word_embeddings else draw(c.vocab_size, c.hidden_size)
        return cls(cfg, embed, layers, ones(c.hidden_size), lm_head, f"random:{seed}:{json.dumps(c.to_dict())}")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of a checkpoint's whole content (xxh3 reads ~10 GB/s: an 8B checkpoint costs a
    second or two): chunk KV records name the model they were computed with, and two checkpoints of the
    same folder name, a fine-tune and its base say, must not share them."""
    h = xxhash.xxh3_64()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()
