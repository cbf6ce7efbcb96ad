"""The CacheBlend-style blender: a prompt made of stored chunks (in any order, at any position) gets
KV for every token from the chunks' stored KV plus a small recompute, instead of a full prefill.

Per prompt: find the chunks (separator tokens or explicit spans) and load their KV (one batched read,
or layer by layer on a loader thread); re-rotate each chunk's K from the positions it was computed at
to its place in this prompt; run the layers before `check_layer` fully; at the check layer, pick the
covered tokens whose fresh V (or K, or both: `deviation`) deviates most from the cached one, after
`sink_tokens` first tokens of each chunk (or, with selector "epic", the first tokens of each chunk: the
same budget; with `query_weighted`, each deviation weighed by the attention the question pays the token
there; with `recency`, divided by the token's distance to the question to that power (selection.py has the
selectors); with `gradual`, more tokens at the check layer, narrowed at the next by the deviation measured
there; or rows the caller names, `recompute`, as an offline oracle does); from then on compute only those
tokens, every token no chunk covers and the last token, attending over the cached KV merged with theirs
under an explicit position mask. Chunks not in the store are computed on their own and stored on the way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from blockstore import foreground
from blockstore.blend import graphs, options
from blockstore.blend.chunk_kv import ChunkKV, ChunkKVStore, KVLayout, chunk_id
from blockstore.blend.compute import (
    Prefill,
    attend,
    finish_layer,
    full_prefill,
    is_tail,
    logits_of,
    qkv,
    rope_cos_sin,
    rotate,
)
from blockstore.blend.kv_codec import DEFAULT_KV_FORMAT, KV_FORMATS, model_id_suffix
from blockstore.blend.llama import LlamaWeights
from blockstore.blend.selection import (
    DEFAULT_DEVIATION,
    DEFAULT_QUERY_WEIGHTED,
    DEFAULT_RECENCY,
    DEVIATIONS,
    SELECTORS,
    Selection,
)
from blockstore.blend.selection import deviation as _deviation  # noqa: F401 - the tests' name for it
from blockstore.blend.selection import query_attention as _query_attention  # noqa: F401 - the tests' name for it
from blockstore.blend.stream_start import LateStream
from blockstore.errors import CorruptionError, InvalidArgument

log = logging.getLogger(__name__)

# CUDA graphs for the layers after the selection (graphs.py): opt-in. Timed on two H100 hosts (8B shape,
# 4k/8k tokens, bench/README.md) the eager path was as fast or faster there (hot 30.0 vs 31.0 ms and
# 30.8 vs 34.0 ms at 4k; both hosts were GPU-bound); graphs are for hosts where issuing the kernels, not
# running them, limits a blend (one host this morning: 45.6 ms of wall time for 27.2 ms of kernels).
DEFAULT_CUDA_GRAPHS = False


@dataclass
class BlendResult:
    """KV for every prompt token (keys[l], values[l]: [N, kv_heads, head_dim], K after RoPE at the
    prompt positions 0..N-1), the last token's logits (float32), and what was reused."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    spans: list[tuple[int, int]]
    reused_tokens: int  # covered tokens whose cached KV was kept in the layers after the check layer
    recomputed: torch.Tensor  # sorted indices of the tokens computed in every layer
    missing_chunks: list[bytes]  # chunk ids that were not in the store (computed here; stored if asked)
    damaged_chunks: list[bytes] = field(default_factory=list)  # stored but failing their checks: recomputed too
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Span:
    start: int
    end: int
    cid: bytes
    chunk: ChunkKV | None = None  # computed here, or loaded in one read; None while streamed


@dataclass
class _Moves:
    """Where a blend's covered rows are and the cos/sin of their re-rotation (the same in every layer)."""

    rows: torch.Tensor | None = None  # None until the first layer that uses cached KV
    cos: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    sin: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    run: tuple[int, int] | None = None  # the covered rows are this one range, chunk after chunk
    streamed: bool = False  # every chunk comes from the layer loader


def _one_buffer(got: list[tuple[_Span, ChunkKV, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K and V of every chunk as two [chunks, tokens, kv_heads, head_dim] views, when the chunks hold
    equally many tokens and their K and V lie one after another in one buffer at equal strides (as
    the layer loader reads a layer: K then V of each chunk, back to back). Re-rotating and placing
    them then takes 4 GPU ops a layer instead of two concatenations, the rotation and two scatters."""
    first = got[0][1]
    k0, v0 = first.keys[got[0][2]], first.values[got[0][2]]
    if not (k0.is_contiguous() and v0.is_contiguous()):
        return None
    item = k0.element_size()
    size = k0.numel() * item
    if v0.data_ptr() != k0.data_ptr() + size:
        return None
    # bytes from one chunk's K to the next chunk's: K and V, then padding to the loader's page alignment
    stride = got[1][1].keys[got[1][2]].data_ptr() - k0.data_ptr() if len(got) > 1 else 2 * size
    if stride < 2 * size or stride % item:
        return None
    for i, (_, chunk, j) in enumerate(got):
        k, v = chunk.keys[j], chunk.values[j]
        if (k.shape != k0.shape or k.dtype != k0.dtype or not (k.is_contiguous() and v.is_contiguous())
                or k.untyped_storage().data_ptr() != k0.untyped_storage().data_ptr()
                or k.data_ptr() != k0.data_ptr() + i * stride or v.data_ptr() != k.data_ptr() + size):
            return None
    shape = (len(got), *k0.shape)
    strides = (stride // item, *k0.stride())
    return k0.as_strided(shape, strides), v0.as_strided(shape, strides)


class Blender:
    def __init__(self, weights: LlamaWeights, kv: ChunkKVStore, ratio: float = 0.15, selector: str = "deviation",
                 check_layer: int = 1, separator_ids: Sequence[int] = (), *, overlap: bool = True,
                 readers: int | None = None, chunk_prefix: Sequence[int] = (), deviation: str = DEFAULT_DEVIATION,
                 sink_tokens: int = 0, query_weighted: bool = DEFAULT_QUERY_WEIGHTED, gradual: float = 1.0,
                 cuda_graphs: bool = DEFAULT_CUDA_GRAPHS, recency: float = DEFAULT_RECENCY,
                 kv_format: str = DEFAULT_KV_FORMAT) -> None:
        """`deviation`: what the deviation selector measures at the check layer (DEVIATIONS).
        `query_weighted`: the deviation selector weighs each token's deviation by the attention the
        question (the rows after the last chunk) pays it at the check layer: a token the answer does not
        read matters little however far its KV moved. `recency`: the deviation selector's score (weighted
        or not) is divided by the token's distance to the question to this power at the check layer (0:
        off; selection.DEFAULT_RECENCY says what was measured).
        `gradual` (CacheBlend's gradual filtering): the deviation selector picks `gradual` times the
        ratio's tokens at the check layer and keeps the ratio's share of them from the next layer on, those
        whose K/V deviate most there (weighted as at the check layer).
        `sink_tokens`: the deviation selector always recomputes this many first tokens of each chunk
        (attention sinks, as EPIC does), counted inside the ratio's budget. `chunk_prefix`: tokens (say <s>) a missing chunk is computed after, so that its first token
        is not a false attention sink; only the chunk's own rows are stored, at positions after the
        prefix. KV computed so differs from KV computed without: its store's model_id says so
        (`Blender.kv_model_id`). `cuda_graphs`: on a GPU, the layers after the selection replay CUDA
        graphs captured once per (tokens, rows) bucket (graphs.py; off by default: DEFAULT_CUDA_GRAPHS);
        the CPU path is the same either way. `kv_format`: how chunk KV is stored and read (kv_codec.KV_FORMATS):
        "model" (the model's dtype) or "int8" (8 bits and a scale per token and kv head: half the bytes
        to read in bfloat16, decoded on the model's device); its store's model_id says which
        (`Blender.kv_model_id`), so the two formats' records never meet."""
        layers = weights.config.num_hidden_layers
        self.w, self.kv, self.ratio = weights, kv, options.real_in("ratio", ratio, 0.0, 1.0)
        self.selector = options.one_of("selector", selector, SELECTORS)
        self.deviation = options.one_of("deviation", deviation, DEVIATIONS)
        self.gradual = options.real_in("gradual", gradual, 1.0, 100.0)
        self.sink_tokens = options.count("sink_tokens", sink_tokens, 0)
        self.recency = options.real_in("recency", recency, 0.0, 4.0)
        self.check_layer = options.count("check_layer", check_layer, 0, layers, what=f"a {layers}-layer model")
        vocab = weights.config.vocab_size
        self.separator_ids = options.token_ids("separator_ids", separator_ids, vocab)
        self.chunk_prefix = options.token_ids("chunk_prefix", chunk_prefix, vocab)
        self.overlap = options.flag("overlap", overlap)
        self.query_weighted = options.flag("query_weighted", query_weighted)
        self.cuda_graphs = options.flag("cuda_graphs", cuda_graphs)
        self.kv_format = options.one_of("kv_format", kv_format, KV_FORMATS)
        # loader threads when overlap is on (None: chunk_kv.DEFAULT_READERS)
        self.readers = None if readers is None else options.count("readers", readers, 1)
        c = weights.config
        expected = KVLayout(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                            str(weights.dtype).removeprefix("torch."), self.kv_format)
        if kv.layout is None:
            kv.layout = expected
        elif kv.layout != expected:
            raise InvalidArgument(f"the chunk KV store expects layout {kv.layout}, the model makes {expected}")
        if kv.model_id != self.kv_model_id(weights, self.chunk_prefix, self.kv_format):
            raise InvalidArgument(f"the chunk KV store is for {kv.model_id!r}, this blender makes KV of "
                                  f"{self.kv_model_id(weights, self.chunk_prefix, self.kv_format)!r}")

    @staticmethod
    def kv_model_id(weights: LlamaWeights, chunk_prefix: Sequence[int] = (), kv_format: str = DEFAULT_KV_FORMAT) -> str:
        """The model_id of the ChunkKVStore a Blender of these weights, chunk prefix and kv_format uses (per dtype
        but float32; "|kv=int8" for 8-bit records: their keys differ from the model format's)."""
        kv_format = options.one_of("kv_format", kv_format, KV_FORMATS)
        return weights.model_id + ("" if weights.dtype == torch.float32 else f"|dtype={str(weights.dtype)[6:]}") + (
            f"|chunk-prefix={','.join(str(int(t)) for t in chunk_prefix)}" if chunk_prefix else "") + (
            model_id_suffix(kv_format))

    def _ids(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.int64)
        if ids.dim() != 1 or ids.shape[0] == 0:
            raise InvalidArgument(f"token_ids must be a non-empty 1-d sequence, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.w.config.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.w.config.vocab_size})")
        return ids.to(self.w.device)

    def prefill(self, token_ids: Sequence[int] | torch.Tensor) -> Prefill:
        """Full prefill (the reference): K, V of every token in every layer and the last-token logits."""
        return full_prefill(self.w, self._ids(token_ids))

    def split(self, token_ids: Sequence[int] | torch.Tensor) -> list[tuple[int, int]]:
        """Chunk spans: the runs of tokens between separator tokens. What follows the last separator
        is the query, computed every time, so it is not a chunk (nor are the separators)."""
        ids = torch.as_tensor(token_ids).tolist()
        cuts = [i for i, t in enumerate(ids) if t in self.separator_ids]
        spans, start = [], 0
        for cut in cuts:
            if cut > start:
                spans.append((start, cut))
            start = cut + 1
        return spans

    def store_chunk(self, token_ids: Sequence[int] | torch.Tensor, *, text: str | None = None) -> bytes:
        """Compute a chunk on its own (positions 0..n-1) and store its KV; returns its chunk id."""
        ids = self._ids(token_ids)
        return self._compute_and_store(ids, text=text).chunk_id

    def _compute_and_store(self, ids: torch.Tensor, *, store: bool = True, text: str | None = None) -> ChunkKV:
        skip = len(self.chunk_prefix)
        prefix = torch.tensor(self.chunk_prefix, dtype=ids.dtype, device=ids.device)
        ref = full_prefill(self.w, torch.cat((prefix, ids)))
        keys, values = [k[skip:] for k in ref.keys], [v[skip:] for v in ref.values]
        pos = torch.arange(skip, skip + ids.shape[0], device=self.w.device)
        cid = chunk_id(ids)
        if store:
            self.kv.put(ids, keys, values, pos, text=text)
        return ChunkKV(cid, ids.to("cpu", torch.int32), pos, keys, values)

    def _check_spans(self, spans: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
        out, last = [], 0
        for s, e in spans:
            if not (isinstance(s, int) and isinstance(e, int)) or not last <= s < e <= n:
                raise InvalidArgument(f"spans must be sorted, non-overlapping (start, end) pairs within the "
                                      f"{n}-token prompt; got {list(spans)}")
            out.append((s, e))
            last = e
        return out

    @torch.inference_mode()
    def blend(self, token_ids: Sequence[int] | torch.Tensor, spans: Sequence[tuple[int, int]] | None = None,
              store_missing: bool = True, *, resident: Mapping[bytes, ChunkKV] | None = None,
              recompute: Sequence[int] | torch.Tensor | None = None) -> BlendResult:
        """Blend a prompt. `resident`: chunk KV already in memory on the model's device (chunk id ->
        ChunkKV, as load_many returns it), used without a read: a hot tier in front of the store.
        `recompute`: the covered rows to recompute from the check layer on, chosen by the caller instead
        of the selector (an offline oracle that knows the full prefill); the uncovered rows and the last
        row are added as always.

        A stored chunk whose KV fails its checks (a checksum, a short or truncated record) is recomputed
        as a missing one is, and stored again if `store_missing` (its new records replace the damaged ones,
        which compaction reclaims): the result's `damaged_chunks` lists it. Before, every blend needing it
        failed until `blockstore fsck --repair`."""
        t0 = time.perf_counter()
        ids = self._ids(token_ids)
        n = int(ids.shape[0])
        spans = self._check_spans(self.split(ids) if spans is None else spans, n)
        host_ids = ids.cpu()  # one copy back: chunk ids hash the tokens on the CPU
        cids = [chunk_id(host_ids[s:e]) for s, e in spans]
        forced = None  # checked before the stream pins blocks and starts readers: a refusal leaves nothing held
        if recompute is not None:
            forced = torch.as_tensor(recompute, dtype=torch.int64).to(self.w.device)
            if forced.dim() != 1 or (forced.numel() and not 0 <= int(forced.min()) <= int(forced.max()) < n):
                raise InvalidArgument(f"recompute must be a 1-d sequence of row indices in [0, {n})")
        # the store's background compaction steps aside while the blend reads and computes (foreground.py):
        # its loads are C calls outside Reader.read, which counts only its own reads
        # chunks this call computed (and stored if asked): a retry uses them and still reports them missing,
        # which is how the connector tells its scheduler what a blend stored
        computed: dict[bytes, ChunkKV] = {}
        with foreground.in_flight():
            try:
                return self._blend(ids, spans, cids, store_missing, resident or {}, forced, frozenset(), computed, t0)
            except CorruptionError as exc:
                damaged = self._damaged([c for c in cids if c not in computed], resident or {})
                if not damaged:  # not the chunks' own records (or gone since): nothing to recompute around
                    raise
                log.warning("blend: chunk KV of %d chunk(s) failed its checks (%s), recomputed%s: %s", len(damaged),
                            exc, " and stored again" if store_missing else "", ", ".join(c.hex() for c in damaged))
                return self._blend(ids, spans, cids, store_missing, resident or {}, forced, damaged, computed, t0)

    def _damaged(self, cids: Sequence[bytes], resident: Mapping[bytes, ChunkKV]) -> frozenset[bytes]:
        """The stored chunks among `cids` whose own load fails its checks: each read alone (only after a
        blend failed so; a chunk's KV is a few MB to a few hundred)."""
        bad = set()
        for cid in dict.fromkeys(c for c in cids if c not in resident):
            try:
                self.kv.load_many([cid])
            except CorruptionError:
                bad.add(cid)
        return frozenset(bad)

    def _blend(self, ids: torch.Tensor, spans: list[tuple[int, int]], cids: list[bytes], store_missing: bool,
               resident: Mapping[bytes, ChunkKV], forced: torch.Tensor | None, damaged: frozenset[bytes],
               computed: dict[bytes, ChunkKV], t0: float) -> BlendResult:
        """blend() once its arguments are checked; chunks in `damaged` are taken as missing, and so are those
        in `computed` (KV an earlier attempt computed: used as it is); this call's computed chunks go there."""
        parts = [_Span(s, e, cid, resident.get(cid)) for (s, e), cid in zip(spans, cids)]
        to_read = [p for p in parts if p.chunk is None]
        timings: dict[str, float] = {}
        located = None
        if self.overlap and to_read:  # a damaged chunk is not looked up: its lookup may be what fails
            wanted = [p.cid for p in to_read if p.cid not in damaged and p.cid not in computed]
            at = dict(zip(wanted, self.kv.locate(wanted))) if wanted else {}
            located = [at.get(p.cid) for p in to_read]
        stream = LateStream(self.kv, located, self.w.device, self.check_layer, self.readers)  # started by _run_layers
        try:  # from here on any failure (a missing chunk's store: DiskFull, ...) closes the stream
            if located is not None:
                found = [loc is not None for loc in located]
            else:  # one batched read of every layer of every chunk
                healthy = [p for p in to_read if p.cid not in damaged and p.cid not in computed]
                for p, got in zip(healthy, self.kv.load_many([p.cid for p in healthy], device=self.w.device)):
                    p.chunk = got
                found = [p.chunk is not None for p in to_read]
            timings["load_s"] = time.perf_counter() - t0
            missing = [p for p, ok in zip(to_read, found) if not ok]
            if missing and any(found):  # the stored chunks' reads overlap the missing ones' prefill
                stream.start()
            for p in missing:  # a chunk the prompt repeats (or an earlier attempt computed) is computed and stored once
                if p.cid not in computed:
                    computed[p.cid] = self._compute_and_store(ids[p.start:p.end], store=store_missing)
                p.chunk = computed[p.cid]
            timings["missing_s"] = time.perf_counter() - t0 - timings["load_s"]
            result = self._run_layers(ids, parts, stream, timings, forced)
        finally:
            stream.close()
            if stream.stream is not None:
                timings["load_s"] = stream.stream.load_s
        result.missing_chunks = [p.cid for p in missing]
        result.damaged_chunks = sorted(damaged)
        timings["total_s"] = time.perf_counter() - t0
        result.timings = timings
        return result

    def _layer_chunks(self, parts: list[_Span], stream: object, layer: int) -> list[tuple[_Span, ChunkKV, int]]:
        """(span, chunk, index of this layer in chunk.keys) for every span."""
        streamed = iter(stream.layer(layer)) if stream is not None and stream.plan else iter(())  # type: ignore[attr-defined]
        out = []
        for p in parts:
            if p.chunk is not None:
                out.append((p, p.chunk, layer))
            else:
                out.append((p, next(streamed), 0))
        return out

    def _cached_kv(self, parts: list[_Span], stream: object, layer: int, n: int, positions: torch.Tensor,
                   moves: _Moves, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cached K (re-rotated to the prompt positions) and V for every covered token (into
        `out` if given); rows no chunk covers are left unset (they are always recomputed). One rotation
        for all chunks."""
        c = self.w.config
        # every row is written below or, not covered by a chunk, is recomputed (always active): no fill
        k_all = torch.empty(n, c.num_key_value_heads, c.head_dim, device=self.w.device,
                            dtype=self.w.dtype) if out is None else out[0]
        v_all = torch.empty_like(k_all) if out is None else out[1]
        if moves.run is not None and moves.streamed:  # after the first layer: the loader's buffer as it is
            views = stream.layer_kv(layer)  # type: ignore[attr-defined]
            if views is not None:
                return self._place(views, moves, k_all, v_all)
        got = self._layer_chunks(parts, stream, layer)
        if not got:
            return k_all, v_all
        for p, chunk, _ in got:
            if chunk.num_tokens != p.end - p.start:
                raise CorruptionError(f"chunk {p.cid.hex()} holds {chunk.num_tokens} tokens, its span has "
                                      f"{p.end - p.start}")
        if moves.rows is None:  # the same rows and deltas in every layer: computed once per blend
            moves.rows = torch.cat([positions[p.start:p.end] for p, _, _ in got])
            delta = moves.rows - torch.cat([chunk.positions.to(positions.device) for _, chunk, _ in got])
            moves.cos, moves.sin = rope_cos_sin(delta, c.head_dim, c.rope_theta)
            adjacent = all(a.end == b.start for (a, _, _), (b, _, _) in zip(got, got[1:]))
            moves.run = (got[0][0].start, got[-1][0].end) if adjacent else None
            # every span streamed (none resident or computed here): later layers take the loader's views
            moves.streamed = stream is not None and all(p.chunk is None for p in parts)
        views = _one_buffer(got) if moves.run is not None else None
        if views is not None:  # one range of rows, one buffer of KV
            return self._place(views, moves, k_all, v_all)
        k_all[moves.rows] = rotate(torch.cat([chunk.keys[j] for _, chunk, j in got]), moves.cos, moves.sin)
        v_all[moves.rows] = torch.cat([chunk.values[j] for _, chunk, j in got])
        return k_all, v_all

    @staticmethod
    def _place(views: tuple[torch.Tensor, torch.Tensor], moves: _Moves, k_all: torch.Tensor,
               v_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached K ([chunks, tokens, kv_heads, head_dim], the chunks' rows one range: moves.run)
        re-rotated straight into its rows of k_all, V copied into v_all's: 4 ops."""
        assert moves.run is not None
        (start, end), shape = moves.run, views[0].shape
        rotate(views[0], moves.cos, moves.sin, out=k_all[start:end].view(shape))
        v_all[start:end].view(shape).copy_(views[1])
        return k_all, v_all

    def _replay_layers(self, captured: graphs.LayerGraphs, parts: list[_Span], stream: object, hidden: torch.Tensor,
                       active: torch.Tensor, moves: _Moves, keys: list[torch.Tensor], values: list[torch.Tensor],
                       timings: dict[str, float]) -> torch.Tensor:
        """The layers from `captured.first` on through their CUDA graphs: each layer's cached KV placed
        into the graphs' buffers as it arrives, the layer replayed, its KV copied out for the result.
        Returns the last row's hidden state."""
        n, rows = int(keys[0].shape[0]), int(active.shape[0])
        pos = torch.arange(n, device=self.w.device)
        with captured.lock:
            if captured.replays == 0:  # this blend paid for the capture
                timings["graph_capture_s"] = captured.capture_s
            captured.replays += 1
            captured.begin(hidden, active, n)
            out = (captured.k_all[:n], captured.v_all[:n])
            for layer_index in range(captured.first, len(self.w.layers)):
                t_wait = time.perf_counter()
                self._cached_kv(parts, stream, layer_index, n, pos, moves, out)
                timings["load_wait_s"] = timings.get("load_wait_s", 0.0) + time.perf_counter() - t_wait
                captured.run(layer_index)
                keys.append(out[0].clone())
                values.append(out[1].clone())
            return captured.hidden[rows - 1 : rows].clone()

    def _run_layers(self, ids: torch.Tensor, parts: list[_Span], late: LateStream,
                    timings: dict[str, float], forced: torch.Tensor | None = None) -> BlendResult:
        n = int(ids.shape[0])
        stream = None  # the loader, started once the full layers are issued (stream_start.py says why)
        pos = torch.arange(n, device=self.w.device)
        moves = _Moves()
        hidden = self.w.embed[ids]
        active = pos  # rows whose hidden state is carried
        tail = False
        # already narrowed, or nothing to narrow: no gradual filtering, the caller's rows, or EPIC
        narrowed = self.gradual <= 1.0 or forced is not None or self.selector != "deviation"
        keys, values = [], []
        sel = Selection(self.ratio, self.selector, self.deviation, self.sink_tokens, self.query_weighted, self.recency)
        spans = [(p.start, p.end) for p in parts]
        for layer_index, layer in enumerate(self.w.layers):
            # active == pos[active] (pos is arange); one tensor object per blend lets compute.py reuse its
            # RoPE tables and mask (H1's request). Only the full layers keep k itself
            q, k, v = qkv(self.w, layer, hidden, active, own_k=layer_index < self.check_layer)
            if layer_index < self.check_layer:  # every row fresh: these layers are a full prefill
                keys.append(k)
                values.append(v)
                hidden = finish_layer(self.w, layer, hidden, attend(q, k, v, pos, pos, causal_all_rows=True))
                continue
            stream = late.start()
            t_wait = time.perf_counter()
            k_all, v_all = self._cached_kv(parts, stream, layer_index, n, pos, moves)
            timings["load_wait_s"] = timings.get("load_wait_s", 0.0) + time.perf_counter() - t_wait
            if layer_index == self.check_layer:
                chosen = sel.select((k, v), (k_all, v_all), spans, n, forced, q, widen=1.0 if narrowed else self.gradual)
                q, k, v, hidden = q[chosen], k[chosen], v[chosen], hidden[chosen]
                active = chosen
                tail = is_tail(chosen, pos)  # once per blend: a reused prefix and the rest computed
            elif not narrowed and layer_index == self.check_layer + 1:  # gradual filtering: narrow once
                covered_rows = torch.zeros(n, dtype=torch.bool, device=pos.device)
                for p in parts:
                    covered_rows[p.start:p.end] = True
                k_merged = k_all.clone()
                k_merged[active] = k
                kept = sel.narrow((k, v), (k_all[active], v_all[active]), q, active, covered_rows, k_merged, spans)
                q, k, v, hidden, active = q[kept], k[kept], v[kept], hidden[kept], active[kept]
                tail = is_tail(active, pos)
            k_all[active] = k
            v_all[active] = v
            keys.append(k_all)
            values.append(v_all)
            hidden = finish_layer(self.w, layer, hidden, attend(q, k_all, v_all, active, pos, tail_rows=tail, sorted_rows=True))
            if (layer_index == self.check_layer + (0 if narrowed else 1) and not tail and self.cuda_graphs
                    and graphs.wanted(self.w, n, int(active.shape[0]), layer_index + 1)):
                captured = graphs.layer_graphs(self.w, n, int(active.shape[0]), layer_index + 1)
                if captured is not None:  # the rows are final: the later layers replay graphs
                    hidden = self._replay_layers(captured, parts, stream, hidden, active, moves, keys, values, timings)
                    break
        covered = sum(p.end - p.start for p in parts)
        in_chunks = int(sum(((active >= p.start) & (active < p.end)).sum() for p in parts)) if parts else 0
        return BlendResult(keys, values, logits_of(self.w, hidden[-1]), [(p.start, p.end) for p in parts],
                           covered - in_chunks, active, [])
