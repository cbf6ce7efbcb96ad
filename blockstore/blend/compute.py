"""The Llama forward in pieces, on any subset of a prompt's token rows: what both the full prefill
and the blender run. Every function takes explicit positions; attention takes an explicit position
mask (`k_pos <= q_pos`), which is right for scattered query rows where a bottom-right-aligned causal
mask (flash-attention's `causal=True` with fewer queries than keys) is not.

Shapes: hidden rows [n, hidden]; q [n, heads, head_dim]; k, v [n, kv_heads, head_dim].
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from blockstore.blend import flex, fused_rope
from blockstore.blend.llama import LayerWeights, LlamaWeights

# Query rows per attention call on CPU: the math kernel materialises [heads, rows, keys] scores,
# which for 8k keys and all rows at once would take gigabytes.
CPU_QUERY_BLOCK = 512


class _PerTensorMemo:
    """Values derived from tensors that every layer of a forward passes again (the rows' positions):
    computed once per tensor object while it is unchanged (same object, same version counter). On a GPU
    each op costs ~10 us of Python and dispatch whatever its size, so the 8-10 small ops of RoPE tables
    and a mask per layer were a large part of a blend's time. Holds its keys, so an id is never reused
    while cached; a few entries bound the memory."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: list[tuple[tuple[torch.Tensor, ...], tuple[int, ...], object, object]] = []
        self._lock = threading.Lock()

    def get(self, tensors: tuple[torch.Tensor, ...], extra: object, make: Callable[[], object]) -> object:
        # inference tensors keep no version counter: for them the object alone is the key (nothing here
        # changes a positions tensor in place)
        versions = tuple(-1 if t.is_inference() else t._version for t in tensors)
        with self._lock:
            for keys, vers, ext, value in self._entries:
                if ext == extra and vers == versions and all(a is b for a, b in zip(keys, tensors)):
                    return value
        value = make()
        with self._lock:
            self._entries = [(tensors, versions, extra, value), *self._entries[: self.size - 1]]
        return value


_ROPE = _PerTensorMemo(8)
_MASKS = _PerTensorMemo(4)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim] in float32 for these (possibly negative: a delta) positions, in the
    half-split layout Hugging Face's Llama uses (rotate_half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * signed_sin, one op
    fewer on every row than building rotate_half (the two halves of `sin` are equal)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def _rope_of(positions: torch.Tensor, head_dim: int, theta: float,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) of these positions in `dtype`, once per positions tensor (every layer
    rotates by the same)."""
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(positions, head_dim, theta)
        return cos.to(dtype)[:, None, :], _signed_sin(sin).to(dtype)[:, None, :]
    return _ROPE.get((positions,), (head_dim, theta, dtype), make)  # type: ignore[return-value]


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in x's dtype (cos, signed_sin [n, 1, head_dim], already in it):
    three kernels. Hugging Face's Llama and vLLM's rotary kernel also rotate a bf16 model's q and k
    in bf16."""
    # roll: one op where slicing both halves and a cat are three (each op costs the CPU ~10-20 us on a
    # GPU host, where a blend's later layers are bound by issuing ops)
    if out is None:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
    if fused_rope.usable(x.device) and fused_rope.rotate_into(out, x, cos, signed_sin):  # one kernel (GPU)
        return out
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin, out=out)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, heads, head_dim] rotated by the angles whose cos, sin [n, head_dim] rope_cos_sin gave,
    in x's dtype (into `out` if given). x may also be [chunks, tokens, heads, head_dim], n = chunks *
    tokens rows in that order (a strided view of a loaded layer). A blend re-rotates every layer's
    cached K by the same angles, so the tables in x's dtype (and the signed sin) are made once per
    (cos, sin) pair."""
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return cos.to(x.dtype)[:, None, :], _signed_sin(sin).to(x.dtype)[:, None, :]
    tables: tuple[torch.Tensor, torch.Tensor] = _ROPE.get((cos, sin), ("signed", x.dtype), make)  # type: ignore[assignment]
    if x.dim() == 4:
        tables = (tables[0].view(*x.shape[:2], 1, -1), tables[1].view(*x.shape[:2], 1, -1))
    return _rotate_signed(x, *tables, out=out)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [n, heads, head_dim] rotated by `positions` [n]. RoPE composes (R(a) R(b) = R(a + b)), so
    rotating a K computed at old positions by (new - old) gives K at the new positions."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    return rotate(x, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (statistics in float32): one fused op where torch has one."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def qkv(w: LlamaWeights, layer: LayerWeights, hidden: torch.Tensor, positions: torch.Tensor, *,
        own_k: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh q, k (both after RoPE at `positions`) and v of these rows. q and k come from one matmul
    (LayerWeights.qk_proj) and are rotated together (3 kernels for both heads' kinds: the tables are the
    same); v from its own matmul, so that a kept V does not hold q's memory. q is a view of the rotated
    q|k rows; so is k with `own_k=False` (a caller that only copies k out of it this layer: one copy
    kernel fewer), else k is its own tensor (one that is kept, as a prefill keeps its keys, must not
    hold q's memory)."""
    c = w.config
    x = rms_norm(hidden, layer.input_norm, c.rms_norm_eps)
    n, heads = x.shape[0], c.num_attention_heads
    qk = F.linear(x, layer.qk_proj)  # x @ W.T in one op
    v = F.linear(x, layer.v_proj).view(n, c.num_key_value_heads, c.head_dim)
    cos, signed_sin = _rope_of(positions, c.head_dim, c.rope_theta, x.dtype)
    rotated = _rotate_signed(qk.view(n, heads + c.num_key_value_heads, c.head_dim), cos, signed_sin)
    k = rotated[:, heads:]
    return rotated[:, :heads], (k.contiguous() if own_k else k), v


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[n_q, n_k] True where query i may attend key j: the key is at or before the query's position."""
    return k_pos[None, :] <= q_pos[:, None]


def _folded_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The position mask of `group` copies of the query rows (see _fold) as an additive bias in the
    attention's dtype (0 or -inf; what SDPA would convert a boolean mask to on every call): built once
    per (q_pos, k_pos) pair, the same in every layer of a blend."""
    def make() -> torch.Tensor:
        allowed = position_mask(q_pos.repeat(group), k_pos)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return bias[None, None]  # [1, 1, rows, keys]: as SDPA takes it
    return _MASKS.get((q_pos, k_pos), (group, dtype), make)  # type: ignore[return-value]


def _fold(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [n, heads, d] -> [1, kv_heads, group * n, d]: the query heads that share a KV head become more
    query rows of that head (query head h uses KV head h // group, as repeat_interleave pairs them),
    so grouped-query attention needs no copy of K and V per query head."""
    n, heads, d = q.shape
    return q.view(n, kv_heads, heads // kv_heads, d).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, d)


def _unfold(out: torch.Tensor, n: int) -> torch.Tensor:
    """_fold's inverse on the attention output: [1, kv_heads, group * n, d] -> [n, heads * d]."""
    _, kv_heads, rows, d = out.shape
    return out.view(kv_heads, rows // n, n, d).permute(2, 0, 1, 3).reshape(n, -1)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """k or v [n, kv_heads, d] -> [1, kv_heads, n, d] (a view), as SDPA takes them."""
    return x.view(1, *x.shape).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
           causal_all_rows: bool = False, tail_rows: bool = False, sorted_rows: bool = False) -> torch.Tensor:
    """Attention of these query rows over all keys, masked by position -> [n_q, heads * head_dim].

    `causal_all_rows`: the caller promises q and k are the same rows in position order (a full
    prefill), so the fused causal kernel may be used instead of an explicit mask. `tail_rows`: the
    caller has checked (`is_tail`) that the query rows are the last rows of a contiguous run of keys.
    `sorted_rows`: both q_pos and k_pos are ascending (a blend's rows and keys), so on a GPU FlexAttention
    may skip the key tiles a tile of rows cannot see (flex.py). All are promises, not checks: a check
    here would wait for the GPU in every layer."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kh, vh = _heads_first(k), _heads_first(v)  # [1, kv_heads, n_k, d]
    block = CPU_QUERY_BLOCK if q.device.type == "cpu" else 4096
    if causal_all_rows or (tail_rows and q.shape[0] <= block):
        qh = _heads_first(q)  # [1, heads, n_q, d]
        if kv_heads != heads:  # fused kernels take one KV head per query head
            kh = kh.repeat_interleave(heads // kv_heads, dim=1)
            vh = vh.repeat_interleave(heads // kv_heads, dim=1)
        # fused kernels (flash on CUDA and CPU) never materialise the scores; the query rows of
        # `tail_rows` are the last rows of a contiguous run of keys, where the position mask IS the
        # bottom-right causal one
        mask = None if causal_all_rows else causal_lower_right(q.shape[0], k.shape[0])
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal_all_rows)
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)
    n, group = q.shape[0], heads // kv_heads
    if sorted_rows and flex.usable(q.device):  # the key tiles no row of a tile may see are skipped (flex.py)
        tiles = _MASKS.get((q_pos, k_pos), "flex", lambda: flex.block_mask(q_pos, k_pos))
        got = flex.attend(q, k, v, tiles)  # type: ignore[arg-type]
        if got is not None:
            return got
    if q.device.type != "cpu":  # all rows in one call, the mask built once per blend
        out = F.scaled_dot_product_attention(_fold(q, kv_heads), kh, vh,
                                             attn_mask=_folded_mask(q_pos, k_pos, group, q.dtype))
        return _unfold(out, n)
    parts = []
    for start in range(0, n, block):
        rows = slice(start, start + block)
        allowed = position_mask(q_pos[rows].repeat(group), k_pos)
        got = F.scaled_dot_product_attention(_fold(q[rows], kv_heads), kh, vh, attn_mask=allowed)
        parts.append(_unfold(got, q[rows].shape[0]))
    return torch.cat(parts)


def is_tail(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether keys are positions k0..k0+n-1 in order and the queries the last len(q_pos) of them (rows
    are sorted and distinct, so first, last and count decide it)."""
    nq, nk = q_pos.shape[0], k_pos.shape[0]
    ends = torch.stack((q_pos[0], q_pos[-1], k_pos[0], k_pos[-1], k_pos[nk - nq])).tolist()  # one sync
    return bool(ends[1] - ends[0] == nq - 1 and ends[3] - ends[2] == nk - 1 and ends[1] == ends[3]
                and ends[4] == ends[0])


def finish_layer(w: LlamaWeights, layer: LayerWeights, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Residual, o_proj and the MLP of these rows: the layer's output hidden states (gate and up in one
    matmul, each residual add fused into its matmul)."""
    h = torch.addmm(hidden, attn, layer.o_proj_t)
    x = rms_norm(h, layer.post_norm, w.config.rms_norm_eps)
    gate, up = F.linear(x, layer.gate_up_proj).chunk(2, dim=-1)
    return torch.addmm(h, F.silu(gate) * up, layer.down_proj_t)


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
