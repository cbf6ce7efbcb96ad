"""blockstore.blend.graphs: the padded, static-buffer layers the CUDA graphs capture, run eagerly on a CPU
(graphs.usable forced on): the same rows, logits and KV as the eager blend, padding that changes
nothing, buckets reused without touching an earlier blend's result. The capture itself needs a GPU
(bench.blend_ab compares both paths there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockstore
from blockstore.blend import Blender, ChunkKVStore, LlamaConfig, LlamaWeights, graphs

SEP = 127
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=3, std=0.2)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with blockstore.open(tmp_path / "s") as s:
        yield s


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph path on a CPU: buffers and padding as on a GPU, each layer called instead of replayed."""
    monkeypatch.setattr(graphs, "usable", lambda device: True)
    monkeypatch.setattr(graphs, "CAPTURE_AFTER", 1)


def _prompt(seed: int, chunks: int = 3, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.cat((torch.randint(0, SEP, (length,), generator=g), torch.tensor([SEP]))) for _ in range(chunks)]
    return torch.cat([*parts, torch.tensor([3, 4, 5, 6, 7])])


def _blenders(weights: LlamaWeights, store: blockstore.Store, **kw: object) -> tuple[Blender, Blender]:
    kv = ChunkKVStore(store, model_id=weights.model_id)
    return (Blender(weights, kv, separator_ids=(SEP,), cuda_graphs=True, **kw),  # type: ignore[arg-type]
            Blender(weights, kv, separator_ids=(SEP,), cuda_graphs=False, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{}, {"deviation": "v", "query_weighted": False}, {"gradual": 2.0},
                                {"check_layer": 2, "overlap": False}])
def test_padded_layers_give_the_eager_blend(weights: LlamaWeights, store: blockstore.Store, forced: None,
                                            kw: dict[str, object]) -> None:
    with_graphs, eager = _blenders(weights, store, **kw)
    prompt = _prompt(0)
    eager.blend(prompt)  # stores the chunks
    ref, got = eager.blend(prompt), with_graphs.blend(prompt)
    assert torch.equal(got.recomputed, ref.recomputed)
    n, rows = prompt.shape[0], got.recomputed.shape[0]
    buckets = list(weights.graph_buckets.values())
    assert len(buckets) == 1 and buckets[0].replays == 1
    bucket = buckets[0]
    assert bucket.keys > n and bucket.rows > rows  # padding rows and spare keys were really there
    assert len(got.keys) == len(ref.keys) == CFG.num_hidden_layers
    for k, r in zip(got.keys + got.values, ref.keys + ref.values):
        assert k.shape == r.shape and k.is_contiguous()
        torch.testing.assert_close(k, r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)


def test_a_bucket_is_reused_and_an_earlier_result_is_not_overwritten(weights: LlamaWeights, store: blockstore.Store,
                                                                     forced: None) -> None:
    with_graphs, eager = _blenders(weights, store)
    first, second = _prompt(1), _prompt(2)
    eager.blend(first)
    eager.blend(second)
    a = with_graphs.blend(first)
    kept = [k.clone() for k in a.keys]
    b = with_graphs.blend(second)
    assert graphs.bucket_of(first.shape[0], a.recomputed.shape[0]) == graphs.bucket_of(
        second.shape[0], b.recomputed.shape[0])
    assert len(weights.graph_buckets) == 1 and next(iter(weights.graph_buckets.values())).replays == 2
    assert "graph_capture_s" in a.timings and "graph_capture_s" not in b.timings
    assert all(torch.equal(k, c) for k, c in zip(a.keys, kept))  # b's blend wrote its own copies
    torch.testing.assert_close(b.logits, eager.blend(second).logits, rtol=1e-4, atol=1e-4)


def test_buckets_are_bounded_and_the_cpu_path_never_captures(weights: LlamaWeights, store: blockstore.Store,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with_graphs, _ = _blenders(weights, store)
    with_graphs.blend(_prompt(0))
    assert not weights.graph_buckets and not graphs.usable(weights.device)  # CPU: graphs off, nothing kept
    monkeypatch.setattr(graphs, "usable", lambda device: True)
    monkeypatch.setattr(graphs, "CAPTURE_AFTER", 1)
    monkeypatch.setattr(graphs, "CACHED_BUCKETS", 2)
    for length in (30, 200, 330):  # three key buckets
        with_graphs.blend(_prompt(4, length=length))
    assert [k[0] for k in weights.graph_buckets] == [graphs.bucket_of(3 * (length + 1) + 5, 1)[0] for length in (200, 330)]


def test_bucket_shapes() -> None:
    assert graphs.bucket_of(4096, 642) == (4224, 704)  # a spare key row even at a multiple of the step
    assert graphs.bucket_of(100, 64) == (128, 64)


def test_a_bucket_is_captured_once_seen_often_enough(weights: LlamaWeights, store: blockstore.Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of ever new lengths run eagerly (no capture per blend); a length that comes back gets graphs
    on its CAPTURE_AFTER-th blend among the last SIGHTINGS."""
    monkeypatch.setattr(graphs, "usable", lambda device: True)
    monkeypatch.setattr(graphs, "SIGHTINGS", 4)
    with_graphs, eager = _blenders(weights, store)
    prompt = _prompt(0)
    eager.blend(prompt)
    captures = []
    for length in (30, 200, 330, 500, 700):  # a new bucket each time (none the one below): none captured
        captures.append(with_graphs.blend(_prompt(5, length=length)).timings.get("graph_capture_s"))
    assert captures == [None] * 5 and not weights.graph_buckets
    runs = [with_graphs.blend(prompt) for _ in range(graphs.CAPTURE_AFTER + 1)]
    assert ["graph_capture_s" in r.timings for r in runs] == [False] * (graphs.CAPTURE_AFTER - 1) + [True, False]
    assert len(weights.graph_buckets) == 1 and next(iter(weights.graph_buckets.values())).replays == 2
    torch.testing.assert_close(runs[-1].logits, runs[0].logits, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flexattention_in_the_padded_layers_gives_the_eager_blend(weights: LlamaWeights, store: blockstore.Store,
                                                                   forced: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With FlexAttention wanted, a bucket's layers attend through it (graphs.FLEX: its block mask over
    static position buffers, padding rows at the last position so the rows stay sorted), and give what
    the eager blend's masked SDPA gives; a second prompt refills the same buffers and mask correctly."""
    monkeypatch.setattr(graphs, "flex_wanted", lambda device: True)
    with_graphs, eager = _blenders(weights, store)
    first, second = _prompt(1), _prompt(2)
    eager.blend(first)
    eager.blend(second)
    for prompt in (first, second):
        ref, got = eager.blend(prompt), with_graphs.blend(prompt)
        buckets = list(weights.graph_buckets.values())
        assert len(buckets) == 1 and buckets[0].flex and not hasattr(buckets[0], "bias")
        assert buckets[0].rows > got.recomputed.shape[0]  # padding rows were there
        assert torch.equal(got.recomputed, ref.recomputed)
        for k, r in zip(got.keys + got.values, ref.keys + ref.values):
            torch.testing.assert_close(k, r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert next(iter(weights.graph_buckets.values())).replays == 2


def _tile_classes(tables: tuple[torch.Tensor, ...], q_tiles: int) -> list[tuple[set[int], set[int]]]:
    """(full key tiles, partial key tiles) of each row tile, as the block mask's tables list them."""
    num, idx, full_num, full_idx = (t[0, 0] for t in tables)
    return [({int(x) for x in full_idx[r, : int(full_num[r])]}, {int(x) for x in idx[r, : int(num[r])]})
            for r in range(q_tiles)]


def test_a_flex_buckets_refilled_tables_match_each_blends_mask(weights: LlamaWeights) -> None:
    """The block mask a Flex bucket's graphs captured reads its tables in place (begin refills them): after
    each begin they must list, per tile of rows, exactly the key tiles some row may see, as whole only those
    every row sees (no rule is evaluated there). On a CPU flex_attention evaluates the rule on every pair and
    ignores the tables, so the blend-level test cannot see a stale or wrong table: this checks them."""
    from blockstore.blend import flex

    keys, rows = 384, 192  # three key tiles; two row tiles, the last one half padding of flex's own
    bucket = graphs.LayerGraphs(weights, keys, rows, 2, capture=False, backends=graphs.FLEX)
    tables = bucket.tables
    ptrs = [t.data_ptr() for t in tables]
    g = torch.Generator().manual_seed(4)
    for n, active_rows in ((300, 150), (383, 40), (130, 1)):
        active = torch.cat((torch.randperm(n - 1, generator=g)[: active_rows - 1].sort().values, torch.tensor([n - 1])))
        bucket.begin(torch.zeros(active_rows, CFG.hidden_size), active, n)
        assert [t.data_ptr() for t in bucket.tables] == ptrs  # refilled in place: what the mask holds
        assert all(a is b for a, b in zip((bucket.mask.kv_num_blocks, bucket.mask.kv_indices,
                                           bucket.mask.full_kv_num_blocks, bucket.mask.full_kv_indices), tables))
        q_pos = bucket.q_pos[:rows]  # padding rows at the last position
        assert torch.equal(q_pos[:active_rows], active) and bool((q_pos[active_rows:] == n - 1).all())
        seen = bucket.k_pos[:keys][None, :] <= q_pos[:, None]  # the rule, on every (row, key) pair
        assert int(seen.sum(dim=1).min()) >= 1  # every row sees a key: no empty softmax
        for r, (full, partial) in enumerate(_tile_classes(tables, -(-rows // flex.TILE))):
            tile = seen[r * flex.TILE : (r + 1) * flex.TILE]
            for kt in range(keys // flex.TILE):
                part = tile[:, kt * flex.TILE : (kt + 1) * flex.TILE]
                assert not (full & partial)
                assert (kt in full) == bool(part.all()), (n, r, kt)
                assert (kt in full or kt in partial) == bool(part.any()), (n, r, kt)
