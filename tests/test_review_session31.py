"""Review (H73, session of 2026-12-07, fourth part): the blend path as a user meets it. Each test failed on
the HEAD it was written against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockstore
from blockstore.blend import Blender, ChunkKVStore, LlamaConfig, LlamaWeights, chunk_id, full_prefill

SEP = 127
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=7, std=0.2)


def _prompt(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.cat((c, torch.tensor([SEP]))) for c in chunks] + [torch.tensor([3, 4, 5, 6])])


@pytest.mark.parametrize("overlap", [True, False])
def test_a_prompt_that_repeats_a_stored_chunk_is_blended(weights: LlamaWeights, tmp_path: Path,
                                                         overlap: bool) -> None:
    """A prompt carrying the same chunk twice (a document quoted again, a tool output repeated): the chunk
    was located twice and its records put twice in each layer's one C call, which refuses a record read
    twice (InvalidArgument out of LayerReads.check): once the chunk was stored, every blend of such a
    prompt raised, and the connector made vLLM recompute it each time. A missing repeated chunk was also
    computed and stored once per span."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, SEP, (24,), generator=g) for _ in range(2))
    prompt = _prompt([a, b, a])
    ref = full_prefill(weights, prompt)
    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id=weights.model_id)
        blender = Blender(weights, kv, ratio=1.0, separator_ids=(SEP,), overlap=overlap)
        puts: list[int] = []
        kv_put = kv.put
        kv.put = lambda *a, **k: puts.append(1) or kv_put(*a, **k)  # type: ignore[method-assign]
        first = blender.blend(prompt)
        assert first.missing_chunks == [chunk_id(a), chunk_id(b), chunk_id(a)]  # per span, as before
        assert len(puts) == 2  # a computed and stored once
        second = blender.blend(prompt)  # every chunk stored: read, a once
        assert second.missing_chunks == []
        torch.testing.assert_close(second.logits, ref.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(first.logits, second.logits, atol=1e-4, rtol=1e-4)
        for layer in range(CFG.num_hidden_layers):
            torch.testing.assert_close(second.keys[layer], ref.keys[layer], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(second.values[layer], ref.values[layer], atol=1e-4, rtol=1e-4)
        # the stream alone, as a caller of ChunkKVStore meets it: each located chunk in order, repeats too
        stream = kv.stream_layers([chunk_id(a), chunk_id(b), chunk_id(a)], first_layer=1)
        try:
            got = stream.layer(2)
            assert [c.chunk_id for c in got] == [chunk_id(a), chunk_id(b), chunk_id(a)]
            assert torch.equal(got[0].keys[0], got[2].keys[0]) and not torch.equal(got[0].keys[0], got[1].keys[0])
            assert stream.layer_kv(2) is None  # no strided view can repeat a chunk
        finally:
            stream.close()
