"""CUDA graphs of a blend's later layers (GPU only): one graph per layer, replayed as that layer's cached
KV is placed, so the CPU issues one replay where it issued ~25 ops.

After the check layer a blend computes a few hundred scattered rows per layer: each of its ~25 ops a layer
is a small kernel, and on an H100 the 8B shape's hot blend at 4k tokens spent 45.6 ms of wall time issuing
27.2 ms of kernels on one host (bench/README.md, blend TTFT). A CUDA graph replays a layer's kernels from
one call. A graph bakes in shapes and addresses, so it is captured per bucket: keys rounded up to
KEY_STEP (with at least one spare row) and recomputed rows rounded up to ROW_STEP, over static buffers
(the rows' hidden states, RoPE tables, scatter indices, this layer's K and V of every row, the position
mask). Padding rows sit at position 0 (at the prompt's last position with FlexAttention, FLEX, so the rows
stay sorted) and write their K/V into a spare key row that the mask hides from
every real row, so they change nothing a real row computes; they see key 0 only (with FLEX every real key), so they
stay finite.

The ops are those of the eager path (compute.qkv, attend's masked SDPA, finish_layer) on the padded
shapes: a real row's results are the eager ones up to the rounding a different kernel shape gives
(bf16 noise; bench.blend_ab reports the largest difference). The CPU path never comes here.

A bucket's capture (a warm-up pass and one capture per layer) is paid once and reported
(`capture_s`); the last CACHED_BUCKETS buckets per model are kept (at 8k tokens of the 8B shape a bucket
holds ~0.3 GB: this layer's K/V, the mask, the graphs' memory). If a capture fails, a warning says why and
blends run eagerly from then on.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from blockstore.blend import flex
from blockstore.blend.compute import _fold, _heads_first, _rope_of, _rotate_signed, _unfold, finish_layer, rms_norm
from blockstore.blend.llama import LlamaWeights

# SDPA kernels a capture may use, tried in turn: whatever SDPA picks (cuDNN's on an H100), else the
# memory-efficient kernel alone (should a cuDNN kernel refuse to be captured)
CAPTURE_BACKENDS: tuple[tuple[SDPBackend, ...] | None, ...] = (None, (SDPBackend.EFFICIENT_ATTENTION,))
# With FlexAttention on (flex.usable), a capture tries it first: inside a graph its compiled call costs the
# CPU nothing at replay, which is what made it lose when called eagerly (flex.py), and it skips the key
# tiles no row of a tile may see (about half of them). The SDPA captures above are the fallbacks.
FLEX = "flex"
KEY_STEP = 128  # keys bucket: the mask's rows stay 16-element aligned (SDPA copies a misaligned mask each call)
ROW_STEP = 64  # recomputed-rows bucket: at most 63 padding rows, a few % of a 4k blend's rows
CACHED_BUCKETS = 4
# a bucket is captured once it has been seen this many times among the last SIGHTINGS blends' buckets (the
# blends before run eagerly): a capture costs 0.2-0.3 s on an H100, several blends, so prompts of ever new
# lengths must not pay one each (H35's review: with lengths uniform in 1k-8k, capturing on sight and keeping
# 4 buckets captured on 96 % of blends); a workload that repeats its lengths gets its graphs
CAPTURE_AFTER = 3
SIGHTINGS = 128

_state: dict[str, Any] = {"failed": None}
_lock = threading.Lock()
# one capture at a time in the process (H35's review): two threads each needing a new bucket would capture
# at once, and a failed capture turns graphs off for the process
_capture_lock = threading.Lock()


def usable(device: torch.device) -> bool:
    """Whether blends on `device` replay captured layers (CUDA, and no capture has failed)."""
    return device.type == "cuda" and _state["failed"] is None


def flex_wanted(device: torch.device) -> bool:
    """Whether captures on `device` try FlexAttention first (flex.usable: off unless BLOCKSTORE_BLEND_FLEX=1)."""
    return flex.usable(device)


def failure() -> str | None:
    """Why graphs were turned off in this process, or why a capture fell back to the memory-efficient
    attention kernel (None: neither happened)."""
    return _state["failed"] or _state.get("fallback")  # type: ignore[no-any-return]


def _no_context() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


def bucket_of(keys: int, rows: int) -> tuple[int, int]:
    """(keys, rows) of the bucket a blend of `keys` prompt tokens and `rows` recomputed rows runs in."""
    return -(-(keys + 1) // KEY_STEP) * KEY_STEP, -(-rows // ROW_STEP) * ROW_STEP


class LayerGraphs:
    """Static buffers of one (keys, rows) bucket and a graph per layer from `first` on. With
    `capture=False` (tests on a CPU) `run` calls the same padded layer eagerly."""

    def __init__(self, w: LlamaWeights, keys: int, rows: int, first: int, *, capture: bool = True,
                 backends: tuple[SDPBackend, ...] | str | None = None) -> None:
        c, dev, dt = w.config, w.device, w.dtype
        self.w, self.keys, self.rows, self.first = w, keys, rows, first
        self.flex = backends == FLEX
        self.backends = None if self.flex or isinstance(backends, str) else backends
        group = c.num_attention_heads // c.num_key_value_heads
        self.hidden = torch.zeros(rows, c.hidden_size, device=dev, dtype=dt)
        self.dest = torch.full((rows,), keys - 1, device=dev, dtype=torch.int64)  # where each row's K/V goes
        self.cos = torch.ones(rows, 1, c.head_dim, device=dev, dtype=dt)
        self.sin = torch.zeros(rows, 1, c.head_dim, device=dev, dtype=dt)
        # this layer's K and V of every row: the spare rows stay finite (a masked key still enters q.k)
        self.k_all = torch.zeros(keys, c.num_key_value_heads, c.head_dim, device=dev, dtype=dt)
        self.v_all = torch.zeros_like(self.k_all)
        if self.flex:  # the rows' and keys' positions and the tile tables the block mask reads, refilled by begin
            self.q_pos = torch.full((flex.padded_length(rows),), -1, device=dev, dtype=torch.int64)
            self.k_pos = torch.full((flex.padded_length(keys),), torch.iinfo(torch.int64).max, device=dev,
                                    dtype=torch.int64)
            self.q_pos[:rows] = 0
            self.k_pos[:keys - 1] = torch.arange(keys - 1, device=dev)
            self.tables = flex.mask_tables(self.q_pos[:rows], self.k_pos[:keys])
            self.mask = flex.mask_over(self.tables, self.q_pos, self.k_pos, rows, keys)
        else:
            self.bias = torch.zeros(1, 1, group * rows, keys, device=dev, dtype=dt)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lock = threading.Lock()  # one blend at a time fills and replays the buffers
        self.capture_s = 0.0
        self.replays = 0  # blends that ran in this bucket (the first paid for the capture)
        if capture:
            t0 = time.perf_counter()
            self._capture()
            self.capture_s = time.perf_counter() - t0

    def _layer(self, index: int) -> None:
        """Layer `index` on the static buffers: compute.qkv, the scatter of the fresh K/V into the
        layer's KV, the masked attention and finish_layer, as the eager path runs them."""
        w, layer, c, n = self.w, self.w.layers[index], self.w.config, self.rows
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        x = rms_norm(self.hidden, layer.input_norm, c.rms_norm_eps)
        qk = F.linear(x, layer.qk_proj)
        v = F.linear(x, layer.v_proj).view(n, kv_heads, c.head_dim)
        rotated = _rotate_signed(qk.view(n, heads + kv_heads, c.head_dim), self.cos, self.sin)
        self.k_all.index_copy_(0, self.dest, rotated[:, heads:])
        self.v_all.index_copy_(0, self.dest, v)
        if self.flex:
            attn = flex.attend(rotated[:, :heads], self.k_all, self.v_all, self.mask, compiled=self.w.device.type == "cuda")
            if attn is None:  # flex.attend warned and turned FlexAttention off: this capture falls back
                raise RuntimeError(f"FlexAttention failed: {flex.failure()}")
        else:
            with sdpa_kernel(list(self.backends)) if self.backends else _no_context():
                out = F.scaled_dot_product_attention(_fold(rotated[:, :heads], kv_heads), _heads_first(self.k_all),
                                                     _heads_first(self.v_all), attn_mask=self.bias)
            attn = _unfold(out, n)
        self.hidden.copy_(finish_layer(w, layer, self.hidden, attn))

    def _capture(self) -> None:
        dev = self.w.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # a warm-up pass off the capture (cuBLAS and cuDNN set up lazily)
            for index in range(self.first, len(self.w.layers)):
                self._layer(index)
        torch.cuda.current_stream(dev).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # one memory pool: the layers replay one after another
        for index in range(self.first, len(self.w.layers)):
            graph = torch.cuda.CUDAGraph()
            # thread_local: the blend's loader threads keep copying and synchronizing their own streams
            # meanwhile; the default ("global") mode forbids them those calls (H35's review)
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._layer(index)
            self.graphs[index] = graph

    def begin(self, hidden: torch.Tensor, active: torch.Tensor, n: int) -> None:
        """Fill the buffers for a blend of `n` tokens whose recomputed rows are `active` (sorted prompt
        positions) with hidden states `hidden`: padding rows at position 0 (FLEX: at n - 1, keeping the rows
        sorted), writing to the spare key row."""
        c, rows = self.w.config, active.shape[0]
        group = c.num_attention_heads // c.num_key_value_heads
        self.hidden[:rows].copy_(hidden)
        self.hidden[rows:].zero_()
        self.dest[:rows].copy_(active)
        self.dest[rows:].fill_(self.keys - 1)
        # rows past this prompt hold an earlier blend's K/V: masked, but a non-finite one would still make
        # NaN of q.k + (-inf) (H35's review)
        self.k_all[n:].zero_()
        self.v_all[n:].zero_()
        if self.flex:  # padding rows at the last position keep the rows sorted (mask_tables needs it)
            q_pos = torch.cat((active, active.new_full((self.rows - rows,), n - 1)))
        else:
            q_pos = torch.cat((active, active.new_zeros(self.rows - rows)))
        cos, signed_sin = _rope_of(q_pos, c.head_dim, c.rope_theta, self.hidden.dtype)
        self.cos.copy_(cos)
        self.sin.copy_(signed_sin)
        k_pos = torch.arange(self.keys, device=active.device)
        k_pos[n:] = torch.iinfo(torch.int64).max  # spare rows: no query may see them
        if self.flex:
            self.q_pos[:self.rows].copy_(q_pos)
            self.k_pos[:self.keys].copy_(k_pos)
            for static, fresh in zip(self.tables, flex.mask_tables(q_pos, k_pos)):
                static.copy_(fresh)
            return
        hidden_keys = k_pos[None, :] > q_pos.repeat(group)[:, None]
        self.bias[0, 0].zero_().masked_fill_(hidden_keys, float("-inf"))

    def run(self, index: int) -> None:
        """Layer `index` on the buffers (its cached K/V already placed in k_all, v_all)."""
        graph = self.graphs.get(index)
        if graph is None:
            self._layer(index)
        else:
            graph.replay()


def wanted(w: LlamaWeights, n: int, rows: int, first: int) -> bool:
    """Whether a blend of `n` tokens recomputing `rows` rows from layer `first` on should replay graphs:
    its bucket is captured, or has now been seen CAPTURE_AFTER times among the last SIGHTINGS blends
    (this call counts as one)."""
    if not usable(w.device):
        return False
    key = (*bucket_of(n, rows), first, flex_wanted(w.device))
    with _lock:
        if key in w.graph_buckets:
            return True
        seen = w.graph_sightings
        seen.append(key)
        del seen[:-SIGHTINGS]
        return seen.count(key) >= CAPTURE_AFTER


def layer_graphs(w: LlamaWeights, n: int, rows: int, first: int) -> LayerGraphs | None:
    """The captured layers of this model for a blend of `n` tokens and `rows` recomputed rows from
    layer `first` on (captured now if new: LayerGraphs.capture_s says what it cost), or None when
    graphs are off or the capture failed (the caller runs eagerly)."""
    if not usable(w.device):
        return None
    key = (*bucket_of(n, rows), first, flex_wanted(w.device))
    cache = w.graph_buckets
    with _lock:
        got = cache.pop(key, None)
        if got is not None:
            cache[key] = got  # the most recently used last
            return got  # type: ignore[no-any-return]
    with _capture_lock:
        with _lock:  # another caller may have captured it while this one waited
            got = cache.get(key)
        return got if got is not None else _capture(w, key)


def _capture(w: LlamaWeights, key: tuple[int, int, int, bool]) -> LayerGraphs | None:
    """Build and cache the bucket `key` (the caller holds _capture_lock); None when every backend failed."""
    cache = w.graph_buckets
    errors, out_of_memory = [], True
    tried: tuple[tuple[SDPBackend, ...] | str | None, ...] = ((FLEX,) if key[3] else ()) + CAPTURE_BACKENDS
    for backends in tried:
        try:
            got = LayerGraphs(w, key[0], key[1], key[2], capture=w.device.type == "cuda", backends=backends)
            break
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured here: the next backends
            errors.append(f"{backends}: {type(exc).__name__}: {exc}"[:300])
            out_of_memory = out_of_memory and isinstance(exc, torch.OutOfMemoryError)
    else:
        if out_of_memory:  # this bucket does not fit now: eager for it, graphs stay on (H35's review)
            return None
        _state["failed"] = "; ".join(errors)  # eager from now on, said once
        warnings.warn(f"blockstore.blend: CUDA graph capture failed ({_state['failed']}); blends run "
                      "their layers eagerly from now on", RuntimeWarning, stacklevel=2)
        return None
    if errors:
        _state["fallback"] = "; ".join(errors)
    with _lock:
        cache[key] = got
        while len(cache) > CACHED_BUCKETS:
            del cache[next(iter(cache))]
    return got
