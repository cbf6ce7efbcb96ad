"""The payload of a chunk KV layer record: the one module that knows how K and V are laid out in it.

A layer record's payload (chunk_kv.py names the records) holds one layer of one chunk, K after RoPE at the
positions the chunk was computed at. Two formats (`KVLayout.kv_format`, named by the M record's meta):

"model" (the default; every FORMAT_VERSION 1 record before 2026-12-07, whose meta names no format):

    K  [tokens, kv_heads, head_dim]  the model's dtype (KVLayout.dtype)
    V  [tokens, kv_heads, head_dim]  same

"int8" (symmetric absmax per (token, kv head), as KIVI and QServe keep KV: an error of at most half a step,
1/254 of that row's largest |value|, and half the bytes a blend reads):

    K       int8    [tokens, kv_heads, head_dim]   round(K / scale_K), in [-127, 127]
    V       int8    [tokens, kv_heads, head_dim]   round(V / scale_V)
    scales  float32 [2, tokens, kv_heads]          scale_K then scale_V: the row's max |value| / 127
                                                   (at least float32's smallest normal; little-endian;
                                                   NaN, with q 0, for a row holding a NaN or an infinity)

An element reads back as q * scale, in float32, then in the model's dtype. float32 scales rather than
float16: a float16 scale overflows past |value| 8.3e6 and loses precision below 6e-5 (subnormals), and
costs only 8 bytes a (token, kv head) against 4. For the 8B shape (8 kv heads x 128) a token's layer record
is 2,112 bytes in int8 (2 x 1,024 + 64 of scales) against 4,096 in bfloat16: 66 KiB a token over 32 layers
against 128 KiB.

`encode` makes a payload (on the KV's device, then one copy to the host), `layer_bytes` says its size, and
`decode` / `decode_strided` give K and V back in the model's dtype on the device the bytes are on (after
the host-to-device copy: the bytes moved are the stored ones), with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_FORMATS = ("model", "int8")  # what a record's payload holds: the model's dtype, or 8 bits and scales
DEFAULT_KV_FORMAT = "model"
_SCALE = torch.float32
_LEVELS = 127  # symmetric: -127..127, so that -x reads back as the negation of x
_TINY = torch.finfo(torch.float32).tiny  # a row of zeros gets this scale, not 0 (no division by it)


def model_id_suffix(kv_format: str) -> str:
    """What a chunk KV store's model_id carries for records of this format (Blender.kv_model_id): nothing for
    the model's dtype (records as before), "|kv=int8" for 8 bits, so the formats' records have different keys."""
    return "" if kv_format == DEFAULT_KV_FORMAT else f"|kv={kv_format}"



@dataclass(frozen=True)
class KVLayout:
    """The shape of one model's KV and the format its records hold: what a chunk record must match to be
    used with it."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # a key of DTYPES: the dtype K and V are computed (and decoded) in
    kv_format: str = DEFAULT_KV_FORMAT  # one of KV_FORMATS

    def layer_bytes(self, tokens: int) -> int:
        """The size of one layer record's payload for a chunk of `tokens` tokens."""
        rows = tokens * self.kv_heads
        if self.kv_format == "int8":
            return 2 * rows * self.head_dim + 2 * rows * _SCALE.itemsize
        return 2 * rows * self.head_dim * DTYPES[self.dtype].itemsize

    def meta(self) -> dict[str, Any]:
        """The M record's meta fields naming this layout (no format field for "model": records as before)."""
        fields: dict[str, Any] = {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                                  "dtype": self.dtype}
        return fields if self.kv_format == DEFAULT_KV_FORMAT else {**fields, "kv_format": self.kv_format}

    @classmethod
    def from_meta(cls, m: dict[str, Any]) -> KVLayout:
        """The layout an M record's meta names (KeyError, ValueError or TypeError if it names none)."""
        return cls(int(m["layers"]), int(m["kv_heads"]), int(m["head_dim"]), str(m["dtype"]),
                   str(m.get("kv_format", DEFAULT_KV_FORMAT)))

    def valid(self) -> bool:
        return (self.dtype in DTYPES and self.kv_format in KV_FORMATS
                and min(self.layers, self.kv_heads, self.head_dim) > 0)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] (any float dtype) as int8 [..., head_dim] and float32 scales [...]: each row's max
    |value| / 127 (at least _TINY), every element within half a scale of q * scale. A row holding a NaN or an
    infinity gets a NaN scale and q 0 (the same bytes on every device: a NaN's cast to int8 is undefined), so
    all of it reads back NaN: 8 bits cannot hold the value, and a finite one in its place would look valid."""
    xf = x.to(_SCALE)
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax.isfinite(), amax / _LEVELS, torch.nan).clamp_min(_TINY)  # clamp_min keeps a NaN
    q = torch.round(xf / scale.unsqueeze(-1)).nan_to_num_(0.0).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale (q int8 [..., head_dim], scale [...]) in `dtype`: one kernel, computed in float32."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(q, scale.unsqueeze(-1), out=out)


def encode(k: torch.Tensor, v: torch.Tensor, layout: KVLayout) -> np.ndarray:
    """One layer's payload (uint8, on the CPU) from its K and V ([tokens, kv_heads, head_dim], any device)."""
    kv = torch.stack((k.detach(), v.detach()))
    if layout.kv_format == "int8":
        q, scale = quantize(kv)
        kv = torch.cat((q.reshape(-1).view(torch.uint8), scale.reshape(-1).view(torch.uint8)))
    return kv.to("cpu").contiguous().view(-1).view(torch.uint8).numpy()


def _floats(raw: torch.Tensor) -> torch.Tensor:
    """`raw` (uint8) as float32; copied first where it does not start at a multiple of 4 bytes."""
    return (raw if raw.storage_offset() % _SCALE.itemsize == 0 else raw.clone()).view(_SCALE)


def decode(raw: torch.Tensor, tokens: int, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer payload (`raw`: its layer_bytes(tokens) uint8, on any device) in the model's
    dtype: views of it ("model"), or decoded into one new buffer ("int8")."""
    shape = (2, tokens, layout.kv_heads, layout.head_dim)
    if layout.kv_format == "int8":
        n = 2 * tokens * layout.kv_heads * layout.head_dim
        scale = _floats(raw[n:]).view(2, tokens, layout.kv_heads)
        kv = dequantize(raw[:n].view(torch.int8).view(shape), scale, DTYPES[layout.dtype])
    else:
        kv = raw.view(DTYPES[layout.dtype]).view(shape)
    return kv[0], kv[1]


def decode_strided(flat: torch.Tensor, chunks: int, stride: int, tokens: int,
                   layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `chunks` payloads of `tokens` tokens each lying in `flat` (uint8, a multiple of 4 bytes from
    a multiple of 4) from its start, one every `stride` bytes (a multiple of 4), as two [chunks, tokens,
    kv_heads, head_dim] tensors in the model's dtype: views of `flat` ("model"), or decoded in one op ("int8")."""
    heads, dim = layout.kv_heads, layout.head_dim
    if layout.kv_format == "int8":
        n = tokens * heads * dim
        i8 = flat.view(torch.int8)
        q = i8.as_strided((chunks, 2, tokens, heads, dim), (stride, n, heads * dim, dim, 1), i8.storage_offset())
        if (2 * n) % _SCALE.itemsize == 0:
            f32 = flat.view(_SCALE)
            scale = f32.as_strided((chunks, 2, tokens, heads), (stride // 4, tokens * heads, heads, 1),
                                   f32.storage_offset() + 2 * n // 4)
        else:  # an odd head_dim x kv_heads x tokens: the scales start 2 bytes past a multiple of 4, copied first
            rows = 2 * tokens * heads * _SCALE.itemsize
            scale = flat.as_strided((chunks, rows), (stride, 1), flat.storage_offset() + 2 * n).clone()
            scale = scale.view(_SCALE).view(chunks, 2, tokens, heads)
        kv = dequantize(q, scale, DTYPES[layout.dtype])
        return kv[:, 0], kv[:, 1]
    typed = flat.view(DTYPES[layout.dtype])
    item = typed.element_size()
    row = heads * dim
    shape = (chunks, tokens, heads, dim)
    strides = (stride // item, row, dim, 1)
    base = typed.storage_offset()
    return typed.as_strided(shape, strides, base), typed.as_strided(shape, strides, base + tokens * row)
