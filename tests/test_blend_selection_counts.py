"""The deviation selector counts covered rows from the spans (no count read back from a GPU): the covered
rows it recomputes are exactly the ratio's budget, with sink tokens and a chunk that ends the prompt (whose
last row is always recomputed) counted inside it; the question's attention from a slice of q equals the
boolean-indexed one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockstore
from blockstore.blend import Blender, ChunkKVStore, LlamaConfig, LlamaWeights
from blockstore.blend.blender import _query_attention

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=5, std=0.2)


@pytest.mark.parametrize("sinks", [0, 2, 5])
@pytest.mark.parametrize("spans", [[(0, 30), (31, 60)], [(0, 30), (30, 64)], [(2, 20), (25, 61), (61, 64)]])
@pytest.mark.parametrize("query_weighted", [False, True])
def test_recomputed_covered_rows_are_the_budget(weights: LlamaWeights, tmp_path: Path, sinks: int,
                                                spans: list[tuple[int, int]], query_weighted: bool) -> None:
    prompt = torch.randint(0, 127, (64,), generator=torch.Generator().manual_seed(sinks))
    with blockstore.open(tmp_path / "s") as store:
        blender = Blender(weights, ChunkKVStore(store, model_id=weights.model_id), ratio=0.3, sink_tokens=sinks,
                          deviation="kv", query_weighted=query_weighted)
        blender.blend(prompt, spans=spans)  # stores the chunks
        got = blender.blend(prompt, spans=spans).recomputed.tolist()
    covered = {r for s, e in spans for r in range(s, e)}
    budget = round(0.3 * len(covered))
    assert sum(r in covered for r in got) == budget
    assert set(range(64)) - covered <= set(got) and 63 in got  # every uncovered row and the last row
    per_chunk = min(sinks, budget // len(spans))
    assert all(r in got for s, e in spans for r in range(s, min(e, s + per_chunk)))


def test_question_attention_from_a_slice_equals_the_indexed_one() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(40, 4, 8, generator=g), torch.randn(40, 2, 8, generator=g)
    covered = torch.zeros(40, dtype=torch.bool)
    covered[3:31] = True
    assert torch.equal(_query_attention(q, k, covered, after=31), _query_attention(q, k, covered))
