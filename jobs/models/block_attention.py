"""Block-attention sequences: the model run over chunks encoded on their own, as the blender reuses them.

A blended prompt is ``<s>``, chunks with separators between them, and a question. The blender
(``blockstore.blend.Blender``) reuses each chunk's KV computed on its own after ``<s>`` (``<s>`` at
position 0, the chunk at 1..n), K re-rotated to the chunk's place in the prompt; every token outside the
chunks (``<s>``, separators, question) is computed with full attention over that reused KV. At recompute
ratio 0 this is exactly one forward with a different attention pattern (Block-Attention for RAG, Sun et
al. 2024), which ``block_forward`` runs and ``tests/test_blend_finetune.py`` checks against the blender:

- a chunk row attends to its own chunk's rows up to itself and to ``<s>``, at the distance it had when
  the chunk was encoded alone (one past its offset in the chunk). RoPE depends only on the distance, so
  chunk rows keep their prompt positions and each chunk gets its own copy of ``<s>``'s K and V, rotated
  to the position just before the chunk; the real ``<s>`` at 0 is hidden from chunk rows;
- every other row attends causally to every row before it (the chunks' rows carry chunk-local KV);
- layer 0's K and V are a function of the token and its position alone, so the blender's fresh layer 0
  and the reused one agree, and one pass serves every layer.

``make_block_batch`` draws such sequences from a token stream: 3-5 chunks of 64-128 tokens (the
benchmark's sizes), joined by the tokens of a blank line, then a blank line and 16-64 tokens that can
only be predicted by reading one of the chunks (picked at random, not always the last): the text that
followed it in the stream, or a passage of it quoted again and continued. Not the benchmark's questions:
those stay unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from jobs.trained_model.llama import DecoderLayer, LlamaForCausalLM, apply_rope, rope_cos_sin

BOS = 0  # <s>
IGNORE = -100  # a target no loss is taken on (padding, the last row)
PAD_SEGMENT = -1  # rows past a sequence's end: they attend to themselves only


@dataclass(frozen=True)
class BlockSpec:
    """Sizes of a block sequence (inclusive ranges): the benchmark's prompts are 3-5 chunks of 64-128."""

    chunks: tuple[int, int] = (3, 5)
    chunk_tokens: tuple[int, int] = (64, 128)
    suffix_tokens: tuple[int, int] = (16, 64)

    def max_tokens(self, join: int) -> int:
        return 1 + self.chunks[1] * (self.chunk_tokens[1] + join) + join + self.suffix_tokens[1]


@dataclass
class BlockBatch:
    """B padded block sequences. ``segment``: 0 outside chunks, c for the c-th chunk (1-based), -1 padding;
    ``bos_positions`` (B, C): where chunk c's copy of <s> sits (start - 1); ``answer``: the rows after
    the first chunk that are outside every chunk (separators and continuation) — the rows whose output
    reads reused KV, where the blend is compared with full attention."""

    ids: torch.Tensor
    targets: torch.Tensor
    segment: torch.Tensor
    bos_positions: torch.Tensor
    answer: torch.Tensor

    def to(self, device: torch.device | str) -> BlockBatch:
        return BlockBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def _sequence(data: np.ndarray, rng: np.random.Generator, join: list[int], spec: BlockSpec) -> tuple[list[int], list[int]]:
    """One block sequence's token ids and segments (module docstring)."""
    ids, seg, sources = [BOS], [0], []
    longest_suffix = spec.suffix_tokens[1]
    for c in range(1, int(rng.integers(spec.chunks[0], spec.chunks[1] + 1)) + 1):
        n = int(rng.integers(spec.chunk_tokens[0], spec.chunk_tokens[1] + 1))
        start = int(rng.integers(0, len(data) - n - longest_suffix))
        sources.append((start, n))
        ids += data[start:start + n].tolist() + join
        seg += [c] * n + [0] * len(join)
    start, n = sources[int(rng.integers(0, len(sources)))]
    quoted = int(rng.integers(0, n)) if rng.random() < 0.5 else n  # a quote from inside it, or what followed
    m = int(rng.integers(spec.suffix_tokens[0], longest_suffix + 1))
    ids += data[start + quoted:start + quoted + m].tolist()  # after the last separator: a blank line first
    seg += [0] * m
    return ids, seg


def make_block_batch(data: np.ndarray, rng: np.random.Generator, batch: int, join: list[int],
                     spec: BlockSpec = BlockSpec()) -> BlockBatch:
    """``batch`` block sequences from the token stream ``data`` (see the module docstring)."""
    if len(data) <= 2 * (spec.chunk_tokens[1] + spec.suffix_tokens[1]):
        raise ValueError(f"a token stream of {len(data)} tokens is too short for block sequences")
    seqs, segs = zip(*(_sequence(data, rng, join, spec) for _ in range(batch)))
    width = max(map(len, seqs))
    n_chunks = max(max(s) for s in segs)
    ids_t = torch.full((batch, width), BOS, dtype=torch.int64)
    seg_t = torch.full((batch, width), PAD_SEGMENT, dtype=torch.int64)
    targets = torch.full((batch, width), IGNORE, dtype=torch.int64)
    bos_pos = torch.zeros((batch, n_chunks), dtype=torch.int64)
    for b, (ids, seg) in enumerate(zip(seqs, segs)):
        ids_t[b, :len(ids)] = torch.tensor(ids)
        seg_t[b, :len(seg)] = torch.tensor(seg)
        targets[b, :len(ids) - 1] = torch.tensor(ids[1:])
        for c in range(1, max(seg) + 1):
            bos_pos[b, c - 1] = seg.index(c) - 1
    first_chunk = (seg_t > 0).int().argmax(dim=1, keepdim=True)
    rows = torch.arange(width)[None, :]
    answer = (seg_t == 0) & (rows > first_chunk)
    return BlockBatch(ids_t, targets, seg_t, bos_pos, answer)


def block_mask(segment: torch.Tensor, n_copies: int) -> torch.Tensor:
    """(B, 1, T, C + T) bool, True = may attend: keys are chunk c's <s> copy (c = 1..C), then the rows."""
    t = segment.shape[1]
    rows = torch.arange(t, device=segment.device)
    causal = rows[None, :, None] >= rows[None, None, :]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    outside_reads_all = (seg_q == 0) & (seg_k != PAD_SEGMENT)
    chunk_reads_itself = (seg_q > 0) & (seg_q == seg_k)
    padding_reads_itself = (seg_q == PAD_SEGMENT) & (rows[None, :, None] == rows[None, None, :])
    real = causal & (outside_reads_all | chunk_reads_itself) | padding_reads_itself
    copies = seg_q == torch.arange(1, n_copies + 1, device=segment.device)[None, None, :]
    return torch.cat((copies, real), dim=2)[:, None]


def block_forward(model: LlamaForCausalLM, batch: BlockBatch) -> torch.Tensor:
    """Logits (B, T, vocab) of the block sequences with the blender's attention pattern (module docstring)."""
    s = model.shape
    bsz, t = batch.ids.shape
    n_copies = batch.bos_positions.shape[1]
    positions = torch.arange(t, device=batch.ids.device)
    cos_q, sin_q = rope_cos_sin(positions, s.head_dim, s.rope_theta)
    key_positions = torch.cat((batch.bos_positions, positions.expand(bsz, t)), dim=1)
    cos_k, sin_k = (x.view(bsz, 1, n_copies + t, s.head_dim)
                    for x in rope_cos_sin(key_positions.flatten(), s.head_dim, s.rope_theta))
    mask = block_mask(batch.segment, n_copies)
    x = model.model.embed_tokens(batch.ids)
    for layer in cast(list[DecoderLayer], model.model.layers):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q = apply_rope(att.q_proj(h).view(bsz, t, att.heads, att.head_dim).transpose(1, 2), cos_q, sin_q)
        k = att.k_proj(h).view(bsz, t, att.kv_heads, att.head_dim).transpose(1, 2)
        v = att.v_proj(h).view(bsz, t, att.kv_heads, att.head_dim).transpose(1, 2)
        # <s> is row 0 of every sequence; its copies' K and V are its own, rotated to the copies' positions
        k = apply_rope(torch.cat((k[:, :, :1].expand(-1, -1, n_copies, -1), k), dim=2), cos_k, sin_k)
        v = torch.cat((v[:, :, :1].expand(-1, -1, n_copies, -1), v), dim=2)
        group = att.heads // att.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + att.o_proj(out.transpose(1, 2).reshape(bsz, t, att.heads * att.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def answer_kl(full_logits: torch.Tensor, block_logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Mean KL(full || block) of the next-token distributions over the answer rows."""
    full = F.log_softmax(full_logits[answer].float(), dim=-1)
    block = F.log_softmax(block_logits[answer].float(), dim=-1)
    return (full.exp() * (full - block)).sum(-1).mean()
