"""The payload of a chunk KV layer record: the one module that knows how K and V are laid out in it.

A layer record's payload (chunk_kv.py names the records) holds K then V of one layer of one chunk:

    K  [tokens, kv_heads, head_dim]  in the model's dtype (KVLayout.dtype)
    V  [tokens, kv_heads, head_dim]  same

K is after RoPE at the positions the chunk was computed at. `encode` makes a payload, `layer_bytes` says
its size, and `decode` / `decode_strided` give K and V back on the device the bytes are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KVLayout:
    """The shape of one model's KV: what a chunk record must match to be used with it."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # a key of DTYPES

    def layer_bytes(self, tokens: int) -> int:
        """The size of one layer record's payload for a chunk of `tokens` tokens."""
        return 2 * tokens * self.kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


def encode(k: torch.Tensor, v: torch.Tensor, layout: KVLayout) -> np.ndarray:
    """One layer's payload (uint8, on the CPU) from its K and V ([tokens, kv_heads, head_dim], any device)."""
    kv = torch.stack((k.detach(), v.detach())).to("cpu").contiguous()
    return kv.view(-1).view(torch.uint8).numpy()


def decode(raw: torch.Tensor, tokens: int, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer payload (`raw`: its layer_bytes(tokens) uint8, on any device) as views of it."""
    kv = raw.view(DTYPES[layout.dtype]).view(2, tokens, layout.kv_heads, layout.head_dim)
    return kv[0], kv[1]


def decode_strided(flat: torch.Tensor, chunks: int, stride: int, tokens: int,
                   layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `chunks` payloads of `tokens` tokens each lying in `flat` (uint8) from its start, one every
    `stride` bytes (a multiple of the dtype's size), as two [chunks, tokens, kv_heads, head_dim] views of it."""
    typed = flat.view(DTYPES[layout.dtype])
    item = typed.element_size()
    row = layout.kv_heads * layout.head_dim
    shape = (chunks, tokens, layout.kv_heads, layout.head_dim)
    strides = (stride // item, row, layout.head_dim, 1)
    base = typed.storage_offset()
    return typed.as_strided(shape, strides, base), typed.as_strided(shape, strides, base + tokens * row)
