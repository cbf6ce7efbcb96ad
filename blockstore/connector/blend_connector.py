"""vLLM v1 KV connector that serves blended chunk KV from blockstore (issue 15, item 4).

    KVTransferConfig(kv_connector="BlockstoreBlendConnector",
                     kv_connector_module_path="blockstore.connector.blend_connector", kv_role="kv_both",
                     kv_connector_extra_config={"blend.store_path": DIR, "blend.separator": " # # ", ...})

A prompt in blend form is ``seg_0 SEP seg_1 SEP ... SEP question`` (``blend_spans``). The **scheduler
side** looks every chunk up in the store (``ChunkKVStore.contains``); when stored chunks cover at least
``blend.min_reused_tokens`` prompt tokens it claims the prompt up to its last whole vLLM block (never
the last token). The **worker side** runs the blender (its own torch forward of the same weights: chunk
KV loaded in one batched read, re-rotated to the new positions, the most deviating tokens and every
token outside a chunk recomputed) and writes the result into vLLM's paged KV cache at the request's
blocks (``paged_kv``); vLLM computes the rest of the prompt and decodes. Chunks a prompt brings that
the store lacks are computed on their own and stored after the step's forward, so the next prompt
that carries them, in any order, is served blended.

It composes with the LMCache prefix tier through vLLM's ``MultiConnector`` (``multi_connector_config``,
``blend_config.py``): the first connector that claims tokens for a request serves it, so this one goes first and
claims only prompts with stored chunks; every other prompt falls through to LMCache.

The scheduler and the worker run in different processes: the worker holds the store (its one writer);
the scheduler knows which chunks are stored from a read-only scan at start plus what the worker
reports storing after each step (``ChunkIndex``). Failures never give wrong KV: a chunk the index names
but the store no longer has is computed by the blender on the spot; a store too full to keep a prompt's
new chunks (NoSpace) still serves the chunks it holds, the new ones computed and not kept; a chunk whose
stored KV fails its checks is recomputed and stored again (``Blender.blend``); a blend that
fails (a store read error, a disk's OSError, any exception: the worker keeps serving) reports the request's
claimed blocks as load errors, and vLLM recomputes them, with ``kv_load_failure_policy="recompute"``
(``multi_connector_config`` sets it; vLLM's default, "fail", would fail the request instead); a prompt's
new chunks whose store fails (any exception) are left out, a future miss.

Extra config keys: ``blend_config.py``; the checks they share with ``Blender(...)``: ``blockstore.blend.options``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from blockstore.blend import chunk_id
from blockstore.connector import blend_spans, paged_kv
from blockstore.connector.blend_config import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    DEFAULT_SEPARATOR,
    BlendSettings,
    kv_transfer_extra_config,
    multi_connector_config,
    separator_token_ids,
)
from blockstore.connector.blend_runtime import BlendRuntime, ChunkIndex, weights_model_id
from blockstore.errors import BlockstoreError, InvalidArgument, NoSpace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# What the scheduler tells the worker


@dataclass
class BlendLoad:
    """Blend the prompt and write positions ``start..end-1`` into ``block_ids``."""

    req_id: str
    token_ids: list[int]
    spans: list[tuple[int, int]]
    block_ids: list[int]
    start: int
    end: int


@dataclass
class ChunkSave:
    """Compute and store the chunks of a prompt the store lacks (``spans``)."""

    req_id: str
    token_ids: list[int]
    spans: list[tuple[int, int]]


@dataclass
class BlendConnectorMetadata(KVConnectorMetadata):
    loads: list[BlendLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)


@dataclass
class BlendWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: the chunk ids the worker stored in it."""

    stored_chunks: tuple[bytes, ...] = ()

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, BlendWorkerMetadata)
        return BlendWorkerMetadata(self.stored_chunks + other.stored_chunks)


@dataclass
class _Plan:
    """The scheduler's view of one request, from its lookup until its metadata is sent."""

    token_ids: list[int]
    spans: list[tuple[int, int]]
    present: list[bool]
    num_computed: int = 0
    claimed: int = 0
    block_ids: list[int] = field(default_factory=list)


@dataclass
class BlendCounters:
    """What the worker side did (written to blend.stats_path): counts, not assumptions."""

    requests_blended: int = 0
    tokens_written: int = 0  # prompt tokens whose KV this connector wrote into vLLM's cache
    tokens_reused: int = 0  # of the blended prompts' tokens, those whose KV came from stored chunks
    tokens_recomputed: int = 0  # tokens the blender recomputed in its later layers
    chunks_hit: int = 0
    chunks_missing: int = 0
    chunks_stored: int = 0
    load_failures: int = 0
    blend_seconds: float = 0.0
    write_seconds: float = 0.0
    store_seconds: float = 0.0
    last_error: str | None = None


# ---------------------------------------------------------------------------------------------
# The connector


def _refuse_parallel(parallel: Any) -> None:
    """One worker, one engine: the blender computes every KV head of the whole model and the worker writes them
    all into its paged cache, and the store has one writer (its LOCK). With tensor or pipeline parallel
    workers, each holds a shard of the heads or layers; with data parallel engines, each worker would open the
    same store. Refused at start, naming the setting, where each used to fail later: StoreLocked at the second
    worker's open, or KV of the wrong shape written into a shard's cache."""
    sizes = {name: int(getattr(parallel, name, 1)) for name in
             ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")}
    over = {name: n for name, n in sizes.items() if n != 1}
    if over:
        raise InvalidArgument(f"{CONNECTOR_CLASS} serves one vLLM worker (tensor, pipeline and data parallel "
                              f"size 1); got {', '.join(f'{k}={v}' for k, v in over.items())}")


class BlockstoreBlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        _refuse_parallel(vllm_config.parallel_config)
        self.settings = BlendSettings.from_extra_config(extra, str(vllm_config.model_config.model))
        self.block_size = int(vllm_config.cache_config.block_size)
        self.min_reused = self.settings.min_reused_tokens or self.block_size
        self.runtime: BlendRuntime | None = None
        self.index: ChunkIndex | None = None
        if role == KVConnectorRole.WORKER:
            self.runtime = BlendRuntime(self.settings)
        else:
            self.index = ChunkIndex(self.settings, weights_model_id(self.settings))
        # scheduler side
        self._plans: dict[str, _Plan] = {}
        self._ready: dict[str, _Plan] = {}
        # worker side
        self._new_chunks: list[bytes] = []  # stored since the last step's worker metadata
        # Chunks a step's prompts brought are computed and stored at the end of the *next* step, so the
        # request that brought them gets its first token without waiting for them. (A thread beside the
        # step was tried: on a 2-core CPU its torch work and vLLM's fight over the cores, and the first
        # token of the request came 2-6x later than without the connector.)
        self._deferred: list[ChunkSave] = []
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_of: dict[str, int] = {}
        self._failed_blocks: set[int] = set()
        self.counters = BlendCounters()
        log.info("%s (%s): store %s, model %s, separator ids %s, ratio %.2f", CONNECTOR_CLASS, role.name,
                 self.settings.store_path, self.settings.model_dir, self.settings.separator_ids, self.settings.ratio)

    # ----------------------------------------------------------------- scheduler side

    def _lookup(self, request: Request) -> _Plan:
        plan = self._plans.get(request.request_id)
        if plan is None:
            ids = list(request.prompt_token_ids or [])
            spans = blend_spans.find_chunk_spans(ids, self.settings.separator_ids, self.settings.min_chunk_tokens)
            present = [False] * len(spans)
            if spans:
                assert self.index is not None
                present = self.index.contains([chunk_id(ids[s:e]) for s, e in spans])
            plan = _Plan(ids, spans, present)
            self._plans[request.request_id] = plan
        return plan

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        plan = self._lookup(request)
        plan.num_computed = num_computed_tokens
        if blend_spans.covered_tokens(plan.spans, plan.present) < self.min_reused:
            return 0, False
        return blend_spans.claimable_tokens(len(plan.token_ids), num_computed_tokens, self.block_size), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        plan = self._lookup(request)
        plan.claimed = num_external_tokens
        plan.block_ids = list(blocks.get_block_ids()[0]) if num_external_tokens else []
        self._ready[request.request_id] = plan

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = BlendConnectorMetadata()
        scheduled: dict[str, list[int] | None] = {r.req_id: list(r.block_ids[0]) for r in
                                                  scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids and req_id in self._ready:
                new_ids = cached.new_block_ids[i]
                scheduled[req_id] = list(new_ids[0]) if new_ids is not None else None
        for req_id, block_ids in scheduled.items():
            plan = self._ready.pop(req_id, None)
            if plan is None:
                continue
            self._plans.pop(req_id, None)
            if plan.claimed > 0:
                start = plan.num_computed
                meta.loads.append(BlendLoad(req_id, plan.token_ids, plan.spans, block_ids or plan.block_ids,
                                            start, start + plan.claimed))
            missing = [s for s, ok in zip(plan.spans, plan.present, strict=True) if not ok]
            if plan.claimed == 0 and missing:
                meta.saves.append(ChunkSave(req_id, plan.token_ids, missing))
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        self._ready.pop(request.request_id, None)
        return False, None

    # ----------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        self._layer_of = {name: paged_kv.layer_index(name) for name in kv_caches}
        assert self.runtime is not None
        n = self.runtime.weights.config.num_hidden_layers
        if sorted(self._layer_of.values()) != list(range(n)):
            raise InvalidArgument(f"{CONNECTOR_CLASS}: vLLM's attention layers {sorted(self._layer_of)} do not "
                                  f"match the blender's model ({n} layers from {self.settings.model_dir})")
        shape = tuple(next(iter(kv_caches.values())).shape)
        log.info("%s: %d KV cache tensors of shape %s", CONNECTOR_CLASS, len(kv_caches), shape)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, BlendConnectorMetadata)
        layers = getattr(forward_context, "no_compile_layers", {}) or {}
        for load in meta.loads:
            try:
                self._serve(load, layers)
            except Exception as exc:  # noqa: BLE001 - a cache that fails serves nothing, it never stops vLLM
                # Nothing half-written is read: vLLM recomputes every block reported here. Any exception (an
                # OSError from a disk, a TypeError from a bug) is a failed load: before, only the store's, torch's
                # and ValueError were, and anything else stopped vLLM's worker and with it the engine.
                self.counters.load_failures += 1
                self.counters.last_error = f"{type(exc).__name__}: {exc}"
                self._failed_blocks.update(load.block_ids[load.start // self.block_size:
                                                          -(-load.end // self.block_size)])
                log.warning("%s: blending %s failed, vLLM recomputes it: %s", CONNECTOR_CLASS, load.req_id, exc,
                            exc_info=not isinstance(exc, BlockstoreError))  # a traceback for what is not the store's
            self._write_stats()

    def _serve(self, load: BlendLoad, layers: dict[str, Any]) -> None:
        assert self.runtime is not None
        t0 = time.perf_counter()
        blender = self.runtime.blender
        try:
            res = blender.blend(load.token_ids, spans=load.spans, store_missing=True)
            stored = list(dict.fromkeys(res.missing_chunks))
            self._new_chunks += stored
        except NoSpace as exc:  # a cache that cannot grow still serves what it holds: the new chunks are not kept
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: the store is full; %s is blended without storing its new chunks: %s", CONNECTOR_CLASS,
                        load.req_id, exc)
            res = blender.blend(load.token_ids, spans=load.spans, store_missing=False)
            stored = []  # the scheduler hears of every chunk of the prompt the store holds (some went in before)
            ids = list(dict.fromkeys(chunk_id(load.token_ids[s:e]) for s, e in load.spans))
            self._new_chunks += [c for c, ok in zip(ids, self.runtime.kv.contains(ids), strict=True) if ok]
        t1 = time.perf_counter()
        slots = paged_kv.slot_mapping(load.block_ids, load.start, load.end, self.block_size)
        for name, cache in self._kv_caches.items():
            layer = self._layer_of[name]
            paged_kv.write_kv(cache, res.keys[layer][load.start:load.end], res.values[layer][load.start:load.end],
                              slots, paged_kv.attention_isa(cache, layers.get(name)))
        self._count_blend(load, res, len(stored), t1 - t0, time.perf_counter() - t1)

    def _count_blend(self, load: BlendLoad, res: Any, stored: int, blend_s: float, write_s: float) -> None:
        c = self.counters
        c.requests_blended += 1
        c.tokens_written += load.end - load.start
        c.tokens_reused += int(res.reused_tokens)
        c.tokens_recomputed += len(res.recomputed)
        c.chunks_missing += len(res.missing_chunks)
        c.chunks_hit += len(load.spans) - len(res.missing_chunks)
        c.chunks_stored += stored
        c.blend_seconds += blend_s
        c.write_seconds += write_s

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv writes every layer before the forward starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # chunk KV is computed position-independently in wait_for_save, not taken from vLLM's cache

    def wait_for_save(self) -> None:
        due, self._deferred = self._deferred, []
        if self.has_connector_metadata():
            meta = self._get_connector_metadata()
            assert isinstance(meta, BlendConnectorMetadata)
            self._deferred = list(meta.saves)
        for save in due:
            self._store_chunks(save)

    def _store_chunks(self, save: ChunkSave) -> None:
        """Each missing chunk's KV computed on its own (positions 0..T-1) and stored."""
        assert self.runtime is not None
        t0 = time.perf_counter()
        stored: list[bytes] = []
        try:
            by_id = {chunk_id(c): c for c in (save.token_ids[s:e] for s, e in save.spans)}  # a repeated chunk once
            chunks = list(by_id.values())
            present = self.runtime.kv.contains(list(by_id))  # an earlier prompt may have stored some
            for chunk, ok in zip(chunks, present, strict=True):
                if not ok:
                    stored.append(self.runtime.blender.store_chunk(chunk))
        except Exception as exc:  # noqa: BLE001 - a chunk not stored is a future miss; it never stops vLLM
            # any exception, as for a load (start_load_kv): a disk's OSError, CUDA out of memory in the prefill
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: storing chunks of %s failed: %s", CONNECTOR_CLASS, save.req_id, exc,
                        exc_info=not isinstance(exc, BlockstoreError))  # a traceback for what is not the store's
        self._new_chunks += stored
        self.counters.chunks_stored += len(stored)
        self.counters.store_seconds += time.perf_counter() - t0
        self._write_stats()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if not self._new_chunks:
            return None
        meta, self._new_chunks = BlendWorkerMetadata(tuple(self._new_chunks)), []
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, BlendWorkerMetadata) and self.index is not None:
            self.index.ids.update(meta.stored_chunks)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _write_stats(self) -> None:
        path = self.settings.stats_path
        if not path or self.runtime is None:  # the worker's counters; the scheduler side has none to write
            return
        tmp = f"{path}.tmp.{os.getpid()}"
        try:  # a statistics file for other processes: its folder gone or its disk full never stops vLLM's worker
            with open(tmp, "w") as f:
                json.dump(asdict(self.counters), f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("%s: cannot write the stats file %s: %s", CONNECTOR_CLASS, path, exc)

    def shutdown(self) -> None:
        for save in self._deferred:  # chunks seen in the last step are stored before the store closes
            self._store_chunks(save)
        self._deferred = []
        self._write_stats()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.close()


# vLLM loads this module by its path (CONNECTOR_MODULE) and callers import the settings and configurations from it
__all__ = [
    "CONNECTOR_CLASS",
    "CONNECTOR_MODULE",
    "DEFAULT_SEPARATOR",
    "BlendConnectorMetadata",
    "BlendCounters",
    "BlendLoad",
    "BlendRuntime",
    "BlendSettings",
    "BlendWorkerMetadata",
    "BlockstoreBlendConnector",
    "ChunkIndex",
    "ChunkSave",
    "kv_transfer_extra_config",
    "multi_connector_config",
    "separator_token_ids",
    "weights_model_id",
]
