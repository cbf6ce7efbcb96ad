"""Chunk KV records: the per-layer KV of a chunk of tokens (a document, a memory item, a tool output),
computed once and reused at whatever position a later prompt puts the chunk.

A chunk is named by the hash of its token ids alone (`chunk_id`), so the same text has the same id
wherever it appears. Its records, all in one partition (the chunk id) so that they share a block:

    key  b"kvb1" + model tag (8) + chunk id (16) + b"L" + layer (u16 BE)
         payload: K then V of that layer (kv_codec.py: the payload's layout, its encoding and decoding)
    key  b"kvb1" + model tag (8) + chunk id (16) + b"M"
         payload: token ids then those positions (int32 LE each); record meta: JSON naming the model
         and the layout (layers, tokens, kv_heads, head_dim, dtype; "kv_format": "int8" for 8-bit
         records, absent for records in the model's dtype)

written in one put_many in layer order, the M record last: put_many may stop part-way leaving a
prefix, so an M record proves every layer record before it was written. The model tag keeps two
models' KV of the same tokens apart; the M record's model name is checked on every load too. A store
holds one format (its layout's kv_format); the model id of an 8-bit store says so (Blender.kv_model_id),
so records of the two formats have different keys, and a chunk stored in one is not found in the other.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from blockstore.blend import kv_codec, options
from blockstore.blend.kv_codec import DEFAULT_KV_FORMAT, DTYPES, KVLayout
from blockstore.blend.layer_loader import LayerLoader
from blockstore.blend.layer_reads import LayerReads
from blockstore.chunks import ChunkWrite
from blockstore.errors import BlockstoreError, CorruptionError, InvalidArgument
from blockstore.reader import aligned_buffer
from blockstore.store import Store

KEY_TAG = b"kvb1"
PAGE = 4096
FORMAT_VERSION = 1
# loader threads of a LayerStream: a page-cache copy (and its xxh3 check) runs at a few GB/s per core, so a GPU
# host's 8B-model KV (128 KiB a token) needs several in flight to keep up with its prefill.
# C readers (layer_loader.py: one C call a reader, no GIL until it returns): half the cores, 2 to 8. On an H100
# host (16 vCPUs, 2026-12-07, 4k tokens of the 8B shape, 5 repeats, ms) the loader alone took 29.3 [29.0-31.2]
# with 8 against 45.5 [44.8-46.1] with 4 (16: 32.7 [25.2-66.8]), and the warm blend 36.4 [35.8-47.1] against
# 39.4 [37.9-49.6]; 8k 83.8 vs 88.2 (ranges overlap). On a 2-core machine this is 2, as before.
DEFAULT_READERS = max(2, min(8, (os.cpu_count() or 2) // 2))
# Python readers (no bs_layer_read in the C core, BLOCKSTORE_BACKEND=python, PIECES > 1): their Python between
# C reads takes the GIL from the thread issuing the blend's GPU ops, and 4 beat 8 on 16-core H100 hosts (warm
# 4k blend 69 vs 76 ms, 8k 93 vs 121 ms)
PYTHON_READERS = max(2, min(4, (os.cpu_count() or 2) // 4))


def chunk_id(token_ids: Sequence[int] | torch.Tensor) -> bytes:
    """16 bytes: xxh3-128 of the token ids as int32 little-endian. Position-independent by design."""
    ids = token_ids.cpu().numpy() if isinstance(token_ids, torch.Tensor) else token_ids
    return xxhash.xxh3_128_digest(np.asarray(ids, dtype="<i4").tobytes())


@dataclass
class ChunkKV:
    """One chunk's KV as loaded: keys[l], values[l] [tokens, kv_heads, head_dim] on the load device
    (views of one buffer per load); K at `positions`."""

    chunk_id: bytes
    token_ids: torch.Tensor  # int32, CPU
    positions: torch.Tensor  # int64, on the load device
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class Located:
    """A chunk found in the directory: its layout and every record's location (layers, then M)."""

    chunk_id: bytes
    tokens: int
    layout: KVLayout
    keys: list[bytes]
    locs: list[Any]


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class ChunkKVStore:
    """Chunk KV records of one model in one namespace of a Store."""

    def __init__(self, store: Store, ns: str = "kv-blend", model_id: str = "", *,
                 layout: KVLayout | None = None) -> None:
        if not isinstance(model_id, str) or not model_id:
            raise InvalidArgument("ChunkKVStore needs the model_id its KV was computed with (a non-empty str)")
        self.store, self.ns, self.model_id, self.layout = store, ns, model_id, layout
        self._tag = KEY_TAG + xxhash.xxh3_64_digest(model_id.encode())

    def layer_key(self, cid: bytes, layer: int) -> bytes:
        return self._tag + cid + b"L" + struct.pack(">H", layer)

    def meta_key(self, cid: bytes) -> bytes:
        return self._tag + cid + b"M"

    # ------------------------------------------------------------------ writes

    def put(self, token_ids: Sequence[int] | torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
            positions: torch.Tensor | Sequence[int], *, text: str | None = None, user_id: str = "kv-blend",
            session_id: str = "chunks") -> bytes:
        """Store a chunk's KV (keys[l], values[l]: [tokens, kv_heads, head_dim], K after RoPE at
        `positions`) and return its chunk id. With `text`, a chunk record (user_id, session_id, the
        chunk id in hex) holds the text and links to the KV records through its kv_keys."""
        ids, pos = options.int32_ids("token_ids", token_ids), options.int32_ids("positions", positions)
        layout = self._check_put(ids, keys, values, pos)
        cid = chunk_id(ids)
        items: list[tuple[bytes, Any]] = []
        for layer, (k, v) in enumerate(zip(keys, values)):
            items.append((self.layer_key(cid, layer), kv_codec.encode(k, v, layout)))
        meta = {"v": FORMAT_VERSION, "model": self.model_id, "tokens": int(ids.shape[0]), **layout.meta()}
        items.append((self.meta_key(cid), ids.numpy().astype("<i4").tobytes() + pos.numpy().astype("<i4").tobytes()))
        metas = [b""] * (len(items) - 1) + [json.dumps(meta, separators=(",", ":")).encode()]
        self.store.put_many(items, ns=self.ns, metas=metas, partition=cid)
        if text is not None:
            self.store.put_chunks([ChunkWrite(user_id, session_id, cid.hex(), text, {"model": self.model_id},
                                              tuple(k for k, _ in items))], ns=self.ns)
        return cid

    def _check_put(self, ids: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                   pos: torch.Tensor) -> KVLayout:
        n = int(ids.shape[0])
        if ids.dim() != 1 or n == 0 or pos.shape != ids.shape:
            raise InvalidArgument(f"a chunk needs 1-d token ids and one position each (got {tuple(ids.shape)} ids, "
                                  f"{tuple(pos.shape)} positions)")
        if not keys or len(keys) != len(values):
            raise InvalidArgument(f"{len(keys)} key layers and {len(values)} value layers")
        shape = tuple(keys[0].shape)
        dtype = str(keys[0].dtype).removeprefix("torch.")
        if len(shape) != 3 or shape[0] != n or dtype not in DTYPES:
            raise InvalidArgument(f"keys[0] must be [{n}, kv_heads, head_dim] of {sorted(DTYPES)}, "
                                  f"not {list(shape)} {dtype}")
        for layer, (k, v) in enumerate(zip(keys, values)):
            if tuple(k.shape) != shape or tuple(v.shape) != shape or k.dtype != keys[0].dtype or v.dtype != k.dtype:
                raise InvalidArgument(f"layer {layer}: K {list(k.shape)} {k.dtype} and V {list(v.shape)} {v.dtype} "
                                      f"differ from layer 0's {list(shape)} {keys[0].dtype}")
        # the format this store's records hold (its layout's: Blender(kv_format=...) sets it), else the model's dtype
        layout = KVLayout(len(keys), shape[1], shape[2], dtype, self.layout.kv_format if self.layout else DEFAULT_KV_FORMAT)
        if self.layout is not None and layout != self.layout:
            raise InvalidArgument(f"chunk KV of layout {layout} does not fit this model's {self.layout}")
        return layout

    # ------------------------------------------------------------------ reads

    def contains(self, chunk_ids: Sequence[bytes]) -> list[bool]:
        return self.store.contains_many([self.meta_key(c) for c in options.chunk_ids("chunk_ids", chunk_ids)], ns=self.ns)

    def locate(self, chunk_ids: Sequence[bytes]) -> list[Located | None]:
        """One directory lookup for every record of every chunk; checks each M record's model and
        layout. None for a chunk not (or not completely) stored."""
        chunk_ids = options.chunk_ids("chunk_ids", chunk_ids)
        metas = self.store.locate_many([self.meta_key(c) for c in chunk_ids], ns=self.ns)
        meta_of = {c: loc for c, loc in zip(chunk_ids, metas) if loc is not None}
        found = [(c, self._parse_meta(c, loc)) for c, loc in meta_of.items()]
        layer_keys = [self.layer_key(c, i) for c, (layout, _) in found for i in range(layout.layers)]
        layer_locs = iter(self.store.locate_many(layer_keys, ns=self.ns))
        by_id: dict[bytes, Located | None] = {}
        for cid, (layout, tokens) in found:
            maybe = [next(layer_locs) for _ in range(layout.layers)]
            locs = [loc for loc in maybe if loc is not None]
            if len(locs) != layout.layers:  # a layer deleted since: the chunk is no longer whole
                by_id[cid] = None
                continue
            for i, loc in enumerate(locs):
                if loc.payload_len != layout.layer_bytes(tokens):
                    raise CorruptionError(f"chunk {cid.hex()} layer {i}: {loc.payload_len} bytes, "
                                          f"expected {layout.layer_bytes(tokens)} for {tokens} tokens of {layout}")
            keys = [self.layer_key(cid, i) for i in range(layout.layers)] + [self.meta_key(cid)]
            by_id[cid] = Located(cid, tokens, layout, keys, [*locs, meta_of[cid]])
        return [by_id.get(c) for c in chunk_ids]

    def _parse_meta(self, cid: bytes, loc: Any) -> tuple[KVLayout, int]:
        try:
            m = json.loads(loc.meta)
            layout = KVLayout.from_meta(m)
            tokens, model = int(m["tokens"]), m["model"]
            ok = m.get("v") == FORMAT_VERSION and layout.valid()
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"chunk {cid.hex()}: its M record is not a chunk KV record ({exc})") from exc
        if not ok or tokens <= 0 or loc.payload_len != 8 * tokens:
            raise InvalidArgument(f"chunk {cid.hex()}: its M record is not a version-{FORMAT_VERSION} chunk KV record")
        if model != self.model_id:
            raise InvalidArgument(f"chunk {cid.hex()} holds KV of model {model!r}, not {self.model_id!r}")
        if self.layout is not None and layout != self.layout:
            raise InvalidArgument(f"chunk {cid.hex()}: layout {layout} does not fit this model's {self.layout}")
        return layout, tokens

    def load_many(self, chunk_ids: Sequence[bytes], *, device: str | torch.device = "cpu") -> list[ChunkKV | None]:
        """Every layer of every chunk in ONE batched read (read_located after one lookup), straight into
        one page-aligned buffer (CPU) or one pinned buffer copied to the GPU in one transfer."""
        located = self.locate(chunk_ids)
        plan = [p for p in located if p is not None]
        if not plan:
            return [None] * len(chunk_ids)
        reader = _BufferPlan(plan, range(plan[0].layout.layers), device)
        reader.read(self.store, self.ns)
        loaded = {p.chunk_id: reader.chunk(p) for p in plan}
        return [loaded.get(c) if c is not None else None for c in chunk_ids]

    def stream_layers(self, chunk_ids: Sequence[bytes], *, device: str | torch.device = "cpu",
                      first_layer: int = 0, readers: int | None = None) -> LayerStream:
        """Start loading these chunks layer by layer, from `first_layer` on, on a loader thread (layer
        l + 1 is read while the caller computes layer l). Chunks not stored are None in `stream.located`."""
        return self.stream_located(self.locate(chunk_ids), device=device, first_layer=first_layer, readers=readers)

    def stream_located(self, located: list[Located | None], *, device: str | torch.device = "cpu",
                       first_layer: int = 0, readers: int | None = None) -> LayerStream:
        """`stream_layers` of chunks already located (`locate`): the lookup done earlier, the loading now."""
        return LayerStream(self, located, device, first_layer, readers)


class _BufferPlan:
    """Where each record of a set of layers lands: page-aligned slices of one host buffer (pinned
    when the destination is a GPU), and the tensors viewing them."""

    def __init__(self, plan: Sequence[Located], layers: range, device: str | torch.device) -> None:
        self.plan, self.layers, self.device = plan, layers, torch.device(device)
        self.keys: list[bytes] = []
        self.locs: list[Any] = []
        self.offsets: list[int] = []
        size = 0
        for p in plan:
            for i in list(layers) + [p.layout.layers]:  # layer records, then the M record
                self.keys.append(p.keys[i])
                self.locs.append(p.locs[i])
                self.offsets.append(size)
                size += _round_up(p.locs[i].payload_len)
        if self.device.type == "cuda":
            self.host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        else:
            self.host = torch.frombuffer(aligned_buffer(size), dtype=torch.uint8) if size else torch.empty(0)
        self.on_device = self.host
        self._decoded: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def read(self, store: Store, ns: str) -> None:
        raw = self.host.numpy()
        out = [raw[o : o + loc.payload_len].data for o, loc in zip(self.offsets, self.locs)]
        got = store.read_located(self.keys, self.locs, ns=ns, out=out)
        if any(n != loc.payload_len for n, loc in zip(got, self.locs)):  # deleted, or (looked up again) replaced
            raise BlockstoreError("a chunk KV record was deleted or replaced while it was being loaded")
        if self.device.type == "cuda":
            self.on_device = self.host.to(self.device, non_blocking=True)

    def _view(self, index: int, device_side: bool = True) -> torch.Tensor:
        """Record `index`'s payload bytes (on the device, or in the host buffer)."""
        src = self.on_device if device_side else self.host
        return src[self.offsets[index] : self.offsets[index] + self.locs[index].payload_len]

    def _layers_at_once(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer, K and V [chunks, ...] of every chunk decoded in one op, for int8 records of chunks of equal
        tokens (equal strides): one buffer a layer, which the blender places in 4 ops (blender._one_buffer)."""
        first, per_chunk = self.plan[0], len(self.layers) + 1
        if first.layout.kv_format == DEFAULT_KV_FORMAT or any(p.tokens != first.tokens or p.layout != first.layout
                                                              for p in self.plan):
            return None
        if self._decoded is None:
            stride = self.offsets[per_chunk] - self.offsets[0] if len(self.plan) > 1 else PAGE
            self._decoded = [kv_codec.decode_strided(self.on_device[self.offsets[j]:], len(self.plan), stride,
                                                     first.tokens, first.layout) for j in range(len(self.layers))]
        return self._decoded

    def chunk(self, p: Located) -> ChunkKV:
        per_chunk = len(self.layers) + 1
        index = self.plan.index(p)
        base = index * per_chunk
        at_once = self._layers_at_once()
        kvs = ([(k[index], v[index]) for k, v in at_once] if at_once is not None else
               [kv_codec.decode(self._view(base + j), p.tokens, p.layout) for j in range(len(self.layers))])
        ids_pos = self._view(base + len(self.layers), device_side=False).view(torch.int32).view(2, p.tokens)
        # non-blocking: a blocking copy on the default stream would wait for all GPU work queued before it
        return ChunkKV(p.chunk_id, ids_pos[0].clone(), ids_pos[1].to(torch.int64).to(self.device, non_blocking=True),
                       [kv[0] for kv in kvs], [kv[1] for kv in kvs])


class LayerStream:
    """Chunk KV loaded one layer at a time by `readers` loader threads: `layer(l)` gives layer l's K and
    V of every located chunk. Reading layers l + 1 ... runs while the caller computes layer l, and
    several reads in flight use more than one core's memory copy bandwidth (warm) and the disk's queue
    depth (cold).

    Each layer is cut into up to PIECES groups of chunks, claimed in layer order, so the layer the
    caller waits for next is read by several threads at once (one thread per layer made the first
    layers arrive one whole layer's read after the start). On a CPU a piece lands in its layer's
    page-aligned buffer. On a GPU a reader reads its piece into its own pinned slot (reused: torch
    caches pinned blocks), copies it to the device on its own CUDA stream and waits for that copy, so a
    layer is ready for the caller only when its bytes are on the device: the caller never waits on the
    GPU for it. Token ids and positions (the M records) are read once.

    Where the C core has layer readers (`bs_layer_read`) and PIECES is 1, these Python readers are not
    used: `layer_loader.LayerLoader`'s readers run in C, into one host buffer of every layer."""

    # measured on two H100 hosts (bench.blend, blend_warm_pieces*; ms, 1 / 2 / 4 pieces): 4k warm blend
    # 60 / 63 / 72 and 52 / 67 / 91; 8k 86 / 80 / 98 and 103 / 96 / 91. More pieces mean more reader Python
    # between C reads, which the GIL takes from the thread issuing the GPU ops: one read a layer is best
    # at 4k and within noise at 8k
    PIECES = 1

    def __init__(self, kv: ChunkKVStore, located: list[Located | None], device: str | torch.device,
                 first_layer: int = 0, readers: int | None = None) -> None:
        self.located, readers = located, None if readers is None else options.count("readers", readers, 1)
        self.first_layer = options.count("first_layer", first_layer, 0)  # a negative one read records from the end
        self.load_s = 0.0  # from the start to the last layer in memory (on the device)
        self._t0 = time.perf_counter()
        found = [p for p in located if p is not None]  # a chunk the prompt repeats is read once: a layer's one
        by_id = {p.chunk_id: p for p in found}  # C call refuses a record read twice (InvalidArgument)
        self.plan, order = list(by_id.values()), {c: i for i, c in enumerate(by_id)}
        self._of_found = [order[p.chunk_id] for p in found]  # each located chunk's index in the plan
        self.layers = self.plan[0].layout.layers if self.plan else 0
        self.device = torch.device(device)
        self._ready = [threading.Event() for _ in range(self.layers)]
        self._loaded: list[torch.Tensor | None] = [None] * self.layers  # each layer's bytes, once read
        self._error: BaseException | None = None
        self._claim = threading.Lock()
        self._meta = self._read_meta(kv) if self.plan else []
        self._fast: LayerReads | None = None
        self._c: LayerLoader | None = None
        self._threads: list[threading.Thread] = []
        try:  # a failure here (the device buffer's allocation, a thread's start) lets go of what was taken
            # whole layers in one C call each (layer_reads.py); None: through read_located
            self._fast = LayerReads.open(kv.store, self.plan, range(first_layer, self.layers)) if self.plan else None
            # every layer's records have the same sizes: one set of page-aligned offsets serves them all
            self._lens = [p.locs[first_layer].payload_len for p in self.plan] if self.layers > first_layer else []
            self._offsets = [sum(_round_up(n) for n in self._lens[:i]) for i in range(len(self._lens) + 1)]
            # readers in C (layer_loader.py) where the C core has them; else Python readers, below
            in_c = self._fast is not None and self.PIECES == 1 and LayerLoader.wanted(self._fast)
            n = readers or (DEFAULT_READERS if in_c else PYTHON_READERS)
            self._c = (LayerLoader(self._fast, range(first_layer, self.layers), self._offsets, self._lens, self.device, n)
                       if in_c and self._fast is not None else None)
            cuda = self.device.type == "cuda" and bool(self._lens) and self._c is None
            self._device_buf = (torch.empty((self.layers - first_layer, self._offsets[-1]), dtype=torch.uint8,
                                            device=self.device) if cuda else None)
            self._alloc_stream = torch.cuda.current_stream(self.device) if cuda else None
            pieces = min(self.PIECES, len(self._lens)) if self._c is None else 0
            self._host: dict[int, torch.Tensor] = {}  # CPU: each layer's buffer, made by its first piece's reader
            groups = [(len(self._lens) * i // pieces, len(self._lens) * (i + 1) // pieces) for i in range(pieces)]
            self._items = [(layer, lo, hi) for layer in range(first_layer, self.layers) for lo, hi in groups if hi > lo]
            self._items.reverse()  # popped from the end: layer order
            self._pending = {layer: sum(1 for g in groups if g[1] > g[0]) for layer in range(first_layer, self.layers)}
            self._slot_bytes = max((self._offsets[hi] - self._offsets[lo] for lo, hi in groups), default=0)
            for i in range(max(1, min(n, len(self._items))) if self._items else 0):
                t = threading.Thread(target=self._run, args=(kv,), name=f"blend-loader-{i}", daemon=True)
                t.start()
                self._threads.append(t)  # started ones only: close() joins them
        except BaseException as exc:
            self._error = exc  # the Python readers started claim no more
            self.close()
            raise

    def _read_meta(self, kv: ChunkKVStore) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(token ids int32 on the CPU, positions int64 on the device) of every located chunk."""
        got = kv.store.read_located([p.keys[-1] for p in self.plan], [p.locs[-1] for p in self.plan], ns=kv.ns)
        out = []
        for p, raw in zip(self.plan, got):
            if raw is None or len(raw) != p.locs[-1].payload_len:  # deleted, or (looked up again) replaced
                raise BlockstoreError("a chunk KV record was deleted or replaced while it was being loaded")
            ids_pos = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(2, p.tokens)
            out.append((ids_pos[0], ids_pos[1].to(torch.int64).to(self.device, non_blocking=True)))
        return out

    def _claim_item(self) -> tuple[int, int, int] | None:
        with self._claim:
            if not self._items or self._error is not None:
                return None
            item = self._items.pop()
            if self._device_buf is None and item[0] not in self._host:
                self._host[item[0]] = torch.frombuffer(aligned_buffer(self._offsets[-1]), dtype=torch.uint8)
            return item

    def _chunks(self, raw: torch.Tensor) -> list[ChunkKV]:
        """ChunkKVs viewing one layer's bytes (`raw`, laid out by self._offsets), one per located chunk."""
        out = []
        for p, (ids, pos), off, n in zip(self.plan, self._meta, self._offsets, self._lens):
            k, v = kv_codec.decode(raw[off : off + n], p.tokens, p.layout)
            out.append(ChunkKV(p.chunk_id, ids, pos, [k], [v]))
        return out if len(out) == len(self._of_found) else [out[i] for i in self._of_found]

    def _piece_views(self, dst: torch.Tensor, lo: int, hi: int) -> list[memoryview]:
        """Where chunks lo..hi-1's records land in `dst`, laid out from chunk lo's offset."""
        raw, base = dst.numpy(), self._offsets[lo]
        return [raw[self._offsets[i] - base : self._offsets[i] - base + self._lens[i]].data for i in range(lo, hi)]

    def _read_piece(self, kv: ChunkKVStore, layer: int, lo: int, hi: int, dst: torch.Tensor,
                    out: list[memoryview] | None = None) -> None:
        """Records of chunks lo..hi-1 of this layer into `dst` (at `out`, its _piece_views if given)."""
        out = self._piece_views(dst, lo, hi) if out is None else out
        if self._fast is not None and hi - lo == len(self.plan):
            self._fast.read_layer(layer, out)
            return
        got = kv.store.read_located([p.keys[layer] for p in self.plan[lo:hi]],
                                    [p.locs[layer] for p in self.plan[lo:hi]], ns=kv.ns, out=out)
        if any(n != p.locs[layer].payload_len for n, p in zip(got, self.plan[lo:hi])):  # deleted, or replaced
            raise BlockstoreError("a chunk KV record was deleted or replaced while it was being loaded")

    def _piece_done(self, layer: int) -> None:
        """The layer is ready once its last piece is in: the caller gets views of its buffer."""
        with self._claim:
            self._pending[layer] -= 1
            if self._pending[layer]:
                return
            raw = self._host.pop(layer) if self._device_buf is None else self._device_buf[layer - self.first_layer]
        self._loaded[layer] = raw  # views of it are made by the caller: no Python here while it waits for the GIL
        self._ready[layer].set()
        self.load_s = max(self.load_s, time.perf_counter() - self._t0)

    def _run(self, kv: ChunkKVStore) -> None:
        # the device buffer was made under the caller's inference mode, which is per thread: writing
        # into it needs the same mode here
        with torch.inference_mode():
            self._load_pieces(kv)

    def _load_pieces(self, kv: ChunkKVStore) -> None:
        stream = torch.cuda.Stream(self.device) if self._device_buf is not None else None
        if stream is not None and self._alloc_stream is not None:  # the buffer's memory may still be read by
            stream.wait_stream(self._alloc_stream)  # work queued on the stream that allocated it
        slot = torch.empty(self._slot_bytes, dtype=torch.uint8, pin_memory=True) if stream is not None else None
        # the slot's views per piece, made once: each torch op or view made here holds the GIL that the
        # thread issuing the blend's GPU ops is waiting for
        views: dict[tuple[int, int], tuple[list[memoryview], torch.Tensor]] = {}
        try:
            while (item := self._claim_item()) is not None:
                layer, lo, hi = item
                if stream is None or slot is None or self._device_buf is None:  # CPU: straight into place
                    self._read_piece(kv, layer, lo, hi, self._host[layer][self._offsets[lo] :])
                    self._piece_done(layer)
                    continue
                size = self._offsets[hi] - self._offsets[lo]
                if (lo, hi) not in views:
                    views[lo, hi] = (self._piece_views(slot, lo, hi), slot[:size])
                out, part = views[lo, hi]
                self._read_piece(kv, layer, lo, hi, slot, out)
                dst = self._device_buf[layer - self.first_layer]
                with torch.cuda.stream(stream):
                    dst[self._offsets[lo] : self._offsets[lo] + size].copy_(part, non_blocking=True)
                stream.synchronize()  # on the device, and the slot free again (GIL released while waiting)
                self._piece_done(layer)
        except BaseException as exc:  # handed to the caller's next layer()
            self._error = exc
            for ev in self._ready:
                ev.set()
        finally:
            if stream is not None:
                stream.synchronize()  # no copy of ours may land after close() (the caller frees the buffer)

    def _raw(self, layer: int) -> torch.Tensor:
        if not self.first_layer <= layer < self.layers:  # a negative index would give another layer's bytes
            raise InvalidArgument(f"layer {layer} is not loaded by this stream (layers {self.first_layer}.."
                                  f"{self.layers - 1})")
        if self._c is not None:
            ready = self._c.layer(layer)
            if layer == self.layers - 1:  # the C readers publish no times: the last layer as the caller got it
                self.load_s = time.perf_counter() - self._t0
            return ready
        self._ready[layer].wait()
        got = self._loaded[layer]
        if got is None:
            raise self._error if self._error is not None else BlockstoreError("chunk KV loader stopped")
        return got

    def layer(self, layer: int) -> list[ChunkKV]:
        """The located chunks (in order, misses left out) with keys/values holding only this layer."""
        return self._chunks(self._raw(layer))

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's K and V of every located chunk (in order) as two [chunks, tokens, kv_heads,
        head_dim] views of its buffer, when the chunks hold equally many tokens (their records then lie
        at equal strides); else None (use `layer`). Two ops, where `layer` makes a few per chunk."""
        first = self.plan[0] if self.plan else None
        if first is None or any(p.tokens != first.tokens for p in self.plan) or len(self.plan) != len(self._of_found):
            return None  # unequal strides, or a chunk the prompt repeats (read once: no view lists it twice)
        # the page-rounded record size, the same for all
        return kv_codec.decode_strided(self._raw(layer), len(self.plan), self._offsets[1] - self._offsets[0],
                                       first.tokens, first.layout)

    def close(self) -> None:
        if self._c is not None:  # kept: its buffer goes with the stream, as the Python readers' layers do
            self._c.close()
        for t in self._threads:
            t.join()
        if self._fast is not None:
            self._fast.close()
            self._fast = None
