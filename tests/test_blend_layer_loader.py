"""The blend's C readers (native/layers.c through native.LayerJobs, blockstore/blend/layer_loader.py):
every layer's bytes verified and in order, a failed layer raised at that layer with nothing after it read,
and a stream closed early or cancelled never hangs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
import xxhash

import blockstore
from blockstore import BlockstoreError, ChecksumMismatch
from blockstore.blend import ChunkKVStore, LlamaConfig, LlamaWeights, full_prefill
from blockstore.native import lib
from blockstore.records import ReadRequest

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def weights() -> LlamaWeights:
    return LlamaWeights.random(CFG, seed=3)


def _native(store: blockstore.Store) -> None:
    if store.backend.name != "native" or not hasattr(store.backend, "layer_jobs"):
        pytest.skip("the C core is not loaded")


def _stored(weights: LlamaWeights, store: blockstore.Store) -> tuple[ChunkKVStore, list[bytes]]:
    g = torch.Generator().manual_seed(0)
    kv = ChunkKVStore(store, model_id=weights.model_id)
    chunks = [torch.randint(0, CFG.vocab_size, (12,), generator=g) for _ in range(3)]
    return kv, [kv.put(c, (r := full_prefill(weights, c)).keys, r.values, torch.arange(len(c))) for c in chunks]


def test_layers_read_by_several_c_readers_are_every_byte_verified(tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        path = tmp_path / "payloads"
        rng = torch.Generator().manual_seed(1)
        payloads = [bytes(torch.randint(0, 256, (1000 + 37 * i,), generator=rng, dtype=torch.uint8).tolist())
                    for i in range(24)]
        path.write_bytes(b"".join(payloads))
        fd = os.open(path, os.O_RDONLY)
        try:
            offsets = [sum(len(p) for p in payloads[:i]) for i in range(len(payloads))]
            dsts = [bytearray(len(p)) for p in payloads]
            # 12 layers of two records each; layer 7's second record expects another checksum
            layers = [[(fd, [ReadRequest(offsets[i], len(payloads[i]), dsts[i],
                                         xxhash.xxh3_64_intdigest(payloads[i]) ^ (1 if i == 15 else 0))
                             for i in (2 * j, 2 * j + 1)])] for j in range(12)]
            jobs = store.backend.layer_jobs(layers, 0, True)  # type: ignore[attr-defined]
            readers = [threading.Thread(target=jobs.run) for _ in range(4)]
            for t in readers:
                t.start()
            got = [jobs.wait(j) for j in range(12)]
            for t in readers:
                t.join()
            jobs.close()
        finally:
            os.close(fd)
        failed = [j for j, s in enumerate(got) if s is not None and any(any(f) for f in s)]
        assert failed == [7] and got[7] == [[0, lib.BS_ECHECKSUM]]
        done = [j for j, s in enumerate(got) if s == [[0, 0]]]
        assert set(range(7)) <= set(done)  # every layer before the failure is read; later ones may be cancelled
        for j in done:
            assert dsts[2 * j] == payloads[2 * j] and dsts[2 * j + 1] == payloads[2 * j + 1]


def test_cancelled_layers_wait_no_more(tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        path = tmp_path / "p"
        path.write_bytes(b"x" * 64)
        fd = os.open(path, os.O_RDONLY)
        try:
            dst = bytearray(64)
            jobs = store.backend.layer_jobs([[(fd, [ReadRequest(0, 64, dst, xxhash.xxh3_64_intdigest(b"x" * 64))])]] * 3,
                                            0, True)  # type: ignore[attr-defined]
            jobs.cancel()
            jobs.run()  # claims nothing
            assert [jobs.wait(j) for j in range(3)] == [None, None, None]
            jobs.close()
        finally:
            os.close(fd)


def test_a_corrupt_layer_raises_at_that_layer_and_the_stream_closes(weights: LlamaWeights, tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        kv, cids = _stored(weights, store)
        whole = kv.load_many(cids)
        loc = store.locate_many([kv.layer_key(cids[1], 3)], ns=kv.ns)[0]
        assert loc is not None
        fd = os.open(store.blocks.path(loc.block_id), os.O_RDWR)
        try:
            byte = os.pread(fd, 1, loc.payload_offset + 3)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), loc.payload_offset + 3)
        finally:
            os.close(fd)
        stream = kv.stream_layers(cids, first_layer=1, readers=3)
        try:
            assert stream._c is not None
            for layer in (1, 2):
                for got, want in zip(stream.layer(layer), whole):
                    assert want is not None and torch.equal(got.keys[0], want.keys[layer])
            with pytest.raises(ChecksumMismatch, match="not returned"):
                stream.layer(3)
            with pytest.raises(BlockstoreError):
                stream.layer(5)  # read or cancelled, never handed on after the failure
        finally:
            stream.close()


def test_a_stream_closed_after_its_first_layer_stops_its_readers(weights: LlamaWeights, tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        kv, cids = _stored(weights, store)
        whole = kv.load_many(cids)
        for _ in range(5):
            stream = kv.stream_layers(cids, first_layer=1, readers=8)
            stream.layer(1)
            stream.close()
            readers = stream._c._threads if stream._c is not None else stream._threads  # C readers or Python
            assert readers and all(not t.is_alive() for t in readers)
        stream = kv.stream_layers(cids, first_layer=1, readers=2)
        try:
            for got, want in zip(stream.layer(CFG.num_hidden_layers - 1), whole):
                assert want is not None and torch.equal(got.values[0], want.values[CFG.num_hidden_layers - 1])
        finally:
            stream.close()


def _files_of_payloads(tmp_path: Path, files: int, per_file: int, size: int) -> tuple[list[int], list[list[bytes]]]:
    """`files` files of `per_file` random payloads of about `size` bytes each; their fds and payloads."""
    rng = torch.Generator().manual_seed(5)
    fds, payloads = [], []
    for f in range(files):
        mine = [bytes(torch.randint(0, 256, (size + 13 * i,), generator=rng, dtype=torch.uint8).tolist())
                for i in range(per_file)]
        (tmp_path / f"file{f}").write_bytes(b"".join(mine))
        fds.append(os.open(tmp_path / f"file{f}", os.O_RDONLY))
        payloads.append(mine)
    return fds, payloads


def test_a_layer_of_several_files_is_read_in_parts_by_several_readers(tmp_path: Path) -> None:
    # A layer's parts (one file each) are claimed by any reader (native/layers.c): each layer is published
    # once, when its last part is in, with every byte of every file verified, and a wrong checksum in one
    # part fails that layer, whatever reader read its other parts. 9 layers x 5 files x 3 records.
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        fds, payloads = _files_of_payloads(tmp_path, 5, 27, 700)
        try:
            for bad_layer in (None, 4):
                dsts = [[bytearray(len(p)) for p in mine] for mine in payloads]
                offsets = [[sum(len(p) for p in mine[:i]) for i in range(len(mine))] for mine in payloads]
                layers = [[(fds[f], [ReadRequest(offsets[f][i], len(payloads[f][i]), dsts[f][i],
                                                 xxhash.xxh3_64_intdigest(payloads[f][i])
                                                 ^ (1 if (j, f, i) == (bad_layer, 3, 3 * j + 1) else 0))
                                     for i in range(3 * j, 3 * j + 3)]) for f in range(5)] for j in range(9)]
                jobs = store.backend.layer_jobs(layers, 0, True, True)  # type: ignore[attr-defined]
                readers = [threading.Thread(target=jobs.run) for _ in range(6)]
                for t in readers:
                    t.start()
                got = [jobs.wait(j) for j in range(9)]
                for t in readers:
                    t.join()
                jobs.close()
                if bad_layer is None:
                    assert got == [[[0, 0, 0]] * 5] * 9
                    assert dsts == [[bytearray(p) for p in mine] for mine in payloads]
                    continue
                assert got[bad_layer] is not None and got[bad_layer][3][1] == lib.BS_ECHECKSUM
                assert all(got[j] == [[0, 0, 0]] * 5 for j in range(bad_layer))  # read in full before it
                for j in range(bad_layer + 1, 9):  # after it: read, or cancelled (never a half-read layer as read)
                    assert got[j] is None or got[j] == [[0, 0, 0]] * 5
        finally:
            for fd in fds:
                os.close(fd)


def test_a_failed_part_publishes_its_half_read_layer_failed_and_cancels_the_rest(tmp_path: Path) -> None:
    # One reader: it fails on layer 0's first part (a wrong checksum) while the layer's other parts are
    # unclaimed. Those parts drain as cancelled and count the layer down, so layer 0 is published FAILED
    # (a failure outranks the cancellation: the caller raises the real error) and layer 1 CANCELLED; no
    # wait hangs on a half-claimed layer.
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        fds, payloads = _files_of_payloads(tmp_path, 4, 2, 300)
        try:
            dsts = [[bytearray(len(p)) for p in mine] for mine in payloads]
            layers = [[(fds[f], [ReadRequest(sum(len(p) for p in payloads[f][:j]), len(payloads[f][j]), dsts[f][j],
                                             xxhash.xxh3_64_intdigest(payloads[f][j]) ^ (f == 0 and j == 0))])
                       for f in range(4)] for j in range(2)]
            jobs = store.backend.layer_jobs(layers, 0, True)  # type: ignore[attr-defined]
            jobs.run()
            assert jobs.wait(0) == [[lib.BS_ECHECKSUM], [0], [0], [0]]  # parts 1-3 unread: no status of their own
            assert not jobs.done(0) and jobs.wait(1) is None
            assert dsts[1] == [bytearray(300), bytearray(313)]  # never read
            jobs.close()
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("failing", ["descriptor", "host buffer", "second reader"])
def test_a_loader_that_fails_to_start_lets_go_of_its_blocks_and_readers(
        weights: LlamaWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    # LayerStream's start pins every block of the plan (LayerReads.open), then makes the loader: its host
    # buffer of every layer (pinned on a GPU: ~1 GiB at 8k tokens of an 8B model), its device buffer, its
    # reader threads. A failure after the pins (a block file refused as not regular, pinned memory or the
    # GPU's memory short, a thread that cannot start) left the blocks pinned for as long as anything held
    # the error (a deletion of them waited), and a reader started before it read on into the buffers. The
    # blend starts its loader inside the layers (stream_start.py), where nothing could close it.
    from blockstore import IOErrorBS
    from blockstore.blend import layer_loader

    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        kv, cids = _stored(weights, store)
        if failing == "descriptor":
            real_fd, calls = store.block_read_fd, []

            def block_read_fd(bid: int) -> int | None:
                calls.append(bid)
                if len(calls) == 2:
                    raise IOErrorBS(f"block {bid:016x}: not a regular file")
                return real_fd(bid)

            monkeypatch.setattr(store, "block_read_fd", block_read_fd)
        elif failing == "host buffer":
            def no_memory(size: int) -> None:
                raise MemoryError(f"{size} bytes")

            monkeypatch.setattr(layer_loader, "aligned_buffer", no_memory)
        else:
            real_start, started = threading.Thread.start, []

            def start(self: threading.Thread) -> None:
                started.append(self.name)
                if len(started) == 2:
                    raise RuntimeError("can't start new thread")
                real_start(self)

            monkeypatch.setattr(threading.Thread, "start", start)
        with pytest.raises((IOErrorBS, MemoryError, RuntimeError)) as failed:
            kv.stream_layers(cids, first_layer=1, readers=2)
        assert store.blocks._pins == {}, "the loader that failed to start still pins its blocks"
        assert not [t for t in threading.enumerate() if t.name.startswith("blend-reader")]
        del failed


@pytest.mark.parametrize("damage", ["none", "first_byte", "piece_edge", "last_byte", "gap", "truncated"])
def test_records_verified_piece_by_piece_as_they_are_read_catch_damage_anywhere(tmp_path: Path, damage: str) -> None:
    """The layer readers hash each 512 KiB piece as it arrives (batch.c, BS_READ_VERIFY_INLINE): records
    larger than a piece, one that ends on a piece's edge, an empty one and gaps read into scratch, all in one
    coalesced run. A flipped byte anywhere in a record fails that record alone; one in a gap fails nothing; a
    file cut short fails the records it cuts and those after."""
    with blockstore.open(tmp_path / "s") as store:
        _native(store)
        rng = torch.Generator().manual_seed(7)
        sizes, gap = [1_300_000, 0, 796_953, 524_288, 3], 100  # record 2 ends 1 byte past a piece
        payloads = [bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).numpy()) for n in sizes]
        offsets = [i * gap + sum(sizes[:i]) for i in range(len(sizes))]
        data = bytearray(b"\x5a" * (offsets[-1] + sizes[-1]))
        for off, p in zip(offsets, payloads):
            data[off:off + len(p)] = p
        flip = {"first_byte": offsets[0], "piece_edge": offsets[0] + 512 * 1024, "last_byte": offsets[2] + sizes[2] - 1,
                "gap": offsets[0] + sizes[0] + 1}.get(damage)
        if flip is not None:
            data[flip] ^= 0x01
        if damage == "truncated":
            data = data[:offsets[3] + 1000]
        path = tmp_path / "payloads"
        path.write_bytes(bytes(data))
        fd = os.open(path, os.O_RDONLY)
        try:
            dsts = [bytearray(n) for n in sizes]
            reads = [ReadRequest(o, n, d, xxhash.xxh3_64_intdigest(p)) for o, n, d, p in zip(offsets, sizes, dsts, payloads)]
            jobs = store.backend.layer_jobs([[(fd, reads)]], gap, True)  # type: ignore[attr-defined]
            jobs.run()
            got = jobs.wait(0)
            jobs.close()
        finally:
            os.close(fd)
        want = [0] * len(sizes)
        if damage in ("first_byte", "piece_edge"):
            want[0] = lib.BS_ECHECKSUM
        elif damage == "last_byte":
            want[2] = lib.BS_ECHECKSUM
        elif damage == "truncated":
            want[3] = want[4] = lib.BS_ETRUNCATED
        assert got == [want]
        for status, dst, p in zip(want, dsts, payloads):
            if status == 0:
                assert dst == p
