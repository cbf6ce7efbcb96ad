"""Argument checks shared by the Store and its record-kind helpers (chunks.py, tensors.py): a wrong
type, size or sequence length raises InvalidArgument naming the argument, before anything is queued."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

from blockstore.directory import Location
from blockstore.errors import InvalidArgument
from blockstore.records import MAX_KEY, MAX_META, MAX_NAMESPACE, MAX_PAYLOAD, Buffer


def check_key(key: bytes, name: str = "key") -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{name} must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if not 1 <= len(key) <= MAX_KEY:
        raise InvalidArgument(f"{name} length {len(key)} outside 1..{MAX_KEY} bytes")
    return key


# Iterating one of these yields characters, ints or mapping keys, never the items a sequence argument means.
_NOT_A_SEQUENCE = (str, bytes, bytearray, memoryview, Mapping)


def check_seq(name: str, value: Any, of: str) -> list[Any]:
    """A sequence argument (a list, a tuple, any iterable) as a list; a str, a buffer or a mapping is
    refused: `get_many(b"abc")` would otherwise look up the keys 97, 98 and 99."""
    if isinstance(value, _NOT_A_SEQUENCE) or not isinstance(value, Iterable):
        raise InvalidArgument(f"{name} must be a sequence of {of}, not {type(value).__name__}")
    return list(value)


def check_keys(keys: Any, name: str = "keys") -> list[bytes]:
    return [check_key(k, f"{name}[{i}]") for i, k in enumerate(check_seq(name, keys, "bytes keys"))]


def check_pairs(name: str, items: Any, of: str) -> list[tuple[Any, Any]]:
    """A sequence of 2-item tuples (or lists), e.g. put_many's (key, value) pairs."""
    pairs = check_seq(name, items, f"{of} pairs")
    for i, item in enumerate(pairs):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = f"a {len(item)}-item {type(item).__name__}" if isinstance(item, (tuple, list)) \
                else type(item).__name__
            raise InvalidArgument(f"{name}[{i}] must be a {of} pair, not {what}")
    return [(a, b) for a, b in pairs]


def check_out(out: Any, n: int) -> list[Any] | None:
    """get_many's `out`: None, or one writable C-contiguous buffer per key."""
    if out is None:
        return None
    bufs = check_seq("out", out, "writable buffers (one per key)")
    if len(bufs) != n:
        raise InvalidArgument(f"out has {len(bufs)} buffers for {n} keys")
    for i, b in enumerate(bufs):
        try:
            view = memoryview(b)
        except TypeError:
            raise InvalidArgument(f"out[{i}] must be a writable buffer, not {type(b).__name__}") from None
        except ValueError as exc:  # a closed mmap, a released memoryview
            raise InvalidArgument(f"out[{i}] is a {type(b).__name__} that cannot be used: {exc}") from None
        if view.readonly or not view.c_contiguous:
            raise InvalidArgument(f"out[{i}] must be a writable C-contiguous buffer")
    return bufs


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be a bool (True or False), not {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value: Any) -> int:
    """An int argument (numpy integers too); a bool is refused: True is not a count, a size or a time."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}") from None


_MAX_BLOCK_ID = (1 << 64) - 1  # block ids are u64 (docs/format.md §2.1)


def check_block_id(value: Any, name: str = "block_id") -> int:
    """A block id: an int (not a bool: True would name block 1) of 0..2**64-1."""
    bid = check_int(name, value)
    if not 0 <= bid <= _MAX_BLOCK_ID:
        raise InvalidArgument(f"{name} must be a block id in 0..2**64-1, got {bid}")
    return bid


def check_blocks(value: Any, name: str = "block_ids") -> list[int]:
    """A sequence of block ids (each as check_block_id)."""
    return [check_block_id(b, f"{name}[{i}]") for i, b in enumerate(check_seq(name, value, "block ids"))]


def check_locations(locs: Any, n: int | None = None) -> list[Any]:
    """A sequence of directory Locations (with `n`: one per key, None for a key not found)."""
    from_lookup = n is not None
    out = check_seq("locs", locs, "Locations or None (one per key)" if from_lookup else "Locations")
    if from_lookup and len(out) != n:
        raise InvalidArgument(f"locs has {len(out)} entries for {n} keys")
    for i, loc in enumerate(out):
        if not isinstance(loc, Location) and not (from_lookup and loc is None):
            kind = "a Location or None" if from_lookup else "a Location"
            raise InvalidArgument(f"locs[{i}] must be {kind}, not {type(loc).__name__}")
    return out


def payload_view(value: Buffer) -> memoryview:
    try:
        view = memoryview(value)
    except TypeError:
        raise InvalidArgument(f"value must support the buffer protocol, not {type(value).__name__}") from None
    except ValueError as exc:  # a closed mmap, a released memoryview
        raise InvalidArgument(f"value is a {type(value).__name__} that cannot be read: {exc}") from None
    if not view.c_contiguous:
        raise InvalidArgument("value must be C-contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if len(view) > MAX_PAYLOAD:
        raise InvalidArgument(f"value of {len(view)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return view


def check_meta(meta: bytes, name: str = "meta") -> bytes:
    if not isinstance(meta, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{name} must be bytes, not {type(meta).__name__}")
    meta = bytes(meta)
    if len(meta) > MAX_META:
        raise InvalidArgument(f"{name}: metadata of {len(meta)} bytes exceeds the {MAX_META}-byte limit")
    return meta


def check_ns(ns: str) -> str:
    try:
        ok = isinstance(ns, str) and 1 <= len(ns.encode()) <= MAX_NAMESPACE
    except UnicodeEncodeError:  # lone surrogates: not UTF-8
        ok = False
    if not ok:
        raise InvalidArgument(f"ns (the namespace) must be a str of 1..{MAX_NAMESPACE} UTF-8 bytes, got {ns!r}")
    return ns
