"""Review H86 of the 8-bit chunk KV format (kv_codec.py): the batched decode of chunks of an odd-sized KV row
(head_dim, kv heads and tokens all odd: the scales then start 2 bytes past a multiple of 4) reads the same
scales as the one-record decode, on load_many and on both LayerStream readers; and a row holding NaN or
+-inf never reads back as finite numbers (the model format keeps them as they are; 8 bits cannot, and a
plausible finite value in their place would hide a broken model from every blend that reads it)."""

from __future__ import annotations

import pytest
import torch

import blockstore
from blockstore.blend import ChunkKVStore, KVLayout, LayerStream, kv_codec

ODD = KVLayout(layers=2, kv_heads=3, head_dim=5, dtype="float32", kv_format="int8")  # 2*7*3*5 = 210 bytes of int8


def _kv(seed: int, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, ODD.kv_heads, ODD.head_dim)
    return ([torch.randn(shape, generator=g) * (i + 1) for i in range(ODD.layers)],
            [torch.randn(shape, generator=g) for _ in range(ODD.layers)])


@pytest.mark.parametrize("pieces", [1, 2])  # LayerStream's C readers, then its Python readers
def test_odd_row_sizes_decode_alike_on_every_read_path(tmp_path, pieces: int,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LayerStream, "PIECES", pieces)
    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id="odd|kv=int8", layout=ODD)
        tokens = 7
        kvs = [_kv(seed, tokens) for seed in range(3)]
        cids = [kv.put(torch.arange(tokens) + 100 * i, k, v, torch.arange(tokens)) for i, (k, v) in enumerate(kvs)]
        want = []  # each record decoded on its own (kv_codec.decode: the scales copied to an aligned place)
        for k, v in kvs:
            want.append([kv_codec.decode(torch.from_numpy(kv_codec.encode(k[i], v[i], ODD).copy()), tokens, ODD)
                         for i in range(ODD.layers)])
        loaded = kv.load_many(cids)
        for chunk, w in zip(loaded, want):
            assert chunk is not None
            for layer in range(ODD.layers):
                assert torch.equal(chunk.keys[layer], w[layer][0]) and torch.equal(chunk.values[layer], w[layer][1])
        stream = kv.stream_layers(cids)
        try:
            for layer in range(ODD.layers):
                views = stream.layer_kv(layer)
                assert views is not None
                for i, w in enumerate(want):
                    assert torch.equal(views[0][i], w[layer][0]) and torch.equal(views[1][i], w[layer][1])
                    got = stream.layer(layer)[i]
                    assert torch.equal(got.keys[0], w[layer][0]) and torch.equal(got.values[0], w[layer][1])
        finally:
            stream.close()
        # and within half a step of what was stored
        for chunk, (k, _) in zip(loaded, kvs):
            assert chunk is not None
            step = k[1].abs().amax(dim=-1, keepdim=True) / 127
            assert bool(((chunk.keys[1] - k[1]).abs() <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_non_finite_value_makes_its_row_read_back_nan(bad: float, dtype: torch.dtype) -> None:
    layout = KVLayout(1, 2, 8, str(dtype).removeprefix("torch."), "int8")
    k = torch.randn(4, 2, 8).to(dtype)
    v = torch.randn(4, 2, 8).to(dtype)
    k[1, 0, 3] = bad
    v[2, 1, 0] = bad
    raw = kv_codec.encode(k, v, layout)
    assert raw.tobytes() == kv_codec.encode(k, v, layout).tobytes()  # the same bytes every time
    got_k, got_v = kv_codec.decode(torch.from_numpy(raw.copy()), 4, layout)
    # the rows holding the value read back NaN, every element (no finite value, no sign-flipped infinity)
    assert bool(got_k[1, 0].isnan().all()) and bool(got_v[2, 1].isnan().all())
    # every other row as it would be without it
    ok = torch.ones(4, 2, dtype=torch.bool)
    ok[1, 0] = False
    ok_v = torch.ones(4, 2, dtype=torch.bool)
    ok_v[2, 1] = False
    assert bool(got_k[ok].isfinite().all()) and bool(got_v[ok_v].isfinite().all())
    step = k.float().nan_to_num(0, 0, 0).abs().amax(dim=-1, keepdim=True) / 127
    out_eps = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]  # output rounding
    err = (got_k.float() - k.float()).abs()
    assert bool((err <= step / 2 + got_k.float().abs() * out_eps + 1e-6)[ok].all())


def test_a_non_finite_row_is_stored_as_a_nan_scale_and_zeros() -> None:
    layout = KVLayout(1, 1, 4, "float32", "int8")
    k = torch.tensor([[[1.0, float("inf"), -2.0, 3.0]], [[1.0, -2.0, float("nan"), 4.0]], [[1.0, 2.0, 3.0, 4.0]]])
    raw = torch.from_numpy(kv_codec.encode(k, k.clone(), layout).copy())
    q = raw[:24].view(torch.int8).view(2, 3, 4)
    scale = raw[24:].view(torch.float32).view(2, 3)
    assert bool(scale[:, :2].isnan().all()) and bool((q[:, :2] == 0).all())  # not whatever a NaN casts to
    assert torch.equal(q[0, 2], torch.tensor([32, 64, 95, 127], dtype=torch.int8)) and abs(float(scale[0, 2]) - 4 / 127) < 1e-8
