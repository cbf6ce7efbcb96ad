"""RoPE's rotation of a layer's cached K in one GPU kernel (torch.compile), for the blend's later layers.

Every later layer of a blend re-rotates the K it loaded (every covered row: 4k rows x 8 heads x 128 of an
8B model) from the positions it was computed at to the prompt's. Eager, that is three kernels (x * cos,
the half-swap, the fused multiply-add) moving about 3.5x the tensor's bytes; one fused kernel reads x once
and writes its rows of the layer's K once (an H100, 4k tokens: 48 us a layer eager, in 31 layers).

Compiled on first use (seconds, once per process; a new shape once more, then dynamic shapes). Used on a
GPU only and while `usable()`: `BLOCKSTORE_BLEND_FUSED_ROPE=1` turns it on (off: with FlexAttention, the
blend on an H100 was slower with both than without, bench/README.md, "compiled kernels for the blend"); a compile or call failure
warns once and every later rotation is the eager one (`compute._rotate_signed`), whose results are the same
up to float rounding.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

_state: dict[str, Any] = {"compiled": None, "failed": None}
_lock = threading.Lock()


def usable(device: torch.device) -> bool:
    """Whether rotations into a buffer on `device` go through the fused kernel."""
    return (device.type == "cuda" and _state["failed"] is None
            and os.environ.get("BLOCKSTORE_BLEND_FUSED_ROPE", "0") == "1")


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """out = x * cos + rotate_half(x) * sin (signed_sin: sin with its first half negated, as
    compute._signed_sin makes it): the eager ops of compute._rotate_signed, which the compiler fuses."""
    out.copy_(torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin))


def _kernel(compiled: bool) -> Callable[..., None]:
    if not compiled:
        return _rotate_into
    with _lock:
        if _state["compiled"] is None:
            _state["compiled"] = torch.compile(_rotate_into, dynamic=True)
        return _state["compiled"]  # type: ignore[no-any-return]


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, *,
                compiled: bool = True) -> bool:
    """Rotate x into `out` (same shape; cos, signed_sin broadcast over it, in x's dtype); False (and the
    eager rotation from then on) if the fused kernel fails here."""
    try:
        _kernel(compiled)(out, x, cos, signed_sin)
    except Exception as exc:  # a compile or kernel failure: fall back for good, and say so once
        _state["failed"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"blockstore.blend: the fused RoPE kernel failed ({_state['failed'][:300]}); cached K "
                      "is rotated by eager ops from now on", RuntimeWarning, stacklevel=2)
        return False
    return True


def failure() -> str | None:
    """Why the fused rotation was turned off in this process (None: it was not)."""
    return _state["failed"]  # type: ignore[no-any-return]
