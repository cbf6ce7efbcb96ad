"""Tensor records: KV tensors stored with their dtype and shape, read back into caller memory.

numpy arrays and CPU torch tensors are accepted; torch is imported only when a torch tensor is
involved, so the engine runs without it. The payload is the tensor's raw bytes (C order); the record
meta is `{"lib": "numpy"|"torch", "dtype": ..., "shape": [...]}` (docs/format.md §2.2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from blockstore.errors import BlockstoreError, InvalidArgument
from blockstore.reader import READ_BLOCKS_AT_ONCE
from blockstore.validate import check_keys, check_pairs, check_seq

if TYPE_CHECKING:
    from blockstore.directory import Location
    from blockstore.records import Buffer


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def tensor_bytes(t: Any) -> tuple[memoryview, bytes]:
    """(raw byte view without a copy where possible, meta) of a numpy array or CPU torch tensor."""
    if _is_torch(t):
        import torch

        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(f"expected a numpy array or torch tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise InvalidArgument("only CPU tensors can be stored; copy GPU tensors to pinned host memory first")
        if t.layout != torch.strided or t.is_nested or t.is_quantized:
            # their bytes are not the values (indices, offsets; a scale and zero point the record does not keep)
            what = "a quantized" if t.is_quantized else "a nested" if t.is_nested else f"a {t.layout}"
            raise InvalidArgument(f"{what} tensor cannot be stored: only dense (strided) tensors; convert it first "
                                  "(to_dense(), dequantize())")
        c = t.detach().resolve_conj().resolve_neg().contiguous()  # a lazy conj/neg view: store its values
        raw = c.reshape(-1).view(torch.uint8).numpy()
        meta = {"lib": "torch", "dtype": str(c.dtype).removeprefix("torch."), "shape": list(c.shape)}
        return raw.data, json.dumps(meta, separators=(",", ":")).encode()
    try:
        import numpy as np
    except ImportError as exc:  # pragma: no cover - numpy is in every extra that uses tensors
        raise InvalidArgument("storing tensors needs numpy or torch") from exc
    if not isinstance(t, np.ndarray):
        raise InvalidArgument(f"expected a numpy array or torch tensor, got {type(t).__name__}")
    if t.dtype.hasobject:
        raise InvalidArgument(f"a tensor of dtype {t.dtype} holds Python objects, not raw bytes: it cannot be stored")
    if t.dtype.fields is not None:  # the meta's dtype string ('|V12') would drop the fields: read back as bytes
        raise InvalidArgument(f"a tensor of structured dtype {t.dtype} cannot be stored (the record keeps no field "
                              "names or types): store each field as its own tensor")
    a = np.ascontiguousarray(t)
    meta = {"lib": "numpy", "dtype": a.dtype.str, "shape": list(t.shape)}  # ascontiguousarray makes 0-d 1-d
    return a.reshape(-1).view(np.uint8).data, json.dumps(meta, separators=(",", ":")).encode()


def _itemsize(m: dict[str, Any]) -> int:
    """Bytes per element of the meta's dtype (raises if it names none this library can allocate)."""
    if m["lib"] == "torch":
        import torch

        dt = getattr(torch, m["dtype"], None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"no torch dtype {m['dtype']!r}")
        return int(torch.empty(0, dtype=dt).element_size())
    import numpy as np

    dt = np.dtype(m["dtype"])
    if dt.hasobject:
        raise ValueError("object dtype")
    return int(dt.itemsize)


def _parse_meta(key: bytes, meta: bytes, payload_len: int) -> dict[str, Any]:
    """The tensor meta of a record. A record whose meta is not put_tensor's {lib, dtype, shape} for
    exactly its payload's size was written by a plain put (or holds someone else's meta): nothing is
    corrupt (the directory entry and payload are checksummed), it just is not a tensor record."""
    m: Any
    try:
        m = json.loads(meta)
    except (ValueError, RecursionError):  # ValueError: not JSON, or not UTF-8
        m = None
    ok = (isinstance(m, dict) and m.get("lib") in ("numpy", "torch") and isinstance(m.get("dtype"), str)
          and isinstance(m.get("shape"), list) and all(type(d) is int and d >= 0 for d in m["shape"]))
    if ok:
        try:
            ok = math.prod(m["shape"]) * _itemsize(m) == payload_len
        except ImportError as exc:
            raise InvalidArgument(f"key {key!r} holds a {m['lib']} tensor: reading it needs {m['lib']}") from exc
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise InvalidArgument(f"key {key!r} does not hold a tensor record (its meta is not put_tensor's "
                              f"lib, dtype and shape for its {payload_len}-byte payload): read it with get()")
    return m  # type: ignore[no-any-return]


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
        if t.is_conj() or t.is_neg():  # its bytes read back conjugated/negated
            raise InvalidArgument("out tensor must not be a lazy conjugate or negative view (resolve_conj(), "
                                  "resolve_neg() give one that can be written)")
        return t.view(-1).view(torch.uint8).numpy().data
    import numpy as np

    if not isinstance(t, np.ndarray) or not t.flags.c_contiguous or not t.flags.writeable:
        raise InvalidArgument("out must be a writable C-contiguous numpy array or torch tensor")
    return t.reshape(-1).view(np.uint8).data


def _describe(t: Any, name: str) -> tuple[str, list[int]]:
    """(dtype name both libraries agree on, shape): a numpy float16 array may receive a record
    written from a torch float16 tensor and vice versa."""
    if _is_torch(t):
        import torch

        if isinstance(t, torch.Tensor):
            return str(t.dtype).removeprefix("torch."), list(t.shape)
    else:
        import numpy as np

        if isinstance(t, np.ndarray):
            return _numpy_dtype_name(t.dtype), list(t.shape)
    raise InvalidArgument(f"{name} must be a numpy array or torch tensor, not {type(t).__name__}")


def _canonical_dtype(m: dict[str, Any]) -> str:
    if m["lib"] == "torch":
        return str(m["dtype"])
    import numpy as np

    return _numpy_dtype_name(np.dtype(m["dtype"]))


def _numpy_dtype_name(dt: Any) -> str:
    """The dtype's name, with its byte order when that is not this machine's: the bytes are copied as they
    are, so a '>f4' record read into a float32 (native order) array or tensor returned every value
    byte-swapped (a float32 1.0 as 4.6e-41)."""
    if dt.isnative:
        return str(dt.name)
    return f"{dt.name} ({'big' if dt.byteorder == '>' else 'little'}-endian)"


class KVStore(Protocol):
    """The public KV calls tensor records are built on (a Store is one)."""

    def put_many(self, items: Sequence[tuple[bytes, Buffer]], *, ns: str = ..., metas: Sequence[bytes] | None = ...,
                 partition: bytes | str | None = ...) -> None: ...
    def get_many(self, keys: Sequence[bytes], *, ns: str = ..., out: Sequence[Buffer] | None = ...) -> list[Any]: ...
    def locate_many(self, keys: Sequence[bytes], *, ns: str = ...) -> list[Location | None]: ...
    def read_located(self, keys: Sequence[bytes], locs: Sequence[Location | None], *, ns: str = ...,
                     out: Sequence[Buffer] | None = ...) -> list[Any]: ...
    def has_block(self, block_id: int) -> bool: ...
    def hold_blocks(self, block_ids: Sequence[int]) -> Any: ...
    def block_read_fd(self, block_id: int) -> int | None: ...
    def request(self) -> AbstractContextManager[None]: ...


# a read whose lookup named a block compaction deleted before the read began is tried again, this often
_READ_ATTEMPTS = 8


class TensorRecords:
    """The tensor API of a Store (Store.put_tensor and the rest delegate here)."""

    def __init__(self, store: KVStore) -> None:
        self._store = store

    def put_tensors(self, items: Sequence[tuple[bytes, Any]], *, ns: str = "default",
                    partition: bytes | str | None = None) -> None:
        """Store tensors next to each other (one partition, one batch)."""
        pairs, metas = [], []
        for key, t in check_pairs("items", items, "(key, tensor)"):
            raw, meta = tensor_bytes(t)
            pairs.append((key, raw))
            metas.append(meta)
        self._store.put_many(pairs, ns=ns, metas=metas, partition=partition)

    def get_tensors(self, keys: Sequence[bytes], *, ns: str = "default",
                    out: Sequence[Any] | None = None) -> list[Any]:
        """Read tensors (one request). With `out`, reads straight into the given tensors, which must
        match the stored dtype and shape; otherwise allocates them. None for a miss."""
        keys = check_keys(keys)
        if out is not None:
            out = check_seq("out", out, "arrays or tensors (one per key)")
            if len(out) != len(keys):
                raise InvalidArgument(f"out has {len(out)} tensors for {len(keys)} keys")
            for i, t in enumerate(out):
                _describe(t, f"out[{i}]")
        for _ in range(_READ_ATTEMPTS):
            got = self._read_once(keys, ns, out)
            if got is not None:
                return got
        raise BlockstoreError(f"tensors of keys {keys!r:.300}: a block their lookup named was deleted before each of "
                              f"{_READ_ATTEMPTS} reads")

    def _read_once(self, keys: list[bytes], ns: str, out: Sequence[Any] | None) -> list[Any] | None:
        """The tensors, shaped by the metas the lookup found and read from the records it found (get_many's
        own lookup read a replacement into the old dtype and shape); None if a block went meanwhile."""
        locs = self._store.locate_many(keys, ns=ns)
        targets: list[Any] = []
        for i, loc in enumerate(locs):
            if loc is None:
                targets.append(None)
                continue
            m = _parse_meta(keys[i], loc.meta, loc.payload_len)
            if out is not None:
                got = _describe(out[i], f"out[{i}]")
                want = (_canonical_dtype(m), m["shape"])
                if got != want:
                    raise InvalidArgument(f"out[{i}] is {got[0]}{got[1]}; key {keys[i]!r} holds {want[0]}{want[1]}")
                targets.append(out[i])
            else:
                targets.append(_empty_like_meta(m))
        bufs = [_writable_bytes(t) if t is not None else bytearray(0) for t in targets]
        lens: list[Any] = [None] * len(keys)
        with self._store.request():  # one request to the read observers, however many batches
            for batch in _batches(locs):
                blocks = sorted({p.block_id for i in batch for p in locs[i].places()})  # type: ignore[union-attr]
                with self._store.hold_blocks(blocks):  # from here on their files outlive a deletion
                    # a block the table no longer names and without its file was deleted since the lookup:
                    # read_located would look its record up again and may read a replacement (a block whose
                    # file the remote tier dropped is still named; a new one's file is there before the table
                    # names it)
                    if any(not self._store.has_block(b) and self._store.block_read_fd(b) is None for b in blocks):
                        return None
                    read = self._store.read_located([keys[i] for i in batch], [locs[i] for i in batch], ns=ns,
                                                    out=[bufs[i] for i in batch])  # the records the lookup found
                for i, n in zip(batch, read):
                    lens[i] = n
        return [t if n is not None else None for t, n in zip(targets, lens)]


def _batches(locs: Sequence[Location | None]) -> list[list[int]]:
    """Indexes of the located keys in runs whose places lie in at most READ_BLOCKS_AT_ONCE blocks: each run's
    blocks are held while it is read, and a held block's descriptor stays open (the reader reads a group of
    blocks at a time for the same reason: a descriptor per block of a large read ran out of them, EMFILE)."""
    runs: list[list[int]] = []
    run: list[int] = []
    blocks: set[int] = set()
    for i, loc in enumerate(locs):
        if loc is None:
            continue
        mine = {p.block_id for p in loc.places()}
        if run and len(blocks | mine) > READ_BLOCKS_AT_ONCE:
            runs.append(run)
            run, blocks = [], set()
        run.append(i)
        blocks |= mine
    return [*runs, run] if run else runs
