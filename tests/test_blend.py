"""blockstore.blend: chunk KV records, the Llama forward, and the blender, on tiny random models (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blockstore
from bench.blend_fidelity import oracle_rows, oracle_scores
from blockstore import BlockstoreError, CorruptionError, InvalidArgument
from blockstore.blend import (
    Blender,
    ChunkKV,
    ChunkKVStore,
    LlamaConfig,
    LlamaWeights,
    chunk_id,
    full_prefill,
    greedy_decode,
)
from blockstore.blend.blender import _deviation, _query_attention
from blockstore.blend.compute import apply_rope, attend, position_mask, qkv

SEP = 127
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=7, std=0.2)  # std 0.2: tokens' KV differ visibly between contexts


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with blockstore.open(tmp_path / "s") as s:
        yield s


def _chunks(n: int, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SEP, (length,), generator=g) for _ in range(n)]


def _prompt(chunks: list[torch.Tensor], suffix: tuple[int, ...] = (3, 4, 5, 6)) -> torch.Tensor:
    parts = [torch.cat((c, torch.tensor([SEP]))) for c in chunks]
    return torch.cat([*parts, torch.tensor(suffix)])


def test_chunk_id_depends_on_the_tokens_only(weights: LlamaWeights, store: blockstore.Store) -> None:
    a, b = _chunks(2)
    assert chunk_id(a) == chunk_id(a.tolist()) == chunk_id(a.to(torch.int32))
    assert chunk_id(a) != chunk_id(b) and chunk_id(a) != chunk_id(a.flip(0)) and len(chunk_id(a)) == 16
    kv = ChunkKVStore(store, model_id=weights.model_id)
    blender = Blender(weights, kv, separator_ids=(SEP,))
    res_ab = blender.blend(_prompt([a, b]))  # a at position 0, then a at position 25: one record serves both
    res_ba = blender.blend(_prompt([b, a]))
    assert res_ab.missing_chunks == [chunk_id(a), chunk_id(b)] and res_ba.missing_chunks == []


def test_records_round_trip_in_one_partition_in_layer_order(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    ids = _chunks(1)[0]
    ref = full_prefill(weights, ids)
    cid = kv.put(ids, ref.keys, ref.values, torch.arange(len(ids)) + 5, text="some text")
    [got] = kv.load_many([cid])
    assert got is not None and torch.equal(got.token_ids, ids.to(torch.int32))
    assert torch.equal(got.positions, torch.arange(len(ids)) + 5)
    for layer in range(CFG.num_hidden_layers):
        assert torch.equal(got.keys[layer], ref.keys[layer]) and torch.equal(got.values[layer], ref.values[layer])
    keys = [kv.layer_key(cid, i) for i in range(CFG.num_hidden_layers)] + [kv.meta_key(cid)]
    locs = store.locate_many(keys, ns="kv-blend")
    assert len({loc.block_id for loc in locs}) == 1  # one block: one read covers the chunk
    assert [loc.offset for loc in locs] == sorted(loc.offset for loc in locs)  # layer order, M record last
    chunk = store.get_chunk("kv-blend", "chunks", cid.hex(), ns="kv-blend")
    assert chunk is not None and chunk.text == "some text" and chunk.kv_keys == tuple(keys)
    assert kv.contains([cid, b"\0" * 16]) == [True, False]
    assert kv.load_many([b"\0" * 16, cid])[0] is None


def test_layer_stream_gives_what_load_many_gives(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    cids = [kv.put(c, (r := full_prefill(weights, c)).keys, r.values, torch.arange(len(c))) for c in _chunks(3)]
    whole = kv.load_many(cids)
    stream = kv.stream_layers([cids[2], b"\1" * 16, cids[0]], first_layer=1)
    assert [loc is not None for loc in stream.located] == [True, False, True]
    for layer in range(1, CFG.num_hidden_layers):
        got = stream.layer(layer)
        for c, want in zip(got, (whole[2], whole[0])):
            assert want is not None and torch.equal(c.keys[0], want.keys[layer])
            assert torch.equal(c.values[0], want.values[layer])
    stream.close()


def test_rerotation_equals_computing_at_the_new_positions(weights: LlamaWeights) -> None:
    hidden = torch.randn(10, CFG.hidden_size)
    old, new = torch.arange(10), torch.arange(10) + 37
    _, k_old, _ = qkv(weights, weights.layers[1], hidden, old)
    _, k_new, _ = qkv(weights, weights.layers[1], hidden, new)
    moved = apply_rope(k_old, new - old, CFG.rope_theta)
    torch.testing.assert_close(moved, k_new, atol=1e-5, rtol=1e-5)
    assert (k_old - k_new).abs().max() > 0.1  # the positions do matter


def test_llama_forward_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (40,))
    with torch.no_grad():
        want = model(ids[None]).logits[0, -1]
    w = LlamaWeights.from_pretrained(str(tmp_path))
    got = full_prefill(w, ids)
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        hf_tokens = model.generate(ids[None], max_new_tokens=6, do_sample=False)[0, 40:].tolist()
    assert greedy_decode(w, got.keys, got.values, got.logits, 6) == hf_tokens


def test_ratio_one_is_a_full_prefill(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    prompt = _prompt(_chunks(3))
    Blender(weights, kv, separator_ids=(SEP,)).blend(prompt)  # stores the chunks
    res = Blender(weights, kv, ratio=1.0, separator_ids=(SEP,)).blend(prompt)
    ref = full_prefill(weights, prompt)
    assert res.missing_chunks == [] and res.reused_tokens == 0 and len(res.recomputed) == len(prompt)
    torch.testing.assert_close(res.logits, ref.logits, atol=1e-4, rtol=1e-4)
    for layer in range(CFG.num_hidden_layers):
        torch.testing.assert_close(res.keys[layer], ref.keys[layer], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(res.values[layer], ref.values[layer], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overlap", [False, True])
def test_ratio_zero_is_pure_reuse(weights: LlamaWeights, store: blockstore.Store, overlap: bool) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    chunks = _chunks(3)
    prompt = _prompt(chunks)
    blender = Blender(weights, kv, ratio=0.0, separator_ids=(SEP,), overlap=overlap)
    res = blender.blend(prompt)
    spans = blender.split(prompt)
    covered = torch.zeros(len(prompt), dtype=torch.bool)
    for s, e in spans:
        covered[s:e] = True
    assert torch.equal(res.recomputed, (~covered).nonzero().squeeze(1))  # the separators and the question
    assert res.reused_tokens == int(covered.sum())
    for layer in range(1, CFG.num_hidden_layers):  # after the check layer: the stored KV, moved
        for c, (s, e) in zip(chunks, spans):
            own = full_prefill(weights, c)
            torch.testing.assert_close(res.keys[layer][s:e], apply_rope(own.keys[layer], torch.full((e - s,), s),
                                                                       CFG.rope_theta), atol=1e-5, rtol=1e-5)
            assert torch.equal(res.values[layer][s:e], own.values[layer])
    full = full_prefill(weights, prompt)
    assert (res.logits - full.logits).abs().max() > 1e-3  # reuse across chunks is not exact ...
    prefix = Blender(weights, kv, ratio=0.0, check_layer=0).blend(prompt, spans=[spans[0]])
    torch.testing.assert_close(prefix.logits, full.logits, atol=1e-4, rtol=1e-4)  # ... a reused prefix is


def test_blending_recovers_most_of_the_gap(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    prompt = _prompt(_chunks(3))
    full = full_prefill(weights, prompt)
    err = {}
    for ratio in (0.0, 0.5):
        for selector in ("deviation", "epic"):
            res = Blender(weights, kv, ratio=ratio, selector=selector, separator_ids=(SEP,)).blend(prompt)
            err[ratio, selector] = float((F.log_softmax(res.logits, -1) - F.log_softmax(full.logits, -1)).abs().max())
            covered = sum(e - s for s, e in res.spans)
            assert res.reused_tokens == covered - round(ratio * covered) or selector == "epic"
    assert err[0.5, "deviation"] < err[0.0, "deviation"]


def test_explicit_mask_is_right_where_a_bottom_right_one_is_not() -> None:
    torch.manual_seed(0)
    n, rows = 12, torch.tensor([1, 5, 9])
    q, k, v = torch.randn(n, 2, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8)
    pos = torch.arange(n)
    full = attend(q, k, v, pos, pos, causal_all_rows=True)
    scattered = attend(q[rows], k, v, pos[rows], pos)
    torch.testing.assert_close(scattered, full[rows], atol=1e-5, rtol=1e-5)
    explicit = position_mask(pos[rows], pos)
    bottom_right = torch.ones(len(rows), n, dtype=torch.bool).tril(diagonal=n - len(rows))
    assert not torch.equal(explicit, bottom_right)
    wrong = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=bottom_right).transpose(0, 1).reshape(len(rows), -1)
    assert (wrong - full[rows]).abs().max() > 1e-2


def test_missing_chunks_are_computed_and_stored(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    chunks = _chunks(3, seed=5)
    blender = Blender(weights, kv, separator_ids=(SEP,))
    first = blender.blend(_prompt(chunks[:2]), store_missing=False)
    assert first.missing_chunks == [chunk_id(c) for c in chunks[:2]] and kv.contains(first.missing_chunks) == [False] * 2
    second = blender.blend(_prompt(chunks[:2]))
    assert second.missing_chunks == first.missing_chunks and kv.contains(second.missing_chunks) == [True] * 2
    third = blender.blend(_prompt([chunks[2], chunks[1], chunks[0]]))
    assert third.missing_chunks == [chunk_id(chunks[2])]
    torch.testing.assert_close(third.logits, blender.blend(_prompt([chunks[2], chunks[1], chunks[0]])).logits)
    resident = dict(zip(second.missing_chunks, kv.load_many(second.missing_chunks)))  # a hot tier: no read
    hot = blender.blend(_prompt([chunks[2], chunks[1], chunks[0]]), resident=resident)
    assert hot.missing_chunks == [] and torch.equal(hot.logits, third.logits)


def test_bad_records_and_arguments_are_refused(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    blender = Blender(weights, kv, separator_ids=(SEP,))  # sets kv.layout to the model's
    ids = _chunks(1)[0]
    ref = full_prefill(weights, ids)
    with pytest.raises(InvalidArgument, match="layout"):
        kv.put(ids, [k[:, :1] for k in ref.keys], [v[:, :1] for v in ref.values], torch.arange(len(ids)))
    with pytest.raises(InvalidArgument, match="position"):
        kv.put(ids, ref.keys, ref.values, torch.arange(3))
    cid = kv.put(ids, ref.keys, ref.values, torch.arange(len(ids)))
    # a record of another model under this model's key: refused, not used
    other = ChunkKVStore(store, model_id="another-model")
    [meta_loc] = store.locate_many([kv.meta_key(cid)], ns="kv-blend")
    foreign = json.loads(meta_loc.meta) | {"model": "another-model"}
    store.put(kv.meta_key(cid), store.get(kv.meta_key(cid), ns="kv-blend") or b"", ns="kv-blend",
              meta=json.dumps(foreign).encode())
    with pytest.raises(InvalidArgument, match="another-model"):
        kv.load_many([cid])
    assert other.load_many([cid]) == [None]  # its own key space holds nothing
    # a layer record of the wrong size
    kv.put(ids, ref.keys, ref.values, torch.arange(len(ids)))
    store.put(kv.layer_key(cid, 2), b"\0" * 64, ns="kv-blend")
    with pytest.raises(CorruptionError, match="layer 2"):
        kv.load_many([cid])
    assert blender.blend(_prompt([ids])).damaged_chunks == [cid]  # never used: recomputed, stored again
    assert kv.load_many([cid])[0] is not None
    for bad in (dict(ratio=1.5), dict(selector="random"), dict(check_layer=9)):
        with pytest.raises(InvalidArgument):
            Blender(weights, kv, **bad)  # type: ignore[arg-type]
    with pytest.raises(BlockstoreError):
        blender.blend(_prompt([ids]), spans=[(5, 3)])
    with pytest.raises(BlockstoreError):
        blender.blend([0, 1, 500])
    with pytest.raises(InvalidArgument, match="chunk KV store is for"):
        Blender(weights, ChunkKVStore(store, model_id="x"))


def test_chunks_computed_after_a_prefix_keep_only_their_own_rows(weights: LlamaWeights, store: blockstore.Store) -> None:
    with pytest.raises(InvalidArgument, match="chunk-prefix"):
        Blender(weights, ChunkKVStore(store, model_id=weights.model_id), chunk_prefix=(0,))
    kv = ChunkKVStore(store, model_id=Blender.kv_model_id(weights, (0,)))
    chunks = _chunks(2, seed=9)
    prompt = torch.cat((torch.tensor([0]), _prompt(chunks)))
    res = Blender(weights, kv, ratio=1.0, separator_ids=(SEP,), chunk_prefix=(0,)).blend(prompt, spans=[(1, 25), (26, 50)])
    torch.testing.assert_close(res.logits, full_prefill(weights, prompt).logits, atol=1e-4, rtol=1e-4)
    [got] = kv.load_many([chunk_id(chunks[0])])
    assert got is not None and torch.equal(got.positions, torch.arange(1, 25))
    with_prefix = full_prefill(weights, torch.cat((torch.tensor([0]), chunks[0])))
    assert torch.equal(got.keys[2], with_prefix.keys[2][1:])  # the chunk's rows, computed after <s>


def test_ratio_zero_with_kv_from_the_prompt_itself_is_exact(weights: LlamaWeights, store: blockstore.Store) -> None:
    # chunk KV computed in its original position and context (rows of this prompt's own full prefill):
    # re-rotation by zero, the merge and the position mask must give the full prefill back
    prompt = _prompt(_chunks(3))
    full = full_prefill(weights, prompt)
    blender = Blender(weights, ChunkKVStore(store, model_id=weights.model_id), ratio=0.0, separator_ids=(SEP,))
    spans = blender.split(prompt)
    resident = {chunk_id(prompt[s:e]): ChunkKV(chunk_id(prompt[s:e]), prompt[s:e].to(torch.int32), torch.arange(s, e),
                                               [k[s:e] for k in full.keys], [v[s:e] for v in full.values])
                for s, e in spans}
    res = blender.blend(prompt, resident=resident)
    assert res.missing_chunks == [] and res.reused_tokens == sum(e - s for s, e in spans)
    torch.testing.assert_close(res.logits, full.logits, atol=1e-4, rtol=1e-4)


def test_kv_deviation_sees_what_k_alone_misses() -> None:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, 2, 4, generator=g), torch.randn(6, 2, 4, generator=g) * 10  # V on a larger scale
    covered = torch.tensor([True] * 5 + [False])
    k_cached, v_cached = k.clone(), v.clone()
    k_cached[:3] += torch.tensor([0.3, 0.5, 0.3])[:, None, None]  # K moved on rows 0-2, most on 1
    v_cached[3] += 3.0  # V moved on row 3 only
    on_k, on_v, on_kv = (_deviation((k, v), (k_cached, v_cached), covered, on) for on in ("k", "v", "kv"))
    assert int(on_k.argmax()) == 1 and float(on_k[3]) == 0.0
    assert int(on_v.argmax()) == 3 and float(on_v[1]) == 0.0
    assert int(on_kv.argmax()) == 3 and float(on_kv[1]) > float(on_kv[0]) > 0.0
    # each term is scaled by its mean over the covered rows: scaling V by 100 changes nothing
    scaled = _deviation((k, v * 100), (k_cached, v_cached * 100), covered, "kv")
    torch.testing.assert_close(scaled, on_kv, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("deviation", ["v", "k", "kv"])
def test_sink_tokens_are_recomputed_inside_the_budget(weights: LlamaWeights, store: blockstore.Store,
                                                       deviation: str) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    prompt = _prompt(_chunks(3))
    plain = Blender(weights, kv, ratio=0.25, separator_ids=(SEP,), deviation=deviation).blend(prompt)
    sinks = Blender(weights, kv, ratio=0.25, separator_ids=(SEP,), deviation=deviation, sink_tokens=2).blend(prompt)
    covered = sum(e - s for s, e in sinks.spans)
    assert sinks.reused_tokens == plain.reused_tokens == covered - round(0.25 * covered)  # the same budget
    chosen = set(sinks.recomputed.tolist())
    assert all({s, s + 1} <= chosen for s, _ in sinks.spans)
    assert not all({s, s + 1} <= set(plain.recomputed.tolist()) for s, _ in plain.spans)  # not chosen anyway
    # sinks never take more than the budget: 1 token of budget over 3 chunks gives no sinks
    tiny = Blender(weights, kv, ratio=1 / covered, separator_ids=(SEP,), sink_tokens=4).blend(prompt)
    assert tiny.reused_tokens == covered - 1


def test_selection_options_are_checked(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    with pytest.raises(InvalidArgument, match="deviation"):
        Blender(weights, kv, deviation="q")
    with pytest.raises(InvalidArgument, match="sink_tokens"):
        Blender(weights, kv, sink_tokens=-1)
    with pytest.raises(InvalidArgument, match="check_layer"):
        Blender(weights, kv, check_layer=CFG.num_hidden_layers)


def test_rows_chosen_by_the_caller_are_the_ones_recomputed(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    prompt = _prompt(_chunks(3))
    blender = Blender(weights, kv, ratio=0.15, separator_ids=(SEP,))
    spans = blender.split(prompt)
    covered = torch.zeros(len(prompt), dtype=torch.bool)
    for s, e in spans:
        covered[s:e] = True
    always = set((~covered).nonzero().squeeze(1).tolist()) | {len(prompt) - 1}
    res = blender.blend(prompt, recompute=[30, 3, 55])  # any order; the ratio's budget does not apply
    assert res.recomputed.tolist() == sorted(always | {3, 30, 55})
    assert res.reused_tokens == int(covered.sum()) - 3
    everything = blender.blend(prompt, recompute=covered.nonzero().squeeze(1))
    torch.testing.assert_close(everything.logits, full_prefill(weights, prompt).logits, atol=1e-4, rtol=1e-4)
    nothing = blender.blend(prompt, recompute=[])
    assert torch.equal(nothing.logits, Blender(weights, kv, ratio=0.0, separator_ids=(SEP,)).blend(prompt).logits)
    for bad in ([len(prompt)], [-1], [[1, 2]]):
        with pytest.raises(InvalidArgument, match="recompute"):
            blender.blend(prompt, recompute=bad)


def test_query_attention_weighs_what_the_question_reads() -> None:
    q, k = torch.zeros(6, 2, 4), torch.zeros(6, 1, 4)  # 2 query heads sharing 1 KV head (GQA)
    k[2, 0, 0] = 8.0  # row 2's key lines up with the question's query
    q[4:, :, 0] = 1.0  # the question: rows 4-5, after the chunk rows 0-3
    covered = torch.tensor([True] * 4 + [False] * 2)
    att = _query_attention(q, k, covered)
    assert int(att[:4].argmax()) == 2 and float(att[2]) > 0.5
    torch.testing.assert_close(att.sum(), torch.tensor(1.0))
    q[:, :, 0] = 0.0
    q[5, :, 0] = 1.0
    k[5, 0, 0] = -8.0
    att = _query_attention(q, k, torch.tensor([True] * 6))  # no question rows: the last row asks
    assert float(att[5]) < float(att[0]) and int(att.argmax()) == 2


def test_query_weighted_selection_keeps_the_budget(weights: LlamaWeights, store: blockstore.Store) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    prompt = _prompt(_chunks(3))
    plain = Blender(weights, kv, ratio=0.25, separator_ids=(SEP,), query_weighted=False).blend(prompt)
    weighted = Blender(weights, kv, ratio=0.25, separator_ids=(SEP,), query_weighted=True).blend(prompt)
    covered = sum(e - s for s, e in weighted.spans)
    assert weighted.reused_tokens == plain.reused_tokens == covered - round(0.25 * covered)
    assert weighted.recomputed.tolist() != plain.recomputed.tolist()  # the question's attention moved the choice


@pytest.mark.parametrize("opts", [{}, {"query_weighted": True, "deviation": "kv"}])
def test_gradual_filtering_narrows_to_the_budget(weights: LlamaWeights, store: blockstore.Store,
                                                 opts: dict[str, object]) -> None:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    prompt = _prompt(_chunks(3))
    one = Blender(weights, kv, ratio=0.25, separator_ids=(SEP,), **opts).blend(prompt)  # type: ignore[arg-type]
    two = Blender(weights, kv, ratio=0.25, separator_ids=(SEP,), gradual=2.0, **opts).blend(prompt)  # type: ignore[arg-type]
    covered = sum(e - s for s, e in two.spans)
    assert two.reused_tokens == one.reused_tokens == covered - round(0.25 * covered)  # the same budget at the end
    wide = Blender(weights, kv, ratio=0.5, separator_ids=(SEP,), **opts).blend(prompt)  # type: ignore[arg-type]
    # the check layer (1) recomputed twice the budget, as ratio 0.5 does; the next layer kept half of them
    assert torch.equal(two.keys[1], wide.keys[1]) and torch.equal(two.values[1], wide.values[1])
    assert not torch.equal(two.keys[2], wide.keys[2])
    assert set(two.recomputed.tolist()) < set(wide.recomputed.tolist())
    with pytest.raises(InvalidArgument, match="gradual"):
        Blender(weights, kv, gradual=0.5)


def test_oracle_picks_the_rows_whose_kv_is_off(weights: LlamaWeights) -> None:
    n, layers = 10, 3
    ref = ([torch.zeros(n, 2, 4) for _ in range(layers)], [torch.zeros(n, 2, 4) for _ in range(layers)])
    reuse = ([t.clone() for t in ref[0]], [t.clone() for t in ref[1]])
    covered = torch.tensor([True] * 8 + [False] * 2)
    reuse[1][2][5] += 1.0  # V of row 5 is off in the last layer
    reuse[0][0][1] += 9.0  # K of row 1 is off in layer 0 only: before first_layer, not counted
    reuse[0][2][7] += 0.1  # K of row 7 is off a little
    score = oracle_scores(ref, reuse, covered, first_layer=1)
    assert int(score.argmax()) == 5 and float(score[1]) == 0.0 and float(score[7]) > 0.0
    assert sorted(oracle_rows(score, covered, 0.25).tolist()) == [5, 7]  # round(0.25 * 8) = 2 rows
    assert oracle_rows(score, covered, 0.0).numel() == 0
    attention = [torch.zeros(n) for _ in range(layers)]
    attention[2][7] = 1.0  # the last token reads only row 7
    assert int(oracle_scores(ref, reuse, covered, 1, attention).argmax()) == 7


def test_one_checkpoint_in_two_dtypes_keeps_two_sets_of_chunk_kv(weights: LlamaWeights, store: blockstore.Store) -> None:
    """The same weights as float32 and as bfloat16 (model_id is the checkpoint's) blend the same chunks side by
    side: each dtype's KV under its own id. One id for both made each refuse the other's stored chunks
    (InvalidArgument) on every blend, and a stored chunk is never computed again."""
    half = LlamaWeights.random(CFG, seed=7, std=0.2, dtype=torch.bfloat16)
    assert half.model_id == weights.model_id and Blender.kv_model_id(half) != Blender.kv_model_id(weights)
    chunks = _chunks(2, seed=4)
    prompt = _prompt(chunks)
    full = Blender(weights, ChunkKVStore(store, model_id=Blender.kv_model_id(weights)), separator_ids=(SEP,))
    full.blend(prompt)  # stores both chunks as float32
    kv_half = ChunkKVStore(store, model_id=Blender.kv_model_id(half))
    res = Blender(half, kv_half, separator_ids=(SEP,)).blend(prompt)
    assert res.missing_chunks and all(got is not None and got.keys[0].dtype == torch.bfloat16
                                      for got in kv_half.load_many([chunk_id(c) for c in chunks]))
    again = Blender(half, kv_half, separator_ids=(SEP,)).blend(prompt)
    assert not again.missing_chunks  # its own chunks, reused
    assert not full.blend(prompt).missing_chunks  # and float32's still there


def test_chunk_kv_put_refuses_token_ids_and_positions_it_would_change(weights: LlamaWeights, store: blockstore.Store) -> None:
    """Float token ids were truncated (1.7 stored as 1: another chunk's id) and positions past int32 wrapped
    to negative ones, without a word; now InvalidArgument naming the argument. An empty chunk keeps its own message."""
    kv = ChunkKVStore(store, model_id=Blender.kv_model_id(weights))
    ids = _chunks(1, seed=2)[0]
    ref = full_prefill(weights, ids)
    pos = torch.arange(len(ids))
    with pytest.raises(InvalidArgument, match="token_ids must be integers"):
        kv.put(ids.double() + 0.7, ref.keys, ref.values, pos)
    with pytest.raises(InvalidArgument, match="positions must be integers within int32"):
        kv.put(ids, ref.keys, ref.values, pos + 2**31)
    with pytest.raises(InvalidArgument, match="token_ids must be integers"):
        kv.put([True] * len(ids), ref.keys, ref.values, pos)
    with pytest.raises(InvalidArgument, match="1-d token ids"):
        kv.put([], ref.keys, ref.values, [])
    cid = kv.put(ids.numpy(), ref.keys, ref.values, pos.tolist())  # ints in any container still do
    assert cid == chunk_id(ids)
