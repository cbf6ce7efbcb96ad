"""Chunk KV records in 8 bits (kv_codec.py's "int8" format, Blender(kv_format="int8")): every element within
half a step of its row's scale, blends close to the model-format ones on every read path, the two formats
side by side in one store without seeing each other, and damaged or misfit records refused as before."""

from __future__ import annotations

import json

import pytest
import torch
from test_blend import CFG, SEP, _chunks, _prompt
from test_blend_speed_paths import _damage_layer_record

import blockstore
from blockstore import ChecksumMismatch
from blockstore.blend import (
    Blender,
    ChunkKVStore,
    KVLayout,
    LayerStream,
    LlamaWeights,
    chunk_id,
    full_prefill,
    kv_codec,
)
from blockstore.blend.blender import _one_buffer, _Span
from blockstore.errors import CorruptionError, InvalidArgument

STEP_EPS = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}  # rounding of the output


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=7, std=0.2)


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    with blockstore.open(tmp_path / "s") as s:
        yield s


def _blenders(weights: LlamaWeights, store: blockstore.Store, **opts: object) -> tuple[Blender, Blender]:
    """A blender of each format over one store, each on its own ChunkKVStore (Blender.kv_model_id)."""
    return tuple(Blender(weights, ChunkKVStore(store, model_id=Blender.kv_model_id(weights, kv_format=f)),  # type: ignore[return-value]
                         separator_ids=(SEP,), kv_format=f, **opts) for f in ("model", "int8"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_within_half_a_step(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(9, 2, 16, generator=g) * torch.logspace(-3, 3, 9).view(9, 1, 1)).to(dtype)
    v = torch.randn(9, 2, 16, generator=g).to(dtype)
    k[2, 1] = 0.0  # a row of zeros
    v[4, 0] = -3.25  # a row of one value
    layout = KVLayout(1, 2, 16, str(dtype).removeprefix("torch."), "int8")
    raw = kv_codec.encode(k, v, layout)
    assert raw.dtype == "uint8" and raw.size == layout.layer_bytes(9) == 9 * 2 * (2 * 16 + 8)
    got_k, got_v = kv_codec.decode(torch.from_numpy(raw.copy()), 9, layout)
    assert got_k.dtype == got_v.dtype == dtype
    for x, y in ((k, got_k), (v, got_v)):
        x, y = x.float(), y.float()
        scale = x.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((x - y).abs() <= scale / 2 + x.abs() * STEP_EPS[dtype] + 1e-30).all())
    assert bool((got_k[2, 1] == 0).all()) and torch.allclose(got_v[4, 0].float(), torch.full((16,), -3.25))


def test_byte_counts_of_the_8b_shape() -> None:
    bf16 = KVLayout(32, 8, 128, "bfloat16")
    assert bf16.layer_bytes(1) == 4096 and KVLayout(32, 8, 128, "bfloat16", "int8").layer_bytes(1) == 2112
    assert bf16.meta() == {"layers": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}  # records as before


@pytest.mark.parametrize("overlap", [True, False])
def test_int8_blend_is_close_to_the_model_format_blend(weights: LlamaWeights, store: blockstore.Store,
                                                       overlap: bool) -> None:
    """Both read paths (layer by layer, the C or Python loader with its one-buffer views after the check
    layer; one batched read) decode int8 records; the blend picks the same rows and its logits are far
    closer to the model-format blend's than that blend is to a full prefill."""
    full, small = _blenders(weights, store, overlap=overlap)
    prompt = _prompt(_chunks(3, seed=3))
    for b in (full, small):
        assert len(b.blend(prompt).missing_chunks) == 3  # computed and stored
    ref, got = full.blend(prompt), small.blend(prompt)
    assert got.missing_chunks == [] and torch.equal(got.recomputed, ref.recomputed)
    off = (got.logits - ref.logits).abs().max().item()
    assert 0 < off < 0.05 * (ref.logits - full.prefill(prompt).logits).abs().max().item()
    assert all(k.dtype == torch.float32 for k in got.keys)


@pytest.mark.parametrize("pieces", [1, 2])  # 1: the C readers (layer_loader.py); 2: the Python readers
def test_every_read_path_decodes_the_same(weights: LlamaWeights, store: blockstore.Store, pieces: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LayerStream, "PIECES", pieces)
    _, small = _blenders(weights, store)
    chunks = _chunks(3, seed=5)
    cids = [small.store_chunk(c) for c in chunks]
    loaded = small.kv.load_many(cids)
    stream = small.kv.stream_layers(cids, first_layer=1)
    try:
        for layer in range(1, CFG.num_hidden_layers):
            views = stream.layer_kv(layer)
            assert views is not None
            for i, (got, chunk) in enumerate(zip(stream.layer(layer), loaded)):
                assert chunk is not None
                assert torch.equal(got.keys[0], chunk.keys[layer]) and torch.equal(got.values[0], chunk.values[layer])
                assert torch.equal(views[0][i], chunk.keys[layer]) and torch.equal(views[1][i], chunk.values[layer])
    finally:
        stream.close()
    # load_many decodes a layer of every chunk in one op: the chunks' KV is one buffer, as the model format's views
    spans = [_Span(0, 24, c) for c in cids]
    assert all(_one_buffer([(s, c, layer) for s, c in zip(spans, loaded)]) is not None for layer in range(4))  # type: ignore[misc]
    prompt = _prompt(chunks)
    hot = small.blend(prompt, resident=dict(zip(cids, loaded)))  # type: ignore[arg-type]
    assert hot.missing_chunks == [] and torch.equal(hot.logits, small.blend(prompt).logits)
    ref = full_prefill(weights, torch.cat((torch.tensor(small.chunk_prefix, dtype=torch.int64), chunks[0])))
    assert loaded[0] is not None and not torch.equal(loaded[0].keys[2], ref.keys[2])  # quantized: not the bytes
    torch.testing.assert_close(loaded[0].keys[2], ref.keys[2], atol=ref.keys[2].abs().max().item() / 127, rtol=0)


def test_two_formats_in_one_store_never_meet(weights: LlamaWeights, store: blockstore.Store) -> None:
    full, small = _blenders(weights, store)
    prompt = _prompt(_chunks(2, seed=6))
    assert len(full.blend(prompt).missing_chunks) == 2
    assert len(small.blend(prompt).missing_chunks) == 2  # the model format's records are not its own
    assert full.blend(prompt).missing_chunks == [] and small.blend(prompt).missing_chunks == []
    cid = chunk_id(_chunks(2, seed=6)[0])
    (m_full,), (m_small,) = (store.locate_many([b.kv.meta_key(cid)], ns="kv-blend") for b in (full, small))
    assert "kv_format" not in json.loads(m_full.meta) and json.loads(m_small.meta)["kv_format"] == "int8"
    sizes = [store.locate_many([b.kv.layer_key(cid, 0)], ns="kv-blend")[0].payload_len for b in (full, small)]
    assert sizes == [24 * 2 * 16 * 2 * 4, 24 * 2 * (2 * 16 + 8)]
    with pytest.raises(InvalidArgument, match="chunk KV store is for"):  # an int8 blender on the model format's store
        Blender(weights, ChunkKVStore(store, model_id=Blender.kv_model_id(weights)), kv_format="int8")
    with pytest.raises(InvalidArgument, match="kv_format must be one of"):
        Blender(weights, small.kv, kv_format="fp8")


def test_misfit_and_damaged_int8_records_are_refused_and_recomputed(weights: LlamaWeights,
                                                                   store: blockstore.Store) -> None:
    _, small = _blenders(weights, store)
    chunks = _chunks(2, seed=8)
    prompt = _prompt(chunks)
    cids = [small.store_chunk(c) for c in chunks]
    clean = small.blend(prompt)
    # a layer record of the model format's size under an int8 chunk's key (a record misread as the other format)
    store.put(small.kv.layer_key(cids[0], 1), b"\0" * (24 * 2 * 16 * 2 * 4), ns="kv-blend")
    with pytest.raises(CorruptionError, match="layer 1: 6144 bytes, expected 1920 .*kv_format='int8'"):
        small.kv.load_many([cids[0]])
    _damage_layer_record(store, small.kv, cids[1], 2)  # one flipped byte: its xxh3 no longer matches
    with pytest.raises(ChecksumMismatch):
        small.kv.load_many([cids[1]])
    got = small.blend(prompt)
    assert got.damaged_chunks == sorted(cids) and sorted(got.missing_chunks) == sorted(cids)
    again = small.blend(prompt)  # stored again, read back as int8
    assert again.damaged_chunks == [] and again.missing_chunks == []
    torch.testing.assert_close(again.logits, clean.logits)
