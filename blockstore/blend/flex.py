"""Attention of scattered query rows that skips the key blocks none of a block of rows may see (GPU).

A blend's later layers attend a few hundred query rows, spread over the whole prompt, to every key
under the position mask (`k_pos <= q_pos`). SDPA with an explicit mask computes every (row, key) pair
and reads the mask besides: on an H100 at 4k tokens of an 8B model it was 6 ms of a 28 ms blend, and 19
of 63 ms at 8k (bench/README.md). FlexAttention takes the mask as a rule, builds from it which
128 x 128 tiles hold any allowed pair, and skips the others: the rows' keys are on average half the
prompt. Grouped-query attention is native to it (no copy of K and V per query head).

Compiled by torch.compile (Triton) on first use: the first blend of a process pays the compile (seconds;
a later new shape compiles again once, then runs with dynamic shapes). If the compile or a call fails,
a warning says why and every later call goes back to SDPA (`compute.attend`), whose results are the
same up to float rounding.

Off unless `BLOCKSTORE_BLEND_FLEX=1`: on an H100 (8B shape, bench/README.md "compiled kernels for the
blend") the attention call alone is faster (4k tokens, 614 rows: 0.133 ms against SDPA's 0.239; 8k: 0.376
against 0.657), but the blend with it is slower (hot 43.1 against 35.0 ms at 4k, 71.5 against 65.8 at 8k,
with fused_rope.py on too): the compiled call's overhead on the CPU, which issues a blend's ops, costs more
than the GPU time it saves. `python -m bench.blend` times both (the `*_compiled` rows).

Inside the CUDA graphs of a blend's later layers (graphs.py, `cuda_graphs=True`) that overhead is gone: the
graphs capture the compiled kernel and replay it. On an H100 (2026-12-07 19:34 UTC, 4 repeats,
bench/results/blend_h100_graphs_flex.json) graphs with FlexAttention gave hot 31.8 ms at 4k (3.08x full
prefill; graphs with SDPA 35.4, eager 34.6) and 59.6 ms at 8k (eager 65.8, eager compiled 58.1).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - an older torch: SDPA only
    flex_attention = None  # type: ignore[assignment]

TILE = 128  # FlexAttention's default block size: the positions below are padded to a multiple of it

_state: dict[str, Any] = {"compiled": None, "failed": None}
_lock = threading.Lock()


def usable(device: torch.device) -> bool:
    """Whether scattered-row attention on `device` goes through FlexAttention."""
    return (device.type == "cuda" and flex_attention is not None and _state["failed"] is None
            and os.environ.get("BLOCKSTORE_BLEND_FLEX", "0") == "1")


def _padded(x: torch.Tensor, fill: int) -> torch.Tensor:
    """x padded to a multiple of TILE (and one tile more): the kernel evaluates the mask rule on whole
    tiles, so a rule that indexes these tensors must find an element at every index it is given."""
    pad = -x.shape[0] % TILE + TILE
    return torch.cat((x, x.new_full((pad,), fill)))


def _tile_ends(x: torch.Tensor, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last value of each TILE-long run of sorted `x` (the last run padded with its last
    value): the lowest and highest position in each tile."""
    padded = torch.cat((x, x[-1:].expand(tiles * TILE - x.shape[0])))
    runs = padded.view(tiles, TILE)
    return runs[:, 0].contiguous(), runs[:, -1].contiguous()  # searchsorted copies a strided input


MaskTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def mask_tables(q_pos: torch.Tensor, k_pos: torch.Tensor) -> MaskTables:
    """The tile tables of the position mask of these query rows over these keys (BlockMask.from_kv_blocks'
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, int32). Both must be sorted
    ascending (a blend's rows and keys are): then a tile of rows sees a prefix of the key tiles, the
    first ones whole (every key at or before the tile's lowest row: no mask evaluated there), the rest
    in part, found by two binary searches over the tiles' first and last positions. A dozen small ops;
    `create_block_mask`, which evaluates the rule on every (row, key) pair and derives the backward
    pass's tables too, took 7.6 ms a blend on an H100 at 4k tokens (the attention it saves: ~3 ms)."""
    n_q, n_k = q_pos.shape[0], k_pos.shape[0]
    q_tiles, k_tiles = -(-n_q // TILE), -(-n_k // TILE)
    q_lo, q_hi = _tile_ends(q_pos, q_tiles)
    k_lo, k_hi = _tile_ends(k_pos, k_tiles)
    # a key tile cut short by the end of the keys is never whole: its missing keys are not allowed pairs
    full = torch.searchsorted(k_hi, q_lo, right=True).clamp(max=n_k // TILE)
    seen = torch.searchsorted(k_lo, q_hi, right=True)
    order = torch.arange(k_tiles, device=q_pos.device)
    partial_idx = (full[:, None] + order[None, :]).clamp(max=k_tiles - 1)

    def as_table(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32)[None, None].contiguous()

    return as_table(seen - full), as_table(partial_idx), as_table(full), as_table(order.expand(q_tiles, k_tiles))


def mask_over(tables: MaskTables, q_padded: torch.Tensor, k_padded: torch.Tensor,
              n_q: int, n_k: int) -> BlockMask:
    """A block mask over `tables` (mask_tables' shapes) whose rule reads the positions in `q_padded`,
    `k_padded` (_padded's lengths). It holds these tensors, not copies: a CUDA graph (graphs.py) captures
    one and refills the tensors in place for every blend."""
    def allowed(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return k_padded[kv_idx] <= q_padded[q_idx]

    return BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=TILE, mask_mod=allowed, seq_lengths=(n_q, n_k),
                                    compute_q_blocks=False)


def padded_length(n: int) -> int:
    """The length _padded gives a tensor of n positions."""
    return n + (-n % TILE) + TILE


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> BlockMask:
    """The position mask of these sorted query rows over these sorted keys as a FlexAttention block
    mask (made once per blend: every later layer attends the same rows over the same keys)."""
    return mask_over(mask_tables(q_pos, k_pos), _padded(q_pos, -1), _padded(k_pos, torch.iinfo(k_pos.dtype).max),
                     q_pos.shape[0], k_pos.shape[0])


def _kernel(compiled: bool) -> Callable[..., Any]:
    if not compiled:
        return flex_attention  # eager: materialises the scores (tests on a CPU)
    with _lock:
        if _state["compiled"] is None:
            _state["compiled"] = torch.compile(flex_attention)
        return _state["compiled"]  # type: ignore[no-any-return]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, *,
           compiled: bool = True) -> torch.Tensor | None:
    """q [n, heads, d] over k, v [n_k, kv_heads, d] under `mask` (block_mask of their positions) ->
    [n, heads * d]; None (and SDPA from then on) if FlexAttention fails here."""
    n = q.shape[0]
    try:
        out = _kernel(compiled)(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    except Exception as exc:  # a compile or kernel failure: fall back for good, and say so once
        _state["failed"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"blockstore.blend: FlexAttention failed ({_state['failed'][:300]}); scattered-row "
                      "attention uses SDPA with an explicit mask from now on", RuntimeWarning, stacklevel=2)
        return None
    return out[0].transpose(0, 1).reshape(n, -1)  # type: ignore[index,union-attr]


def failure() -> str | None:
    """Why FlexAttention was turned off in this process (None: it was not)."""
    return _state["failed"]  # type: ignore[no-any-return]
