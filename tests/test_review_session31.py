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


def test_the_connector_stores_a_repeated_chunk_once_and_blends_the_prompt_again(tmp_path: Path) -> None:
    """Through the vLLM connector's two sides: a prompt whose chunk appears twice had that chunk computed and
    stored twice (_store_chunks: chunks_stored 2 for one chunk), and once stored every such prompt failed to
    blend (a load failure, its claimed blocks recomputed by vLLM)."""
    pytest.importorskip("vllm")
    from test_blend_connector import _connectors, _register_caches, _step

    from jobs.trained_model import heldout_chunks

    scheduler, worker = _connectors(tmp_path / "kv")
    try:
        sep = list(worker.settings.separator_ids)
        a, b, q = heldout_chunks(3, 120, seed=11)
        _register_caches(worker)
        puts: list[int] = []
        kv_put = worker.runtime.kv.put
        worker.runtime.kv.put = lambda *x, **k: puts.append(1) or kv_put(*x, **k)  # type: ignore[method-assign]
        assert _step(scheduler, worker, "seed", a + sep + a + sep + q[:20], list(range(12))) == 0
        assert len(puts) == 1 and worker.counters.chunks_stored == 1 and len(scheduler.index.ids) == 1
        prompt = a + sep + a + sep + q
        claimed = _step(scheduler, worker, "again", prompt, list(range(23, 23 - (len(prompt) + 31) // 32, -1)))
        assert claimed > 0 and worker.counters.load_failures == 0, worker.counters.last_error
        assert worker.counters.requests_blended == 1 and worker.counters.chunks_hit == 2 and len(puts) == 1
        prompt = a + sep + b + sep + b + sep + q  # b missing twice: computed and stored once by the blend
        assert _step(scheduler, worker, "new", prompt, list(range(23, 23 - (len(prompt) + 31) // 32, -1))) > 0
        assert worker.counters.load_failures == 0 and worker.counters.chunks_missing == 2
        assert len(puts) == 2 and worker.counters.chunks_stored == 2 and len(scheduler.index.ids) == 2
    finally:
        worker.shutdown()
        scheduler.shutdown()


@pytest.mark.parametrize("key, bad", [("blend.namespace", ""), ("blend.namespace", "n" * 256),
                                      ("blend.stats_path", "/nonexistent-h73/stats.json")])
def test_connector_settings_refuse_a_namespace_or_stats_path_that_cannot_work(tmp_path: Path, key: str,
                                                                             bad: str) -> None:
    """Checked at vLLM's start, naming the key, as the other blend.* settings are. Before: an empty or
    over-long namespace passed, then every blend raised InvalidArgument (its blocks recomputed) and every
    chunk store failed with a warning, so the connector never served a token; a stats_path in a folder that
    does not exist passed, then the worker's first served or stored request raised FileNotFoundError out of
    start_load_kv (outside its try: vLLM's worker stopped)."""
    from blockstore import InvalidArgument
    from blockstore.connector.blend_config import BlendSettings

    base = {"blend.store_path": str(tmp_path / "kv"), "blend.separator_ids": [7]}
    with pytest.raises(InvalidArgument, match=key.replace(".", r"\.")):
        BlendSettings.from_extra_config({**base, key: bad}, str(tmp_path))
    ok = BlendSettings.from_extra_config({**base, "blend.stats_path": str(tmp_path / "stats.json")}, str(tmp_path))
    assert ok.stats_path == str(tmp_path / "stats.json")


def test_a_stats_file_that_cannot_be_written_is_logged_not_raised_into_vllm(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The stats file is for callers in another process; its folder going away (or its disk filling) while
    vLLM runs raised out of start_load_kv and wait_for_save, stopping vLLM's worker over a statistics file."""
    pytest.importorskip("vllm")
    import dataclasses

    from test_blend_connector import _connectors, _step

    from jobs.trained_model import heldout_chunks

    scheduler, worker = _connectors(tmp_path / "kv")
    try:
        worker.settings = dataclasses.replace(worker.settings, stats_path=str(tmp_path / "gone" / "stats.json"))
        sep = list(worker.settings.separator_ids)
        a, q = heldout_chunks(2, 120, seed=11)
        cfg = worker.runtime.weights.config
        worker.register_kv_caches({f"model.layers.{i}.self_attn.attn": torch.zeros(
            24, cfg.num_key_value_heads, 32, 2 * cfg.head_dim) for i in range(cfg.num_hidden_layers)})
        assert _step(scheduler, worker, "seed", a + sep + q[:20], list(range(12))) == 0
        assert worker.counters.chunks_stored == 1
        assert _step(scheduler, worker, "again", a + sep + q, list(range(12))) > 0
        assert worker.counters.requests_blended == 1 and worker.counters.load_failures == 0
        assert "stats" in caplog.text
    finally:
        worker.shutdown()
        scheduler.shutdown()


def test_a_stream_refuses_a_negative_first_layer_or_reader_count(weights: LlamaWeights, tmp_path: Path) -> None:
    """ChunkKVStore.stream_layers(first_layer=...) was not checked: a negative one made range(first_layer, layers)
    index each chunk's records from the end, so first_layer=-4 streamed the M record and layers 1..3 as layers
    -4..-1 and layer(-1) returned bytes of another record as K and V without an error (-1: every layer raised a
    bare RuntimeError); a float raised TypeError, readers=0 or -1 passed. InvalidArgument now, naming it."""
    from blockstore import InvalidArgument

    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id=weights.model_id)
        ids = torch.arange(10)
        ref = full_prefill(weights, ids)
        cid = kv.put(ids, ref.keys, ref.values, torch.arange(10))
        for first_layer in (-1, -4, 1.5, True, None):
            with pytest.raises(InvalidArgument, match="first_layer"):
                kv.stream_layers([cid], first_layer=first_layer)  # type: ignore[arg-type]
        for readers in (0, -1, 2.5, True):
            with pytest.raises(InvalidArgument, match="readers"):
                kv.stream_layers([cid], readers=readers)  # type: ignore[arg-type]
        stream = kv.stream_layers([cid], first_layer=2, readers=1)
        try:
            assert torch.equal(stream.layer(3)[0].keys[0], ref.keys[3])
        finally:
            stream.close()


def test_a_full_store_still_serves_the_chunks_it_holds(tmp_path: Path) -> None:
    """The connector's own rule is that a cache that cannot grow is a future miss, not an error (_store_chunks).
    A blend stores the prompt's new chunks on the way, and a full disk (NoSpace from that put) failed the whole
    blend: the chunks the store held were not used and vLLM recomputed every claimed block, for every prompt
    bringing a new chunk, for as long as the disk stayed full. Now the blend is served without storing the
    new chunks, which the scheduler is not told of; once there is room they are stored again."""
    pytest.importorskip("vllm")
    from test_blend_connector import _connectors, _step

    from blockstore.errors import NoSpace
    from jobs.trained_model import heldout_chunks

    scheduler, worker = _connectors(tmp_path / "kv")
    try:
        sep = list(worker.settings.separator_ids)
        a, b, q = heldout_chunks(3, 120, seed=11)
        cfg = worker.runtime.weights.config
        worker.register_kv_caches({f"model.layers.{i}.self_attn.attn": torch.zeros(
            24, cfg.num_key_value_heads, 32, 2 * cfg.head_dim) for i in range(cfg.num_hidden_layers)})
        assert _step(scheduler, worker, "seed", a + sep + q[:20], list(range(12))) == 0
        store = worker.runtime.store
        put_many = store.put_many

        def full(*args: object, **kwargs: object) -> None:
            raise NoSpace("no space left on device (test)")

        store.put_many = full  # type: ignore[method-assign]
        prompt = a + sep + b + sep + q
        claimed = _step(scheduler, worker, "full", prompt, list(range(23, 23 - (len(prompt) + 31) // 32, -1)))
        c = worker.counters
        assert claimed > 0 and c.load_failures == 0 and c.requests_blended == 1, c.last_error
        assert c.tokens_reused > 0 and c.chunks_stored == 1 and "NoSpace" in (c.last_error or "")
        assert worker.get_block_ids_with_load_errors() == set() and len(scheduler.index.ids) == 1
        store.put_many = put_many  # type: ignore[method-assign]
        assert _step(scheduler, worker, "room", prompt, list(range(23, 23 - (len(prompt) + 31) // 32, -1))) > 0
        assert c.requests_blended == 2 and c.chunks_stored == 2 and len(scheduler.index.ids) == 2
    finally:
        worker.shutdown()
        scheduler.shutdown()


@pytest.mark.parametrize("collected", [False, True], ids=["overwritten", "overwritten-and-collected"])
def test_a_tensor_replaced_while_it_is_read_is_never_returned_in_the_old_dtype_or_shape(tmp_path: Path,
                                                                                         collected: bool) -> None:
    """get_tensors looked the keys up (dtype and shape from the meta), allocated, then read with get_many, which
    looks them up again: a tensor replaced in between by one of another dtype or shape of the same size came back
    as the old dtype holding the new bytes (int32 [7, 8, 9, 10] as float32 [9.8e-45, ...]); a shorter one left
    the old shape's tail uninitialised; a longer one raised InvalidArgument (out too small) for a valid read.
    With threads (one replacing in a loop, two reading, switch interval 1 us): 512 of 90,000 reads wrong, 136
    InvalidArgument, in 10 s. Each comes back as a tensor that was stored, old or new. `collected`: the old
    record's block is also deleted before the read begins (simulated: no file, and the table no longer names
    it), where read_located would look the key up again and read the replacement."""
    import numpy as np

    with blockstore.open(tmp_path / "s") as store:
        locate = store.locate_many
        has_block, block_read_fd = store.has_block, store.block_read_fd
        gone = {"fd": True, "named": True}  # the first lookup's block deleted before the read: no file, not named

        def no_file(block_id: int) -> int | None:
            if gone["fd"]:
                gone["fd"] = False
                return None
            return block_read_fd(block_id)

        def not_named(block_id: int) -> bool:
            if gone["named"]:
                gone["named"] = False
                return False
            return has_block(block_id)

        if collected:
            store.block_read_fd, store.has_block = no_file, not_named  # type: ignore[method-assign]

        def replaced_after_lookup(key: bytes, new: object, out: object = None) -> object:
            calls = []
            gone.update(fd=True, named=True)

            def racing(keys: list[bytes], **kw: object) -> object:
                got = locate(keys, **kw)  # type: ignore[arg-type]
                if not calls:  # another thread replaces the tensor right after the lookup
                    calls.append(1)
                    store.put_tensor(key, new)
                return got

            store.locate_many = racing  # type: ignore[method-assign]
            try:
                return store.get_tensor(key, out=out)
            finally:
                store.locate_many = locate  # type: ignore[method-assign]

        for i, (old, new) in enumerate([
                (np.arange(4, dtype=np.float32), np.array([7, 8, 9, 10], dtype=np.int32)),  # same size, other dtype
                (np.arange(8, dtype=np.float64).reshape(2, 4), np.arange(8, dtype=np.float64).reshape(4, 2)),
                (np.arange(8, dtype=np.float64), np.arange(2, dtype=np.float64) + 100),  # shorter
                (np.arange(2, dtype=np.float64), np.arange(50, dtype=np.float64) + 100)]):  # longer
            key = b"t%d" % i
            store.put_tensor(key, old)
            got = replaced_after_lookup(key, new)
            assert isinstance(got, np.ndarray)
            same = [t for t in (old, new) if t.dtype == got.dtype and t.shape == got.shape and np.array_equal(t, got)]
            assert same, (i, got.dtype, got.shape, got)
            assert not collected or same[-1] is new  # read again once the old block was found gone
        # torch too, into the caller's tensor (out=): the old values, or the replacement's dtype refused
        store.put_tensor(b"pt", torch.arange(4, dtype=torch.float32))
        out = torch.empty(4, dtype=torch.float32)
        try:
            assert replaced_after_lookup(b"pt", torch.tensor([1, 2, 3, 4], dtype=torch.int32), out) is out
            assert torch.equal(out, torch.arange(4, dtype=torch.float32))
        except blockstore.InvalidArgument as exc:  # read again after the block went: the replacement's dtype
            assert collected and "int32" in str(exc)


@pytest.mark.parametrize("which", ["layer", "meta"])
def test_a_chunk_record_read_again_at_another_size_is_refused(weights: LlamaWeights, tmp_path: Path,
                                                              which: str) -> None:
    """read_located looks a record up again when compaction emptied its block after the lookup, and may then
    read a replacement: chunk KV of the same model id in another dtype (the id does not name the dtype) is
    half the size. The loaders checked only for a miss, so the bytes landed in slots sized for the old
    record and the rest of each slot was served as K and V. Simulated here by a read_located that reports the
    shorter replacement; a BlockstoreError now."""
    from blockstore import BlockstoreError

    with blockstore.open(tmp_path / "s") as store:
        kv = ChunkKVStore(store, model_id=weights.model_id)
        ids = torch.arange(10)
        ref = full_prefill(weights, ids)
        cid = kv.put(ids, ref.keys, ref.values, torch.arange(10))
        read_located = store.read_located

        def replaced(keys: list[bytes], locs: list[object], **kw: object) -> list[object]:
            got = read_located(keys, locs, **kw)  # type: ignore[arg-type]
            is_meta = [k.endswith(b"M") for k in keys]
            return [(n // 2 if isinstance(n, int) else bytes(n)[: len(n) // 2])  # type: ignore[arg-type]
                    if m == (which == "meta") else n for n, m in zip(got, is_meta)]

        store.read_located = replaced  # type: ignore[method-assign]
        with pytest.raises(BlockstoreError, match="replaced"):
            kv.load_many([cid])
        if which == "meta":
            with pytest.raises(BlockstoreError, match="replaced"):
                kv.stream_layers([cid]).close()


def test_a_chunk_text_over_the_record_limit_is_refused_before_the_group_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """put's value is checked against the payload limit (4 GiB - 1) before it is queued; a chunk's text was not,
    and the C core refused the whole group ('append records: InvalidArgument', naming nothing), which raises
    in every caller of the group: other threads' puts committed with it failed too. The limit is lowered here
    (a 4 GiB text is too much for a test); the text is refused up front, naming its size."""
    from blockstore import InvalidArgument

    monkeypatch.setattr("blockstore.chunks.MAX_PAYLOAD", 100, raising=False)
    with blockstore.open(tmp_path / "s") as store:
        with pytest.raises(InvalidArgument, match="text of 101 UTF-8 bytes exceeds the 100-byte limit"):
            store.put_chunk("u", "s", "c", "é" * 50 + "x")
        store.put_chunk("u", "s", "c", "x" * 100)
        assert [c.text for c in store.list_chunks("u", "s")] == ["x" * 100]


_MANY_TENSOR_BLOCKS = """
import resource, sys
import numpy as np
import blockstore
resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
with blockstore.open(sys.argv[1], block_size=1 << 16) as s:
    for i in range(900):
        s.put_tensor(b"t%d" % i, np.full(12000, i, dtype=np.float32), partition=b"p%d" % i)
    keys = [b"t%d" % i for i in range(900)]
    got = s.get_tensors(keys)
    assert all(int(g[0]) == i and g.shape == (12000,) for i, g in enumerate(got))
    print(len({loc.block_id for loc in s.locate_many(keys)}))
"""


def test_get_tensors_over_more_blocks_than_the_open_file_limit_reads(tmp_path: Path) -> None:
    """get_tensors holds the blocks it reads (0e2dbf9): held all at once, every block's descriptor stayed open
    (the fd cache never closes a held one), so 900 tensors in 900 blocks under a 400-file limit raised EMFILE.
    It holds and reads READ_BLOCKS_AT_ONCE blocks at a time, as the reader does."""
    import subprocess
    import sys

    script = tmp_path / "many_tensor_blocks.py"
    script.write_text(_MANY_TENSOR_BLOCKS)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert int(proc.stdout.split()[-1]) >= 800
