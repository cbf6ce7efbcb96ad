"""Checks of the blender's options, in a module of their own so that each rule has one owner: `Blender(...)`
(blender.py) and the vLLM blend connector's ``blend.*`` settings (connector/blend_connector.py) both check
through these functions, so a value one refuses the other refuses too, in the same words. Each returns the
value as the type it promises and raises InvalidArgument naming the option and what is allowed; none
converts a value of another type (a str, or a bool for a number: bool is an int to Python), because
float("0.5x") or bool("no") either fail without the option's name or pass as something the caller did
not mean. The connector parses a str from its JSON config before it calls them."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from blockstore.errors import InvalidArgument


def _refuse(where: str, name: str, allowed: str, value: Any) -> InvalidArgument:
    return InvalidArgument(f"{where + ': ' if where else ''}{name} must be {allowed}, got {value!r}")


def real_in(name: str, value: Any, lo: float, hi: float, *, where: str = "") -> float:
    """`value` as a float: a real number (not a bool, not a str) with lo <= value <= hi (NaN is refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not lo <= float(value) <= hi:
        raise _refuse(where, name, f">= {lo:g} and <= {hi:g} (a number)", value)
    return float(value)


def count(name: str, value: Any, lo: int, hi: int | None = None, *, where: str = "", what: str = "") -> int:
    """`value` as an int: an integer (not a bool, not a float, not a str) with lo <= value (< hi if given).
    `what`: words on the upper bound for the message (say "the model's layers")."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or int(value) < lo \
            or (hi is not None and int(value) >= hi):
        bound = f" and < {hi}" + (f" ({what})" if what else "") if hi is not None else ""
        raise _refuse(where, name, f"an int >= {lo}{bound}", value)
    return int(value)


def flag(name: str, value: Any, *, where: str = "") -> bool:
    """`value` as a bool: True or False (numpy's bools too), never another value's truth."""
    if not isinstance(value, (bool, np.bool_)):
        raise _refuse(where, name, "true or false (a bool)", value)
    return bool(value)


def one_of(name: str, value: Any, allowed: Sequence[str], *, where: str = "") -> str:
    """`value`, one of the strings `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise _refuse(where, name, f"one of {tuple(allowed)}", value)
    return value


def token_ids(name: str, value: Any, vocab_size: int | None = None, *, where: str = "") -> tuple[int, ...]:
    """`value` as a tuple of token ids: a list or tuple (not a str or bytes, whose items are characters or
    bytes, not ids) of ints (not bools) with 0 <= id (< vocab_size if given: an id past the vocabulary
    would fail in the embedding lookup, or never match a prompt's token)."""
    bound = f" and < {vocab_size} (the model's vocabulary)" if vocab_size is not None else ""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
            isinstance(t, (numbers.Integral, np.integer)) and not isinstance(t, (bool, np.bool_)) and int(t) >= 0
            and (vocab_size is None or int(t) < vocab_size) for t in value):
        raise _refuse(where, name, f"a list of token ids (ints >= 0{bound})", value)
    return tuple(int(t) for t in value)


def int32_ids(name: str, value: Any) -> torch.Tensor:
    """`value` (a tensor, array or sequence of integers) as an int32 tensor on the CPU: integers only (a
    float would be truncated, a bool read as 0 or 1) and each within int32 (a larger one would wrap)."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _refuse("", name, "integers (a tensor or a sequence of ints)", value) from exc
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool
                      or int(t.min()) < -(2**31) or int(t.max()) >= 2**31):  # empty: the caller says what it needs
        raise _refuse("", name, "integers within int32 (not floats or bools)", value if t.numel() <= 8 else t.dtype)
    return t.to(torch.int32).cpu()


def chunk_ids(name: str, value: Any, size: int = 16) -> list[bytes]:
    """`value` as a list of chunk ids: a sequence (not a str or bytes) of `size`-byte bytes-like ids. A wrong
    type or length can name no stored chunk, and failed deep inside (TypeError, or "not stored") before."""
    # a memoryview's len() counts its items, not its bytes: the length is checked on the bytes themselves
    ids = None if isinstance(value, (str, bytes, bytearray, memoryview)) or not isinstance(value, Sequence) or not all(
        isinstance(c, (bytes, bytearray, memoryview)) for c in value) else [bytes(c) for c in value]
    if ids is None or not all(len(c) == size for c in ids):
        raise _refuse("", name, f"a list of {size}-byte chunk ids (chunk_id(token_ids))",
                      value if not isinstance(value, Sequence) or len(value) <= 8 else f"{len(value)} items")
    return ids
