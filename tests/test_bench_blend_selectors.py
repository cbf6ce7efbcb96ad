"""bench.blend_selectors compares selections at one budget: every scored selection forces exactly
round(ratio * covered) covered rows, as Selection.select recomputes (tests/test_blend_selection_counts.py),
and its scores at the check layer come from the same pieces as the blender's (kv-qw's score there ranks rows
as Selection.select without recency does)."""

from __future__ import annotations

import pytest
import torch

from bench.blend_selectors import SCORED, check_layer_scores, forced_rows
from blockstore.blend import LlamaConfig, LlamaWeights
from blockstore.blend.compute import attend, finish_layer, qkv
from blockstore.blend.selection import Selection

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.3, 0.9])
@pytest.mark.parametrize("spans", [[(1, 30), (30, 61)], [(1, 20), (21, 40), (41, 58)]])
def test_every_scored_selection_forces_the_budget(ratio: float, spans: list[tuple[int, int]]) -> None:
    n = 64
    covered = torch.zeros(n, dtype=torch.bool)
    for s, e in spans:
        covered[s:e] = True
    score = torch.rand(n, generator=torch.Generator().manual_seed(1))
    budget = round(ratio * int(covered.sum()))
    for name in SCORED:
        rows = forced_rows(name, score, covered, spans, ratio)
        assert int(covered[rows].sum()) == len(rows) == budget, name
        assert len(set(rows.tolist())) == len(rows), name


def test_the_default_score_ranks_as_the_blender_selects() -> None:
    w = LlamaWeights.random(CFG, seed=3, std=0.2)
    n, spans = 48, [(1, 20), (20, 40)]
    ids = torch.randint(0, 127, (n,), generator=torch.Generator().manual_seed(2))
    covered = torch.zeros(n, dtype=torch.bool)
    for s, e in spans:
        covered[s:e] = True
    g = torch.Generator().manual_seed(4)
    cached = (torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g))
    scores = check_layer_scores(w, ids, spans, covered, cached)
    pos = torch.arange(n)
    q0, k0, v0 = qkv(w, w.layers[0], w.embed[ids], pos)
    hidden = finish_layer(w, w.layers[0], w.embed[ids], attend(q0, k0, v0, pos, pos, causal_all_rows=True))
    q, k, v = qkv(w, w.layers[1], hidden, pos)
    chosen = Selection(0.3, recency=0.0).select((k, v), cached, spans, n, q=q)
    default = scores["sinks-1"].masked_fill(~covered, -1.0)
    top = torch.topk(default, round(0.3 * 39)).indices.tolist()
    assert sorted(chosen.tolist()) == sorted(set(top) | {0} | set(range(40, n)))  # + the rows no chunk covers
