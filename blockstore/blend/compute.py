"""The Llama forward in pieces, on any subset of a prompt's token rows: what both the full prefill
and the blender run. Every function takes explicit positions; attention takes an explicit position
mask (`k_pos <= q_pos`), which is right for scattered query rows where a bottom-right-aligned causal
mask (flash-attention's `causal=True` with fewer queries than keys) is not.

Shapes: hidden rows [n, hidden]; q [n, heads, head_dim]; k, v [n, kv_heads, head_dim].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from blockstore.blend.llama import LayerWeights, LlamaWeights

# Query rows per attention call on CPU: the math kernel materialises [heads, rows, keys] scores,
# which for 8k keys and all rows at once would take gigabytes.
CPU_QUERY_BLOCK = 512


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim] in float32 for these (possibly negative: a delta) positions, in the
    half-split layout Hugging Face's Llama uses (rotate_half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, head_dim] rotated by the angles whose cos, sin [n, head_dim] rope_cos_sin gave."""
    xf = x.to(torch.float32)
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [n, heads, head_dim] rotated by `positions` [n]. RoPE composes (R(a) R(b) = R(a + b)), so
    rotating a K computed at old positions by (new - old) gives K at the new positions."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    return rotate(x, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def qkv(w: LlamaWeights, layer: LayerWeights, hidden: torch.Tensor,
        positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh q, k (both after RoPE at `positions`) and v of these rows."""
    c = w.config
    x = rms_norm(hidden, layer.input_norm, c.rms_norm_eps)
    n = x.shape[0]
    q = (x @ layer.q_proj.T).view(n, c.num_attention_heads, c.head_dim)
    k = (x @ layer.k_proj.T).view(n, c.num_key_value_heads, c.head_dim)
    v = (x @ layer.v_proj.T).view(n, c.num_key_value_heads, c.head_dim)
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[n_q, n_k] True where query i may attend key j: the key is at or before the query's position."""
    return k_pos[None, :] <= q_pos[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
           causal_all_rows: bool = False, tail_rows: bool = False) -> torch.Tensor:
    """Attention of these query rows over all keys, masked by position -> [n_q, heads * head_dim].

    `causal_all_rows`: the caller promises q and k are the same rows in position order (a full
    prefill), so the fused causal kernel may be used instead of an explicit mask. `tail_rows`: the
    caller has checked (`is_tail`) that the query rows are the last rows of a contiguous run of keys.
    Both are promises, not checks: a check here would wait for the GPU in every layer."""
    heads, kv_heads = q.shape[1], k.shape[1]
    qh = q.transpose(0, 1)  # [heads, n_q, d]
    kh = k.transpose(0, 1)
    vh = v.transpose(0, 1)
    if kv_heads != heads:  # grouped-query attention: each KV head serves heads // kv_heads query heads
        kh = kh.repeat_interleave(heads // kv_heads, dim=0)
        vh = vh.repeat_interleave(heads // kv_heads, dim=0)
    if causal_all_rows:  # fused kernels (flash on CUDA and CPU) never materialise the scores
        out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True)[0]
        return out.transpose(0, 1).reshape(q.shape[0], -1)
    block = CPU_QUERY_BLOCK if q.device.type == "cpu" else 4096
    if tail_rows and q.shape[0] <= block:
        # the query rows are the last rows of a contiguous run of keys (a prefix reused, the rest
        # computed): here the position mask IS the bottom-right causal one, which fused kernels take
        # without materialising it
        out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None],
                                             attn_mask=causal_lower_right(q.shape[0], k.shape[0]))[0]
        return out.transpose(0, 1).reshape(q.shape[0], -1)
    parts = []
    for start in range(0, q.shape[0], block):
        rows = slice(start, start + block)
        mask = position_mask(q_pos[rows], k_pos)
        parts.append(F.scaled_dot_product_attention(qh[None, :, rows], kh[None], vh[None], attn_mask=mask)[0])
    return torch.cat(parts, dim=1).transpose(0, 1).reshape(q.shape[0], -1)


def is_tail(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether keys are positions k0..k0+n-1 in order and the queries the last len(q_pos) of them (rows
    are sorted and distinct, so first, last and count decide it)."""
    nq, nk = q_pos.shape[0], k_pos.shape[0]
    ends = torch.stack((q_pos[0], q_pos[-1], k_pos[0], k_pos[-1], k_pos[nk - nq])).tolist()  # one sync
    return bool(ends[1] - ends[0] == nq - 1 and ends[3] - ends[2] == nk - 1 and ends[1] == ends[3]
                and ends[4] == ends[0])


def finish_layer(w: LlamaWeights, layer: LayerWeights, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Residual, o_proj and the MLP of these rows: the layer's output hidden states."""
    h = hidden + attn @ layer.o_proj.T
    x = rms_norm(h, layer.post_norm, w.config.rms_norm_eps)
    return h + (F.silu(x @ layer.gate_proj.T) * (x @ layer.up_proj.T)) @ layer.down_proj.T


def logits_of(w: LlamaWeights, hidden_row: torch.Tensor) -> torch.Tensor:
    """float32 logits [vocab] of one row's final hidden state."""
    return (rms_norm(hidden_row, w.norm, w.config.rms_norm_eps) @ w.lm_head.T).to(torch.float32)


@dataclass
class Prefill:
    """Per-layer K (after RoPE) and V of every token, and the last token's logits."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor


@torch.inference_mode()
def full_prefill(w: LlamaWeights, token_ids: torch.Tensor, positions: torch.Tensor | None = None) -> Prefill:
    """The reference: every layer over every token (positions 0..n-1 unless given)."""
    n = token_ids.shape[0]
    pos = torch.arange(n, device=w.device) if positions is None else positions.to(w.device)
    contiguous = positions is None
    hidden = w.embed[token_ids.to(w.device)]
    keys, values = [], []
    for layer in w.layers:
        q, k, v = qkv(w, layer, hidden, pos)
        keys.append(k)
        values.append(v)
        hidden = finish_layer(w, layer, hidden, attend(q, k, v, pos, pos, causal_all_rows=contiguous))
    return Prefill(keys, values, logits_of(w, hidden[-1]))


@torch.inference_mode()
def greedy_decode(w: LlamaWeights, keys: list[torch.Tensor], values: list[torch.Tensor], first_logits: torch.Tensor,
                  steps: int, *, until_differs: Sequence[int] | None = None) -> list[int]:
    """`steps` greedy tokens continuing a prefill whose KV is `keys`/`values` (positions 0..n-1) and
    whose last-token logits are `first_logits`. The caches are not modified. `until_differs`: stop
    after the first token that differs from this reference sequence (an agreement measurement needs
    no more)."""
    n = keys[0].shape[0]
    ks, vs = list(keys), list(values)
    out = [int(first_logits.argmax())]
    for step in range(steps - 1):
        if until_differs is not None and out[-1] != until_differs[len(out) - 1]:
            break
        pos = torch.tensor([n + step], device=w.device)
        hidden = w.embed[torch.tensor([out[-1]], device=w.device)]
        all_pos = torch.arange(n + step + 1, device=w.device)
        for i, layer in enumerate(w.layers):
            q, k, v = qkv(w, layer, hidden, pos)
            ks[i] = torch.cat((ks[i], k))
            vs[i] = torch.cat((vs[i], v))
            hidden = finish_layer(w, layer, hidden, attend(q, ks[i], vs[i], pos, all_pos))
        out.append(int(logits_of(w, hidden[-1]).argmax()))
    return out
