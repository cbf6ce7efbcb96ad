"""Blended chunk KV (issue 15): chunk KV records in a Store and a CacheBlend-style blender over them.

    from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, chunk_id
    w = LlamaWeights.from_pretrained(model_dir)
    kv = ChunkKVStore(store, ns="kv-blend", model_id=Blender.kv_model_id(w))
    blender = Blender(w, kv, ratio=0.15, separator_ids=(sep,))
    res = blender.blend(prompt_ids)          # KV for every prompt token + last-token logits

A plugin like blockstore.compaction: it uses the engine's public API only and imports torch at
module level; the engine never imports it.
"""

from blockstore.blend.blender import DEFAULT_DEVIATION, DEFAULT_QUERY_WEIGHTED, SELECTORS, Blender, BlendResult
from blockstore.blend.chunk_kv import ChunkKV, ChunkKVStore, KVLayout, LayerStream, chunk_id
from blockstore.blend.compute import Prefill, full_prefill, greedy_decode
from blockstore.blend.llama import SHAPES, LlamaConfig, LlamaWeights

__all__ = [
    "DEFAULT_DEVIATION", "DEFAULT_QUERY_WEIGHTED", "SELECTORS", "SHAPES", "BlendResult", "Blender", "ChunkKV", "ChunkKVStore", "KVLayout", "LayerStream",
    "LlamaConfig", "LlamaWeights", "Prefill", "chunk_id", "full_prefill", "greedy_decode",
]
