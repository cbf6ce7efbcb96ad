"""The record meta the in-process plugin writes beside each payload, and the check a record must pass to load.

The meta names the object's layout (memory format, shapes, dtypes, byte length), the engine's KV geometry and,
when LMCache set them, the token positions the KV was computed at (CacheBlend's RoPE recovery reads them).
A module of its own because it is the plugin's record format: the writes encode it, the reads and the presence
checks parse it, and the rule "a record of another geometry, dtype or length is a miss" lives in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lmcache.v1.memory_management import MemoryFormat, MemoryObj

from blockstore.directory import Location

META_VERSION = 1
KV_FORMATS = frozenset({MemoryFormat.KV_2LTD, MemoryFormat.KV_T2D, MemoryFormat.KV_2TD, MemoryFormat.KV_MLA_FMT})
_MAX_META = 60000  # the store's meta limit is 64 KiB


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _parse_dtype(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@dataclass(frozen=True)
class Layout:
    """What a record's meta says about its payload."""

    fmt: MemoryFormat
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    size: int
    positions: torch.Tensor | None = field(default=None, compare=False)


def _encode_positions(pos: Any) -> dict[str, Any]:
    if not isinstance(pos, torch.Tensor) or pos.dim() != 1:
        return {}
    n = int(pos.numel())
    if n == 0:
        return {"pos": [0, 0]}
    p = pos.detach().to("cpu", torch.int64)
    start = int(p[0])
    if torch.equal(p, torch.arange(start, start + n, dtype=torch.int64)):
        return {"pos": [start, start + n]}  # what LMCache's layer-wise connectors record: one range
    return {"pos_list": [int(x) for x in p.tolist()]}


def _decode_positions(doc: dict[str, Any]) -> torch.Tensor | None:
    if "pos" in doc:
        a, b = doc["pos"]
        if not (isinstance(a, int) and isinstance(b, int) and a <= b):
            raise ValueError("bad positions")
        return torch.arange(a, b, dtype=torch.int64)
    if "pos_list" in doc:
        if not all(isinstance(x, int) for x in doc["pos_list"]):
            raise ValueError("bad positions")
        return torch.tensor(doc["pos_list"], dtype=torch.int64)
    return None


class LayoutCodec:
    """Record meta for one engine: `meta` writes it, `parse` admits only records of this engine's KV geometry.

    The geometry is, per group, the full-chunk shape without its token dimension (2 for KV_2LTD and MLA), and
    the dtypes; a record written under another geometry is never loaded."""

    def __init__(self, meta_shapes: Sequence[Sequence[int]], meta_dtypes: Sequence[torch.dtype]) -> None:
        self.geometry = [[int(d) for i, d in enumerate(s) if i != 2] for s in meta_shapes]
        self.geometry_dtypes = [_dtype_name(d) for d in meta_dtypes]

    def meta(self, obj: MemoryObj) -> bytes:
        """The record meta of `obj` (canonical JSON). ValueError for objects this connector cannot keep."""
        fmt = obj.get_memory_format()
        if fmt not in KV_FORMATS:
            raise ValueError(f"memory format {fmt} is not a KV layout (only the 'naive' remote_serde is supported)")
        shapes = [[int(d) for d in s] for s in obj.get_shapes()]
        dtypes = list(obj.get_dtypes())
        size = int(obj.get_size())
        expect = sum(torch.Size(s).numel() * dt.itemsize for s, dt in zip(shapes, dtypes))
        if expect != size:
            raise ValueError(f"object of {size} bytes does not match its layout {shapes} {dtypes} ({expect} bytes)")
        doc: dict[str, Any] = {"v": META_VERSION, "fmt": fmt.name, "shapes": shapes,
                               "dtypes": [_dtype_name(d) for d in dtypes], "size": size,
                               "kv": self.geometry, "kv_dtypes": self.geometry_dtypes}
        doc.update(_encode_positions(getattr(obj.metadata, "cached_positions", None)))
        raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(raw) > _MAX_META:
            raise ValueError(f"record meta of {len(raw)} bytes is too large (token positions of a huge segment?)")
        return raw

    def parse(self, loc: Location) -> Layout | None:
        """The layout a record's meta names, if this engine may load it (else None: a miss)."""
        try:
            doc = json.loads(loc.meta)
            if not isinstance(doc, dict) or doc.get("v") != META_VERSION:
                return None
            if doc.get("kv") != self.geometry or doc.get("kv_dtypes") != self.geometry_dtypes:
                return None
            fmt = MemoryFormat[doc["fmt"]]
            if fmt not in KV_FORMATS:
                return None
            shapes = [torch.Size([int(d) for d in s]) for s in doc["shapes"]]
            dtypes = [_parse_dtype(d) for d in doc["dtypes"]]
            size = doc["size"]
            if not shapes or len(shapes) != len(dtypes) or any(d < 0 for s in shapes for d in s):
                return None
            if any(_dtype_name(d) not in self.geometry_dtypes for d in dtypes):
                return None
            if size != sum(s.numel() * d.itemsize for s, d in zip(shapes, dtypes)) or size != loc.payload_len:
                return None
            return Layout(fmt, shapes, dtypes, size, _decode_positions(doc))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
