"""Writing K/V for given prompt positions into vLLM's paged KV cache on the CPU backend.

vLLM CPU 0.32 keeps one tensor per attention layer, ``[num_blocks, num_kv_heads, block_size,
2 * head_dim]`` (layout ``LBHNC``: head-major block interiors), viewed as ``[num_blocks, num_kv_heads,
2 * block_size, head_dim]`` and split into a key half and a value half. The value half is a plain
``[token, head_dim]`` grid, but the key half is packed for the attention kernel's ISA (measured on the
``vec`` ISA: K is not where a plain index puts it). So K/V go in through vLLM's own
``cpu_attn_reshape_and_cache``, the op its attention layer uses to store freshly computed tokens: the
bytes land exactly where the kernel reads them, whatever the ISA's packing.
"""

from __future__ import annotations

import re

import torch
from vllm import _custom_ops as vllm_ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from blockstore.errors import InvalidArgument

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(layer_name: str) -> int:
    """The decoder layer a vLLM attention layer name belongs to (``model.layers.3.self_attn.attn`` -> 3)."""
    m = _LAYER_INDEX.search(layer_name)
    if m is None:
        raise InvalidArgument(f"cannot tell the layer index of vLLM attention layer {layer_name!r}")
    return int(m.group(1))


def slot_mapping(block_ids: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of prompt positions ``start..end-1`` for a request holding ``block_ids`` in order."""
    if end > len(block_ids) * block_size:
        raise InvalidArgument(f"positions up to {end} need {-(-end // block_size)} blocks of {block_size}; "
                              f"the request holds {len(block_ids)}")
    pos = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.tensor(block_ids, dtype=torch.int64)
    return blocks[pos // block_size] * block_size + pos % block_size


def attention_isa(kv_cache: torch.Tensor, layer: object | None = None) -> str:
    """The kernel ISA the CPU backend chose for this cache (its layer carries it; else the backend's rule)."""
    isa = getattr(layer, "isa", None)
    if isinstance(isa, str):
        return isa
    _, _, block_size, two_head_dim = kv_cache.shape
    return str(_get_attn_isa(kv_cache.dtype, block_size, two_head_dim // 2))


def write_kv(kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
             isa: str) -> None:
    """Store ``keys``/``values`` (``[T, num_kv_heads, head_dim]``) at ``slots`` of one layer's cache."""
    if kv_cache.dim() != 4:
        raise InvalidArgument(f"expected a CPU-backend KV cache [blocks, kv_heads, block_size, 2*head_dim], "
                              f"got shape {tuple(kv_cache.shape)}")
    num_blocks, kv_heads, block_size, two_head_dim = kv_cache.shape
    want = (int(slots.numel()), kv_heads, two_head_dim // 2)
    if tuple(keys.shape) != want or tuple(values.shape) != want:
        raise InvalidArgument(f"K/V shapes {tuple(keys.shape)} / {tuple(values.shape)} do not fit this cache "
                              f"(want {want}: {kv_heads} KV heads of {two_head_dim // 2})")
    if slots.numel() and int(slots.max()) >= num_blocks * block_size:
        raise InvalidArgument(f"slot {int(slots.max())} is outside the cache ({num_blocks} blocks of {block_size})")
    halves = kv_cache.view(num_blocks, kv_heads, 2 * block_size, two_head_dim // 2)
    key_cache, value_cache = halves.chunk(2, dim=2)
    vllm_ops.cpu_attn_reshape_and_cache(
        keys.to(kv_cache.dtype).contiguous(), values.to(kv_cache.dtype).contiguous(), key_cache, value_cache,
        slots.to(torch.int64), isa)
