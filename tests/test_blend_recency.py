"""The deviation selector's distance weighting (Selection.recency, Blender's `recency`): the score is
divided by the token's distance to the question to that power, so of two tokens the nearer one can win
against a larger deviation further away; 0 turns it off; the option is checked like the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockstore
from blockstore.blend import Blender, ChunkKVStore, LlamaConfig, LlamaWeights
from blockstore.blend.selection import DEFAULT_RECENCY, Selection
from blockstore.errors import InvalidArgument


def _pick(recency: float) -> list[int]:
    n, spans = 20, [(0, 8), (8, 16)]  # the question: rows 16..19
    k = torch.zeros(n, 2, 4)
    v_fresh, v_cached = torch.zeros(n, 2, 4), torch.zeros(n, 2, 4)
    v_cached[2, 0, 0] = 1.5 ** 0.5  # squared deviation 1.5, 14 rows before the question
    v_cached[12, 0, 0] = 1.0  # squared deviation 1.0, 4 rows before it
    sel = Selection(1 / 16, deviation="v", query_weighted=False, recency=recency)  # a budget of one row
    rows = sel.select((k, v_fresh), (k, v_cached), spans, n).tolist()
    return [r for r in rows if r < 16]


def test_distance_to_the_question_weighs_the_deviation() -> None:
    assert _pick(0.0) == [2]  # deviation alone: the far row
    assert _pick(0.5) == [12]  # 1.5 / 14 ** 0.5 < 1.0 / 4 ** 0.5
    assert DEFAULT_RECENCY == 0.5 and Selection(0.15).recency == DEFAULT_RECENCY


@pytest.mark.parametrize("bad", [-0.5, 5.0, "0.5", True, float("nan")])
def test_recency_is_checked(tmp_path: Path, bad: object) -> None:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    w = LlamaWeights.random(cfg, seed=1)
    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id=w.model_id)
        with pytest.raises(InvalidArgument, match="recency"):
            Blender(w, kv, recency=bad)  # type: ignore[arg-type]
        assert Blender(w, kv).recency == DEFAULT_RECENCY and Blender(w, kv, recency=0).recency == 0.0
