"""Blender(...) refuses options of the wrong type or range with InvalidArgument naming the option, at
construction (blockstore/blend/options.py), before they reach float(), bool() or the layer loader.
Adapted from the examiner's /tmp/H56/test_blender_args_h56.py; the weights are a stand-in with only the
config the checks read, so no model is built."""

from __future__ import annotations

import array
from types import SimpleNamespace
from typing import Any

import pytest

import blockstore

pytest.importorskip("torch")

BLENDER_BAD = [("ratio", "0.5x"), ("ratio", None), ("ratio", "0.5"), ("ratio", True), ("ratio", float("nan")),
               ("ratio", 1.5), ("gradual", "2"), ("gradual", 0.5), ("check_layer", 1.5), ("check_layer", True),
               ("check_layer", 4), ("check_layer", -1), ("sink_tokens", True), ("sink_tokens", -1),
               ("query_weighted", "no"), ("query_weighted", 0), ("cuda_graphs", 1), ("overlap", "yes"),
               ("readers", 0), ("readers", 2.0), ("readers", True),
               # token ids: before, "12" became ('1', '2') (no prompt ever matched, silently), an id past the
               # vocabulary failed in the embedding lookup, "a" raised a bare ValueError from int()
               ("separator_ids", "12"), ("separator_ids", 5), ("separator_ids", [1, True]), ("separator_ids", [-1]),
               ("separator_ids", [4096]), ("separator_ids", [1.0]), ("chunk_prefix", [5000]), ("chunk_prefix", ["a"]),
               ("chunk_prefix", b"\x00"), ("chunk_prefix", None), ("kv_format", "fp8"), ("kv_format", None)]


def _weights(layers: int = 4) -> Any:
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers, vocab_size=4096))


@pytest.mark.parametrize(("name", "value"), BLENDER_BAD, ids=[f"{n}={v!r}" for n, v in BLENDER_BAD])
def test_blender_refuses_arguments_of_the_wrong_type_naming_them(name: str, value: Any) -> None:
    # Before: ratio "0.5x" / None raised a bare ValueError/TypeError from float(); check_layer 1.5 passed and
    # failed later as a layer index; query_weighted "no" was bool("no"), True; readers 0 or 2.0 reached the loader.
    from blockstore.blend import Blender

    with pytest.raises(blockstore.InvalidArgument, match=name) as info:
        Blender(_weights(), None, **{name: value})  # type: ignore[arg-type]
    assert isinstance(info.value, blockstore.BlockstoreError)
    assert "must be" in str(info.value)  # says what is allowed


def test_valid_options_pass_the_checks() -> None:
    # Valid values get past every option check: what fails then is the stand-in weights' missing model
    # shape (an AttributeError), a step after the checks. numpy's numbers and bools count as numbers and bools.
    import numpy as np

    from blockstore.blend import Blender

    for ok in (dict(ratio=0), dict(ratio=1), dict(ratio=np.float32(0.25)), dict(check_layer=3),
               dict(check_layer=np.int64(0)), dict(readers=None), dict(readers=2), dict(query_weighted=False),
               dict(overlap=np.bool_(False)), dict(cuda_graphs=True), dict(gradual=100), dict(sink_tokens=0),
               dict(separator_ids=[7, 7]), dict(separator_ids=(np.int64(4095),)), dict(chunk_prefix=[0])):
        with pytest.raises(AttributeError, match="num_key_value_heads"):
            Blender(_weights(), None, **ok)  # type: ignore[arg-type]


BAD_CHUNK_IDS = [[123], ["ab" * 8], [None], 5, "x" * 16, b"y" * 16, [b"short"], [b"z" * 32],
                 [memoryview(array.array("i", range(16)))]]  # 16 items of 4 bytes: a 64-byte id


@pytest.mark.parametrize("value", BAD_CHUNK_IDS, ids=[repr(v)[:24] for v in BAD_CHUNK_IDS])
@pytest.mark.parametrize("method", ["contains", "locate", "load_many", "stream_layers"])
def test_chunk_kv_store_refuses_chunk_ids_of_the_wrong_type_or_length(tmp_path: Any, method: str, value: Any) -> None:
    # Before (H73 left it): TypeError "can't concat int to bytes" or "unhashable type"; a 5-byte id passed and
    # was "not stored"; b"y" * 16 (bytes, not a list of ids) was read as 16 ids of one byte each.
    from blockstore.blend import ChunkKVStore, chunk_id

    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id="m")
        with pytest.raises(blockstore.InvalidArgument, match="chunk_ids must be a list of 16-byte chunk ids"):
            getattr(kv, method)(value)
        assert kv.contains([chunk_id([1, 2, 3]), bytearray(16)]) == [False, False]  # type: ignore[list-item]  # 16-byte bytes-likes pass
