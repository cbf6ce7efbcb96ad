"""The blend's second round of GPU speed paths give what the plain paths give (CPU only; timings are
bench/blend.py's, never asserted here): a layer read as one C call over every chunk's block
(layer_reads.py, native bs_read_files), the cached KV of adjacent chunks re-rotated straight from the
loaded layer buffer, and scattered-row attention through FlexAttention's block mask (flex.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import blockstore
from blockstore import ChecksumMismatch
from blockstore import native as native_mod
from blockstore.blend import (
    Blender,
    ChunkKVStore,
    LayerStream,
    LlamaConfig,
    LlamaWeights,
    flex,
    full_prefill,
    fused_rope,
)
from blockstore.blend import blender as blender_mod
from blockstore.blend.blender import _one_buffer, _Span
from blockstore.blend.compute import _signed_sin, position_mask, rope_cos_sin, rotate
from blockstore.blend.layer_loader import LayerLoader
from blockstore.records import ReadRequest

CFG = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=5, std=0.2)


def _stored(weights: LlamaWeights, store: blockstore.Store, sizes: tuple[int, ...] = (16, 16, 16),
            seed: int = 0) -> tuple[ChunkKVStore, list[torch.Tensor], list[bytes]]:
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in sizes]
    kv = ChunkKVStore(store, model_id=weights.model_id)
    cids = [kv.put(c, (r := full_prefill(weights, c)).keys, r.values, torch.arange(len(c))) for c in chunks]
    return kv, chunks, cids


def _damage_layer_record(store: blockstore.Store, kv: ChunkKVStore, cid: bytes, layer: int) -> None:
    """Flip one payload byte of a chunk's layer record in its block file: its checksum no longer matches."""
    loc = store.locate_many([kv.layer_key(cid, layer)], ns=kv.ns)[0]
    assert loc is not None
    fd = os.open(store.blocks.path(loc.block_id), os.O_RDWR)
    try:
        byte = os.pread(fd, 1, loc.payload_offset + 5)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), loc.payload_offset + 5)
    finally:
        os.close(fd)


@pytest.mark.parametrize("c_readers", [True, False])
def test_a_layer_is_one_c_call_over_every_chunks_block(weights: LlamaWeights, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, c_readers: bool) -> None:
    """Python readers: one read_files call a layer. C readers (layer_loader.py): every layer handed to C
    at once, each as one bs_read_files over the three blocks."""
    with blockstore.open(tmp_path / "s") as store:
        if store.backend.name != "native":
            pytest.skip("the C core is not loaded")
        kv, _, cids = _stored(weights, store)
        assert len({loc.block_id for loc in store.locate_many([kv.layer_key(c, 1) for c in cids], ns=kv.ns)}) == 3
        whole = kv.load_many(cids)
        files_calls: list[int] = []
        jobs_calls: list[list[int]] = []
        real, real_jobs = type(store.backend).read_files, type(store.backend).layer_jobs

        def counting(self, files, *a, **kw):  # type: ignore[no-untyped-def]
            if sys._getframe(1).f_code.co_name != "_read_blocks":  # the store's own get_many reads by read_files too
                files_calls.append(len(files))
            return real(self, files, *a, **kw)

        def counting_jobs(self, layers, *a, **kw):  # type: ignore[no-untyped-def]
            jobs_calls.append([len(files) for files in layers])
            return real_jobs(self, layers, *a, **kw)

        monkeypatch.setattr(type(store.backend), "read_files", counting)
        monkeypatch.setattr(type(store.backend), "layer_jobs", counting_jobs)
        if not c_readers:
            monkeypatch.setattr(LayerLoader, "wanted", classmethod(lambda cls, reads: False))
        stream = kv.stream_layers(cids, first_layer=1, readers=2)
        try:
            for layer in range(1, CFG.num_hidden_layers):
                for got, want in zip(stream.layer(layer), whole):
                    assert want is not None
                    assert torch.equal(got.keys[0], want.keys[layer]) and torch.equal(got.values[0], want.values[layer])
        finally:
            stream.close()
    # one call a layer, each over the three chunks' three blocks
    if c_readers:
        assert (files_calls, jobs_calls) == ([], [[3] * (CFG.num_hidden_layers - 1)])
    else:
        assert (files_calls, jobs_calls) == ([3] * (CFG.num_hidden_layers - 1), [])


def test_read_files_equals_read_many_and_an_older_core_falls_back(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    backend = native_mod.NativeBackend()
    paths = [tmp_path / f"f{i}" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes((i * 7 + j) % 251 for j in range(20000)))
    fds = [backend.open_ro(str(p)) for p in paths]
    try:
        spans = [[(100, 300), (5000, 4096)], [(0, 10)], [(19000, 1000)]]

        def requests(bad: bool = False) -> tuple[list[tuple[int, list[ReadRequest]]], list[list[bytearray]]]:
            bufs = [[bytearray(n) for _, n in s] for s in spans]
            files = []
            for fd, s, bs, p in zip(fds, spans, bufs, paths):
                data = p.read_bytes()
                reqs = [ReadRequest(off, n, b, backend.xxh3(data[off:off + n]) ^ (1 if bad and off == 0 else 0))
                        for (off, n), b in zip(s, bs)]
                files.append((fd, reqs))
            return files, bufs

        files, bufs = requests()
        assert backend.read_files(files, 0, True) == [[0, 0], [0], [0]]
        for p, s, bs in zip(paths, spans, bufs):
            assert [bytes(b) for b in bs] == [p.read_bytes()[off:off + n] for off, n in s]
        files, bufs = requests()
        assert backend.read_files(files, 0, True, willneed=True) == [[0, 0], [0], [0]]  # announced first
        assert [bytes(b) for b in bufs[2]] == [paths[2].read_bytes()[19000:20000]]
        files, _ = requests(bad=True)  # the (0, 10) record's checksum is wrong: only it fails
        statuses = backend.read_files(files, 0, True)
        assert statuses[0] == [0, 0] and statuses[1][0] != 0 and statuses[2] == [0]
        monkeypatch.setattr(native_mod, "_HAS_READ_FILES", False)
        files, _ = requests(bad=True)
        assert backend.read_files(files, 0, True) == statuses
    finally:
        for fd in fds:
            backend.close(fd)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("store_missing", [True, False])
def test_a_corrupt_layer_record_is_never_handed_to_the_blend_and_is_recomputed(
        weights: LlamaWeights, tmp_path: Path, overlap: bool, store_missing: bool) -> None:
    """A chunk whose layer record fails its checksum is recomputed as a missing one (never read), and stored
    again when store_missing: the next blend reads it. Before, every blend needing it raised
    ChecksumMismatch (the connector recomputed the whole prompt, each time, until fsck --repair)."""
    prompt_spans = [(0, 16), (16, 32), (32, 48)]
    with blockstore.open(tmp_path / "s") as store, blockstore.open(tmp_path / "ref") as ref_store:
        kv, chunks, cids = _stored(weights, store)
        ref_kv = ChunkKVStore(ref_store, model_id=weights.model_id)  # chunk 1 never stored: computed by the blend
        for i in (0, 2):
            ref_kv.put(chunks[i], (r := full_prefill(weights, chunks[i])).keys, r.values, torch.arange(16))
        _damage_layer_record(store, kv, cids[1], 2)
        with pytest.raises(ChecksumMismatch):
            kv.load_many([cids[1]])
        prompt = torch.cat([*chunks, torch.tensor([1, 2, 3])])
        blender = Blender(weights, kv, ratio=0.2, overlap=overlap)
        got = blender.blend(prompt, spans=prompt_spans, store_missing=store_missing)
        ref = Blender(weights, ref_kv, ratio=0.2, overlap=overlap).blend(prompt, spans=prompt_spans, store_missing=False)
        assert got.damaged_chunks == [cids[1]] and got.missing_chunks == [cids[1]] == ref.missing_chunks
        assert torch.equal(got.recomputed, ref.recomputed)
        torch.testing.assert_close(got.logits, ref.logits)
        for mine, theirs in zip(got.keys + got.values, ref.keys + ref.values):
            torch.testing.assert_close(mine, theirs)
        again = blender.blend(prompt, spans=prompt_spans, store_missing=store_missing)
        if store_missing:  # stored again: read, not recomputed, and the same KV
            assert again.damaged_chunks == [] and again.missing_chunks == []
            assert len(kv.load_many([cids[1]])) == 1
        else:  # nothing written: still damaged, still recomputed
            assert again.damaged_chunks == [cids[1]]
        torch.testing.assert_close(again.logits, got.logits)


@pytest.mark.parametrize("read_ahead", [True, False])
def test_cold_layers_read_the_same_bytes(weights: LlamaWeights, tmp_path: Path, read_ahead: bool) -> None:
    """After the page cache is dropped (read_ahead: every record of an uncached block announced before
    the first read) the one-call path reads what load_many read warm."""
    with blockstore.open(tmp_path / "s", read_ahead=read_ahead) as store:
        kv, _, cids = _stored(weights, store)
        whole = kv.load_many(cids)
        os.sync()  # dirty pages are not dropped
        store.drop_page_cache()
        stream = kv.stream_layers(cids, first_layer=1)
        try:
            assert stream._fast is not None or store.backend.name != "native"
            for layer in range(1, CFG.num_hidden_layers):
                for got, want in zip(stream.layer(layer), whole):
                    assert want is not None and torch.equal(got.keys[0], want.keys[layer])
                    assert torch.equal(got.values[0], want.values[layer])
        finally:
            stream.close()


def test_the_pure_python_backend_serves_the_one_call_path(weights: LlamaWeights, tmp_path: Path) -> None:
    """The pure-Python backend has read_files too (one read_many a file): same bytes as load_many."""
    with blockstore.open(tmp_path / "s", backend="python") as store:
        kv, _, cids = _stored(weights, store)
        whole = kv.load_many(cids)
        stream = kv.stream_layers(cids, first_layer=1)
        try:
            assert stream._fast is not None
            for got, want in zip(stream.layer(3), whole):
                assert want is not None and torch.equal(got.keys[0], want.keys[3])
        finally:
            stream.close()


@pytest.mark.parametrize("adjacent", [True, False])
def test_cached_kv_from_one_buffer_equals_the_concatenated_path(weights: LlamaWeights, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, adjacent: bool) -> None:
    """Adjacent chunks read into one buffer at equal strides take the 4-op path; chunks with a gap
    between them in the prompt take the general one: same KV, bit for bit, and the same logits, as the
    blend of the same chunks read by load_many."""
    with blockstore.open(tmp_path / "s") as store:
        kv, chunks, cids = _stored(weights, store)
        gap = [] if adjacent else [torch.tensor([7])]
        prompt = torch.cat([chunks[0], *gap, chunks[1], chunks[2], torch.tensor([1, 2, 3])])
        off = len(gap)
        spans = [(0, 16), (16 + off, 32 + off), (32 + off, 48 + off)]
        stream = kv.stream_layers(cids, first_layer=1)
        try:
            got = [(_Span(s, e, c), ch, 0) for (s, e), c, ch in zip(spans, cids, stream.layer(2))]
            assert _one_buffer(got) is not None  # the loader's layout: K, V of each chunk back to back
            views = stream.layer_kv(2)  # the same, straight from the loader's buffer
            assert views is not None
            for i, (_, ch, _) in enumerate(got):
                assert torch.equal(views[0][i], ch.keys[0]) and torch.equal(views[1][i], ch.values[0])
        finally:
            stream.close()
        # load_many's buffer (each chunk's layers together) has equal strides between chunks too
        loaded = kv.load_many(cids)
        assert _one_buffer([(_Span(s, e, c), ch, 2) for (s, e), c, ch in zip(spans, cids, loaded)]) is not None  # type: ignore[misc]
        _, _, odd = _stored(weights, store, sizes=(16, 12), seed=1)  # chunks of unequal sizes: no common view
        assert _one_buffer([(_Span(0, 1, c), ch, 2) for c, ch in zip(odd, kv.load_many(odd))]) is None  # type: ignore[misc]
        odd_stream = kv.stream_layers(odd, first_layer=1)
        try:
            assert odd_stream.layer_kv(2) is None and len(odd_stream.layer(2)) == 2
        finally:
            odd_stream.close()
        used: list[int] = []
        real_layer_kv = LayerStream.layer_kv

        def counting(self, layer):  # type: ignore[no-untyped-def]
            used.append(layer)
            return real_layer_kv(self, layer)

        monkeypatch.setattr(LayerStream, "layer_kv", counting)
        streamed = Blender(weights, kv, ratio=0.25).blend(prompt, spans=spans)
        # the loader's views from the layer after the check layer on, when the chunks' rows are one range
        assert used == (list(range(2, CFG.num_hidden_layers)) if adjacent else [])
        whole = Blender(weights, kv, ratio=0.25, overlap=False).blend(prompt, spans=spans)
        monkeypatch.setattr(blender_mod, "_one_buffer", lambda got: None)  # the general path alone
        monkeypatch.setattr(LayerStream, "layer_kv", lambda self, layer: None)
        general = Blender(weights, kv, ratio=0.25).blend(prompt, spans=spans)
        for res in (whole, general):
            for a, b in zip(streamed.keys + streamed.values, res.keys + res.values):
                assert torch.equal(a, b)
            assert torch.equal(streamed.logits, res.logits) and torch.equal(streamed.recomputed, res.recomputed)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                         k_pos: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kh) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~position_mask(q_pos, k_pos)[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vh).reshape(q.shape[0], -1)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_attention_equals_the_explicit_mask() -> None:
    g = torch.Generator().manual_seed(0)
    n = 300  # keys over 2 tiles and a partial one; 70 scattered rows: a partial query tile
    q, k, v = (torch.randn(n, h, 16, generator=g) for h in (6, 2, 2))
    pos = torch.arange(n)
    rows = torch.randperm(n, generator=g)[:70].sort().values
    mask = flex.block_mask(pos[rows], pos)
    got = flex.attend(q[rows], k, v, mask, compiled=False)
    assert got is not None
    torch.testing.assert_close(got, _reference_attention(q[rows], k, v, pos[rows], pos), atol=1e-5, rtol=1e-5)
    # the mask really is by position: a query row at position 10 sees no key after it
    early = flex.attend(q[rows[:1]], k, v, flex.block_mask(pos[rows[:1]], pos), compiled=False)
    assert early is not None
    keys_seen = int(rows[0]) + 1
    torch.testing.assert_close(early, _reference_attention(q[rows[:1]], k[:keys_seen], v[:keys_seen],
                                                           pos[rows[:1]], pos[:keys_seen]), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("n, rows", [(1000, 400), (1024, 256), (700, 3), (512, (129, 257))])
def test_flex_block_mask_skips_exactly_the_tiles_no_row_sees(n: int, rows: int | tuple[int, int]) -> None:
    """The block mask built from sorted positions (two binary searches, no pass over the pairs) lists,
    per tile of rows, every key tile holding an allowed pair, and as whole only tiles whose every pair
    is allowed; attention through it equals the explicit mask's over several tiles of rows. (129, 257):
    a tile of rows whose last is the first key of a key tile (it sees that one key there)."""
    g = torch.Generator().manual_seed(n)
    pos = torch.arange(n)
    picked = torch.arange(*rows) if isinstance(rows, tuple) else torch.randperm(n, generator=g)[:rows].sort().values
    rows = picked.shape[0]
    mask = flex.block_mask(pos[picked], pos)
    t = flex.TILE
    partial_n, partial_idx = mask.kv_num_blocks[0, 0], mask.kv_indices[0, 0]
    full_n, full_idx = mask.full_kv_num_blocks[0, 0], mask.full_kv_indices[0, 0]  # type: ignore[index]
    allowed = position_mask(pos[picked], pos)
    for qt in range(-(-rows // t)):
        tile = allowed[qt * t:(qt + 1) * t]
        seen = {kt for kt in range(-(-n // t)) if tile[:, kt * t:(kt + 1) * t].any()}
        whole = set(full_idx[qt, :full_n[qt]].tolist())
        part = set(partial_idx[qt, :partial_n[qt]].tolist())
        assert whole | part == seen and not whole & part
        assert all(tile[:, kt * t:(kt + 1) * t].all() and (kt + 1) * t <= n for kt in whole)
    q, k, v = (torch.randn(n, h, 16, generator=g) for h in (8, 2, 2))
    got = flex.attend(q[picked], k, v, mask, compiled=False)
    assert got is not None
    torch.testing.assert_close(got, _reference_attention(q[picked], k, v, pos[picked], pos), atol=1e-5, rtol=1e-5)


def test_a_flex_failure_falls_back_to_sdpa_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(flex._state, "failed", None)

    def broken(*a, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(flex, "flex_attention", broken)
    monkeypatch.delenv("BLOCKSTORE_BLEND_FLEX", raising=False)
    assert not flex.usable(torch.device("cuda"))  # off until a GPU run shows it pays
    monkeypatch.setenv("BLOCKSTORE_BLEND_FLEX", "1")
    assert flex.usable(torch.device("cuda")) and not flex.usable(torch.device("cpu"))
    q, k, v = torch.randn(4, 6, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    with pytest.warns(RuntimeWarning, match="no Triton here"):
        assert flex.attend(q, k, v, None, compiled=False) is None  # type: ignore[arg-type]
    assert flex.failure() is not None and not flex.usable(torch.device("cuda"))


def test_the_fused_rope_rotation_equals_the_eager_one_and_a_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 2, 16, generator=g)  # [chunks, tokens, kv_heads, head_dim]: a loaded layer's view
    cos, sin = rope_cos_sin(torch.arange(120) - 7, 16, 10000.0)
    want = rotate(x, cos, sin)
    tables = (cos[:, None, :].view(3, 40, 1, 16), _signed_sin(sin)[:, None, :].view(3, 40, 1, 16))
    out = torch.empty_like(x)
    assert fused_rope.rotate_into(out, x, *tables, compiled=False)
    torch.testing.assert_close(out, want)
    monkeypatch.setitem(fused_rope._state, "failed", None)
    monkeypatch.setenv("BLOCKSTORE_BLEND_FUSED_ROPE", "0")
    assert not fused_rope.usable(torch.device("cuda"))
    monkeypatch.setenv("BLOCKSTORE_BLEND_FUSED_ROPE", "1")
    assert fused_rope.usable(torch.device("cuda")) and not fused_rope.usable(torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="fused RoPE kernel failed"):
        assert not fused_rope.rotate_into(out, x, *tables[:1], torch.ones(5), compiled=False)  # shapes that do not broadcast
    assert fused_rope.failure() is not None and not fused_rope.usable(torch.device("cuda"))


def test_block_read_fd_names_a_held_local_block_and_none_otherwise(tmp_path: Path) -> None:
    """The one-call loader's descriptor comes from the public API: a held block's file reads its bytes;
    a block id with no local file gives None (the loader then reads through read_located)."""
    with blockstore.open(tmp_path / "s") as store:
        store.put(b"k", b"v" * 4096)
        store.seal_open_blocks()
        (loc,) = store.locate_many([b"k"])
        assert loc is not None
        with store.hold_blocks([loc.block_id]):
            fd = store.block_read_fd(loc.block_id)
            assert fd is not None
            assert os.pread(fd, 4096, loc.payload_offset) == b"v" * 4096
        assert store.block_read_fd(loc.block_id + 1000) is None


@pytest.mark.parametrize("check_layer", [0, 1, 2])
def test_the_loader_starts_once_the_full_layers_are_issued(weights: LlamaWeights, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, check_layer: int) -> None:
    """stream_start.py: the loader's set-up runs after the layers before the check layer and the check layer's
    own projections are issued (while the GPU computes them), not before the GPU has any work; the blend is
    the same either way."""
    with blockstore.open(tmp_path / "s") as store:
        kv, chunks, _ = _stored(weights, store)
        prompt = torch.cat([*chunks, torch.tensor([1, 2, 3])])
        spans = [(0, 16), (16, 32), (32, 48)]
        events: list[str] = []
        real_qkv, real_stream = blender_mod.qkv, ChunkKVStore.stream_located

        def qkv(*a, **kw):  # type: ignore[no-untyped-def]
            events.append("layer")
            return real_qkv(*a, **kw)

        def stream_located(self, *a, **kw):  # type: ignore[no-untyped-def]
            events.append("loader")
            return real_stream(self, *a, **kw)

        monkeypatch.setattr(blender_mod, "qkv", qkv)
        monkeypatch.setattr(ChunkKVStore, "stream_located", stream_located)
        got = Blender(weights, kv, ratio=0.3, check_layer=check_layer).blend(prompt, spans=spans)
        assert events.index("loader") == check_layer + 1 and events.count("loader") == 1
        monkeypatch.setattr(ChunkKVStore, "stream_located", real_stream)
        serial = Blender(weights, kv, ratio=0.3, check_layer=check_layer, overlap=False).blend(prompt, spans=spans)
        assert torch.equal(got.logits, serial.logits)
        assert all(torch.equal(a, b) for a, b in zip(got.keys, serial.keys))


def test_with_a_chunk_missing_the_loader_starts_before_its_prefill(weights: LlamaWeights, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt with a chunk not stored: the loader starts before that chunk is computed, so the stored chunks'
    reads overlap its prefill (H63: started at the check layer, they waited for it)."""
    with blockstore.open(tmp_path / "s") as store:
        kv, chunks, _ = _stored(weights, store)
        new = torch.randint(0, CFG.vocab_size, (16,), generator=torch.Generator().manual_seed(9))
        prompt = torch.cat([chunks[0], new, chunks[2], torch.tensor([1, 2, 3])])
        spans = [(0, 16), (16, 32), (32, 48)]
        events: list[str] = []
        real_compute, real_stream = Blender._compute_and_store, ChunkKVStore.stream_located

        def compute(self, *a, **kw):  # type: ignore[no-untyped-def]
            events.append("prefill")
            return real_compute(self, *a, **kw)

        def stream_located(self, *a, **kw):  # type: ignore[no-untyped-def]
            events.append("loader")
            return real_stream(self, *a, **kw)

        monkeypatch.setattr(Blender, "_compute_and_store", compute)
        monkeypatch.setattr(ChunkKVStore, "stream_located", stream_located)
        got = Blender(weights, kv, ratio=0.3).blend(prompt, spans=spans)
        assert events == ["loader", "prefill"] and len(got.missing_chunks) == 1


@pytest.mark.parametrize("overlap", [True, False])
def test_a_short_layer_record_is_recomputed_on_either_load_path(weights: LlamaWeights, tmp_path: Path,
                                                                 overlap: bool) -> None:
    """A layer record of the wrong size (a put of the chunk stopped part-way after an older M record: the
    lookup itself fails its checks, CorruptionError from locate) is recomputed as a missing chunk on
    either load path. Before, the overlapped path's retry located the damaged chunk again and failed."""
    prompt_spans = [(0, 16), (16, 32), (32, 48)]
    with blockstore.open(tmp_path / "s") as store:
        kv, chunks, cids = _stored(weights, store)
        store.put_many([(kv.layer_key(cids[1], 2), b"\0" * 64)], ns=kv.ns, partition=cids[1])
        with pytest.raises(blockstore.CorruptionError):
            kv.locate([cids[1]])
        prompt = torch.cat([*chunks, torch.tensor([1, 2, 3])])
        got = Blender(weights, kv, ratio=0.2, overlap=overlap).blend(prompt, spans=prompt_spans)
        assert got.damaged_chunks == [cids[1]] and got.missing_chunks == [cids[1]]
        assert kv.locate([cids[1]])[0] is not None  # stored again, whole


def test_a_chunk_first_computed_by_the_failed_attempt_is_still_reported_missing(weights: LlamaWeights,
                                                                                  tmp_path: Path) -> None:
    """A prompt with a new chunk and a stored one whose layer record fails its checksum, loads overlapped:
    the first attempt computes and stores the new chunk, then the stream's read of the damaged one fails;
    the retry must still report the new chunk missing (the connector tells the scheduler of the chunks a
    blend stored by missing_chunks) and use the KV it computed. Before, the retry found it stored, read it
    back, and left it out of missing_chunks: the scheduler never heard it was stored."""
    spans = [(0, 16), (16, 32), (32, 48)]
    with blockstore.open(tmp_path / "s") as store:
        kv, chunks, cids = _stored(weights, store)
        new = torch.randint(0, CFG.vocab_size, (16,), generator=torch.Generator().manual_seed(99))
        _damage_layer_record(store, kv, cids[1], 2)
        prompt = torch.cat([chunks[0], chunks[1], new, torch.tensor([1, 2, 3])])
        got = Blender(weights, kv, ratio=0.2, overlap=True).blend(prompt, spans=spans)
        new_id = kv.put(new, (r := full_prefill(weights, new)).keys, r.values, torch.arange(16))
        assert got.damaged_chunks == [cids[1]]
        assert sorted(got.missing_chunks) == sorted([cids[1], new_id])
