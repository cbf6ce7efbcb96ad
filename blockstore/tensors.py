"""Tensor records: KV tensors stored with their dtype and shape, read back into caller memory.

numpy arrays and CPU torch tensors are accepted; torch is imported only when a torch tensor is
involved, so the engine runs without it. The payload is the tensor's raw bytes (C order); the record
meta is `{"lib": "numpy"|"torch", "dtype": ..., "shape": [...]}` (docs/format.md §2.2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blockstore.errors import CorruptionError, InvalidArgument

if TYPE_CHECKING:
    from blockstore.protocols import StoreCore


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def tensor_bytes(t: Any) -> tuple[memoryview, bytes]:
    """(raw byte view without a copy where possible, meta) of a numpy array or CPU torch tensor."""
    if _is_torch(t):
        import torch

        if t.device.type != "cpu":
            raise InvalidArgument("only CPU tensors can be stored; copy GPU tensors to pinned host memory first")
        c = t.detach().contiguous()
        raw = c.reshape(-1).view(torch.uint8).numpy()
        meta = {"lib": "torch", "dtype": str(c.dtype).removeprefix("torch."), "shape": list(c.shape)}
        return raw.data, json.dumps(meta, separators=(",", ":")).encode()
    try:
        import numpy as np
    except ImportError as exc:  # pragma: no cover - numpy is in every extra that uses tensors
        raise InvalidArgument("storing tensors needs numpy or torch") from exc
    if not isinstance(t, np.ndarray):
        raise InvalidArgument(f"expected a numpy array or torch tensor, got {type(t).__name__}")
    a = np.ascontiguousarray(t)
    meta = {"lib": "numpy", "dtype": a.dtype.str, "shape": list(t.shape)}  # ascontiguousarray makes 0-d 1-d
    return a.reshape(-1).view(np.uint8).data, json.dumps(meta, separators=(",", ":")).encode()


def _parse_meta(meta: bytes) -> dict[str, Any]:
    try:
        m = json.loads(meta)
        if m["lib"] not in ("numpy", "torch") or not isinstance(m["shape"], list):
            raise ValueError("bad lib or shape")
        return m  # type: ignore[no-any-return]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptionError(f"tensor record metadata unreadable: {exc}") from exc


def _empty_like_meta(m: dict[str, Any]) -> Any:
    if m["lib"] == "torch":
        import torch

        return torch.empty(m["shape"], dtype=getattr(torch, m["dtype"]))
    import numpy as np

    return np.empty(m["shape"], dtype=np.dtype(m["dtype"]))


def _writable_bytes(t: Any) -> memoryview:
    if _is_torch(t):
        import torch

        if t.device.type != "cpu" or not t.is_contiguous():
            raise InvalidArgument("out tensor must be a contiguous CPU tensor")
        return t.view(-1).view(torch.uint8).numpy().data
    import numpy as np

    if not isinstance(t, np.ndarray) or not t.flags.c_contiguous or not t.flags.writeable:
        raise InvalidArgument("out must be a writable C-contiguous numpy array or torch tensor")
    return t.reshape(-1).view(np.uint8).data


def _describe(t: Any) -> tuple[str, list[int]]:
    """(dtype name both libraries agree on, shape): a numpy float16 array may receive a record
    written from a torch float16 tensor and vice versa."""
    if _is_torch(t):
        return str(t.dtype).removeprefix("torch."), list(t.shape)
    return t.dtype.name, list(t.shape)


def _canonical_dtype(m: dict[str, Any]) -> str:
    if m["lib"] == "torch":
        return str(m["dtype"])
    import numpy as np

    return np.dtype(m["dtype"]).name


class TensorAPI:
    """Mixed into Store."""

    def put_tensor(self: StoreCore, key: bytes, tensor: Any, *, ns: str = "default",
                   partition: bytes | str | None = None) -> None:
        self.put_tensors([(key, tensor)], ns=ns, partition=partition)

    def put_tensors(self: StoreCore, items: Sequence[tuple[bytes, Any]], *, ns: str = "default",
                    partition: bytes | str | None = None) -> None:
        """Store tensors next to each other (one partition, one batch)."""
        pairs, metas = [], []
        for key, t in items:
            raw, meta = tensor_bytes(t)
            pairs.append((key, raw))
            metas.append(meta)
        self.put_many(pairs, ns=ns, metas=metas, partition=partition)

    def get_tensor(self: StoreCore, key: bytes, *, ns: str = "default", out: Any = None) -> Any:
        return self.get_tensors([key], ns=ns, out=None if out is None else [out])[0]

    def get_tensors(self: StoreCore, keys: Sequence[bytes], *, ns: str = "default",
                    out: Sequence[Any] | None = None) -> list[Any]:
        """Read tensors (one request). With `out`, reads straight into the given tensors, which must
        match the stored dtype and shape; otherwise allocates them. None for a miss."""
        locs = self.locate_many(keys, ns=ns)
        targets: list[Any] = []
        for i, loc in enumerate(locs):
            if loc is None:
                targets.append(None)
                continue
            m = _parse_meta(loc.meta)
            if out is not None:
                got = _describe(out[i])
                if got != (_canonical_dtype(m), m["shape"]):
                    raise InvalidArgument(
                        f"out[{i}] is {got[0]}{got[1]}; key {keys[i]!r} holds {m['dtype']}{m['shape']}"
                    )
                targets.append(out[i])
            else:
                targets.append(_empty_like_meta(m))
        bufs = [_writable_bytes(t) if t is not None else bytearray(0) for t in targets]
        lens = self.get_many(keys, ns=ns, out=bufs)
        return [t if n is not None else None for t, n in zip(targets, lens)]
