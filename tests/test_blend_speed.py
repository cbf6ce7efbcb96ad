"""The blend's fast paths (issue 15, GPU speed) give what the plain computations give: grouped-query
attention by folding query heads into rows, fused projections, RoPE tables and masks made once per
positions tensor, and the layer loader reading each chunk's token ids and positions once. CPU only;
timings are the benchmark's (bench/blend.py), never asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blockstore
from blockstore.blend import ChunkKVStore, LayerStream, LlamaConfig, LlamaWeights, compute, full_prefill
from blockstore.blend.compute import apply_rope, attend, position_mask, qkv, rms_norm, rope_cos_sin, rotate

CFG = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=3, std=0.2)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                         k_pos: torch.Tensor) -> torch.Tensor:
    """Every query head against its KV head copied out (repeat_interleave), softmax written out."""
    group = q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kh) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~position_mask(q_pos, k_pos)[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vh).reshape(q.shape[0], -1)


@pytest.mark.parametrize("block", [512, 3])  # 3: the query rows split over several calls on the CPU
def test_folded_grouped_query_attention_equals_one_kv_copy_per_head(monkeypatch: pytest.MonkeyPatch,
                                                                     block: int) -> None:
    monkeypatch.setattr(compute, "CPU_QUERY_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    n = 20
    q, k, v = (torch.randn(n, h, 8, generator=g) for h in (6, 2, 2))
    pos = torch.arange(n)
    rows = torch.tensor([0, 3, 4, 9, 15, 19])  # scattered: neither a prefix nor a tail
    got = attend(q[rows], k, v, pos[rows], pos)
    torch.testing.assert_close(got, _reference_attention(q[rows], k, v, pos[rows], pos), atol=1e-5, rtol=1e-5)
    # and the causal path over all rows agrees with the same reference
    torch.testing.assert_close(attend(q, k, v, pos, pos, causal_all_rows=True),
                               _reference_attention(q, k, v, pos, pos), atol=1e-5, rtol=1e-5)
    # heads really are paired with their own KV head: swapping the KV heads changes the answer
    assert (attend(q[rows], k.flip(1), v.flip(1), pos[rows], pos) - got).abs().max() > 1e-2


def test_fused_projections_are_views_and_give_the_separate_products(weights: LlamaWeights) -> None:
    layer = weights.layers[1]
    assert layer.q_proj.data_ptr() == layer.qk_proj.data_ptr()  # views: no second copy of the weights
    assert layer.k_proj.data_ptr() == layer.qk_proj[CFG.num_attention_heads * CFG.head_dim:].data_ptr()
    assert layer.up_proj.data_ptr() == layer.gate_up_proj[CFG.intermediate_size:].data_ptr()
    hidden = torch.randn(7, CFG.hidden_size)
    pos = torch.arange(5, 12)
    q, k, v = qkv(weights, layer, hidden, pos)
    x = rms_norm(hidden, layer.input_norm, CFG.rms_norm_eps)
    want_q = apply_rope((x @ layer.q_proj.T).view(7, -1, CFG.head_dim), pos, CFG.rope_theta)
    want_k = apply_rope((x @ layer.k_proj.T).view(7, -1, CFG.head_dim), pos, CFG.rope_theta)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(v, (x @ layer.v_proj.T).view(7, -1, CFG.head_dim))
    # Llama's RMSNorm as Hugging Face writes it
    xf = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps)
    torch.testing.assert_close(x, layer.input_norm * xf)


def test_rotate_matches_rotate_half() -> None:
    x = torch.randn(5, 3, 8, dtype=torch.float64).to(torch.float32)
    cos, sin = rope_cos_sin(torch.tensor([-4, 0, 3, 17, 900]), 8, 10000.0)
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    torch.testing.assert_close(rotate(x, cos, sin), x * cos[:, None] + half * sin[:, None])


def test_rope_tables_follow_the_positions_tensor(weights: LlamaWeights) -> None:
    """Made once per positions tensor, but a changed or different tensor gets its own."""
    hidden = torch.randn(4, CFG.hidden_size)
    pos = torch.arange(4)
    first = qkv(weights, weights.layers[0], hidden, pos)[0]
    pos.add_(10)  # in place: the version counter moves, the old tables must not be used
    moved = qkv(weights, weights.layers[0], hidden, pos)[0]
    fresh = qkv(weights, weights.layers[0], hidden, torch.arange(10, 14))[0]
    torch.testing.assert_close(moved, fresh)
    assert (moved - first).abs().max() > 1e-3
    with torch.inference_mode():  # inference tensors keep no version counter: the object is the key
        a, b = torch.arange(4), torch.arange(4) + 3
        torch.testing.assert_close(qkv(weights, weights.layers[0], hidden, b)[0],
                                   qkv(weights, weights.layers[0], hidden, a + 3)[0])


def test_the_layer_loader_reads_token_ids_and_positions_once_and_layers_in_pieces(weights: LlamaWeights, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (5, 9)]
    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id=weights.model_id)
        cids = [kv.put(c, (r := full_prefill(weights, c)).keys, r.values, torch.arange(3, 3 + len(c)))
                for c in chunks]
        whole = kv.load_many(cids)
        keys_read: list[bytes] = []
        calls: list[int] = []
        real = store.read_located

        def counting(keys, locs, **kw):  # type: ignore[no-untyped-def]
            keys_read.extend(keys)
            calls.append(len(keys))
            return real(keys, locs, **kw)

        monkeypatch.setattr(store, "read_located", counting)
        monkeypatch.setattr(LayerStream, "PIECES", 2)  # two chunks: one read each
        stream = kv.stream_layers(cids, first_layer=1, readers=2)
        try:
            for layer in range(1, CFG.num_hidden_layers):
                for got, want in zip(stream.layer(layer), whole):
                    assert want is not None
                    assert torch.equal(got.keys[0], want.keys[layer]) and torch.equal(got.values[0], want.values[layer])
                    assert torch.equal(got.positions, want.positions) and torch.equal(got.token_ids, want.token_ids)
        finally:
            stream.close()
    metas = [k for k in keys_read if k.endswith(b"M")]
    assert sorted(metas) == sorted(kv.meta_key(c) for c in cids)  # each M record once, not once a layer
    assert len(keys_read) == len(cids) * (CFG.num_hidden_layers - 1) + len(cids)  # layer 0 never read
    # each layer is read in pieces (here one chunk each), so several threads share the next layer
    assert sorted(calls) == [1] * (len(cids) * (CFG.num_hidden_layers - 1)) + [len(cids)]


def test_blend_is_unchanged_by_the_fast_paths(weights: LlamaWeights) -> None:
    """A full prefill through the fused pieces equals one written out with the plain ops."""
    ids = torch.randint(0, CFG.vocab_size, (11,), generator=torch.Generator().manual_seed(2))
    got = full_prefill(weights, ids)
    hidden = weights.embed[ids]
    pos = torch.arange(11)
    for i, layer in enumerate(weights.layers):
        x = rms_norm(hidden, layer.input_norm, CFG.rms_norm_eps)
        q = apply_rope((x @ layer.q_proj.T).view(11, -1, CFG.head_dim), pos, CFG.rope_theta)
        k = apply_rope((x @ layer.k_proj.T).view(11, -1, CFG.head_dim), pos, CFG.rope_theta)
        v = (x @ layer.v_proj.T).view(11, -1, CFG.head_dim)
        torch.testing.assert_close(got.keys[i], k, atol=1e-5, rtol=1e-5)
        h = hidden + _reference_attention(q, k, v, pos, pos) @ layer.o_proj.T
        y = rms_norm(h, layer.post_norm, CFG.rms_norm_eps)
        hidden = h + (F.silu(y @ layer.gate_proj.T) * (y @ layer.up_proj.T)) @ layer.down_proj.T
    want = (rms_norm(hidden[-1], weights.norm, CFG.rms_norm_eps) @ weights.lm_head.T).float()
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=1e-4)
