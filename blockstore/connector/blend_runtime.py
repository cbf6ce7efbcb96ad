"""What the blend connector holds on each side of vLLM: the worker's runtime (``BlendRuntime``: the store, its
one writer, the weights and the blender) and the scheduler's index of stored chunks (``ChunkIndex``);
re-exported by ``blend_connector``.

A module of its own because it is where the connector opens, scans and closes stores and builds the blender:
the connector uses what these hold (the blender, the chunk KV store, the set of ids) and never opens a store
itself, and each is built from ``BlendSettings`` alone, with no vLLM type, so either can be made and tested
without vLLM's connector machinery.
"""

from __future__ import annotations

import os

import torch

import blockstore
from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, chunk_id
from blockstore.blend.kv_codec import model_id_suffix
from blockstore.connector.blend_config import BlendSettings


def weights_model_id(settings: BlendSettings) -> str:
    """The model id chunk KV records are keyed under (``blend.model_id``, or the weights' content hash), with the
    suffix of ``blend.kv_format`` (as ``Blender.kv_model_id`` of the worker's float32 weights)."""
    if settings.model_id:
        return settings.model_id + model_id_suffix(settings.kv_format)
    weights = LlamaWeights.from_pretrained(settings.model_dir, device="cpu", dtype=torch.float32)
    return weights.model_id + model_id_suffix(settings.kv_format)


class BlendRuntime:
    """The worker's store (the one writer: its LOCK), weights and blender."""

    def __init__(self, settings: BlendSettings) -> None:
        self.settings = settings
        self.store = blockstore.open(settings.store_path)
        try:
            self.weights = LlamaWeights.from_pretrained(settings.model_dir, device="cpu", dtype=torch.float32,
                                                        model_id=settings.model_id)
            self.kv = ChunkKVStore(self.store, ns=settings.namespace,
                                   model_id=Blender.kv_model_id(self.weights, kv_format=settings.kv_format))
            # Spans are always given (blend_spans finds them, multi-token separators included), so the
            # blender's own single-token separator split is not used.
            self.blender = Blender(self.weights, self.kv, ratio=settings.ratio, selector=settings.selector,
                                   check_layer=settings.check_layer, deviation=settings.deviation,
                                   sink_tokens=settings.sink_tokens, query_weighted=settings.query_weighted,
                                   gradual=settings.gradual, recency=settings.recency, kv_format=settings.kv_format)
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()


class ChunkIndex:
    """The scheduler's set of stored chunk ids.

    vLLM runs the worker in another process than the scheduler, and the worker holds the store's one
    writer lock; a read-only open sees the store as it was when opened. So the scheduler reads the chunk
    ids once at start (a read-only open, one key scan of the namespace) and then learns each chunk the
    worker stores from the worker's per-step metadata (``BlendWorkerMetadata``). 16 bytes a chunk.
    """

    def __init__(self, settings: BlendSettings, model_id: str) -> None:
        self.ids: set[bytes] = set()
        if not os.path.isdir(settings.store_path) or not os.listdir(settings.store_path):
            return  # the worker creates it
        store = blockstore.open(settings.store_path, read_only=True, create=False)
        try:
            kv = ChunkKVStore(store, ns=settings.namespace, model_id=model_id)
            probe = kv.meta_key(chunk_id([0]))
            prefix, tail = probe[:-len(chunk_id([0])) - 1], probe[-1:]
            for key in store.iter_keys(ns=settings.namespace, prefix=prefix):
                if len(key) == len(probe) and key.endswith(tail):
                    self.ids.add(key[len(prefix):-1])
        finally:
            store.close()

    def contains(self, chunk_ids: list[bytes]) -> list[bool]:
        return [c in self.ids for c in chunk_ids]
