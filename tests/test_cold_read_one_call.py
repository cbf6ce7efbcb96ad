"""A get_many reads all of its blocks in one backend call (issue 16, p95 cold retrieval): the C core then
announces every block's runs before the first read, so a cold request has all of them in flight at once
instead of one block's at a time (bs_read_files), and no Python runs between one block's reads and the
next. Every payload is still verified, and a corrupt one is still refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import blockstore
from blockstore.errors import ChecksumMismatch

KiB = 1 << 10


def _three_blocks(path: Path) -> tuple[blockstore.Store, list[bytes], dict[bytes, bytes]]:
    s = blockstore.open(path, block_size=64 * KiB)
    model = {b"k%d" % i: bytes([i]) * (20 * KiB) for i in range(9)}  # 3 records of 20 KiB per 64 KiB block
    for k, v in model.items():
        s.put_many([(k, v)])
    keys = list(model)
    assert len({loc.block_id for loc in s.locate_many(keys) if loc is not None}) >= 3
    return s, keys, model


def test_a_request_over_several_blocks_is_one_read_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s, keys, model = _three_blocks(tmp_path)
    try:
        calls: list[tuple[str, int]] = []
        backend = type(s.backend)
        real_files, real_many = backend.read_files, backend.read_many

        def files(self: Any, fs: Any, *a: Any, **kw: Any) -> Any:
            calls.append(("read_files", len(fs)))
            return real_files(self, fs, *a, **kw)

        def many(self: Any, *a: Any, **kw: Any) -> Any:
            calls.append(("read_many", 1))
            return real_many(self, *a, **kw)

        monkeypatch.setattr(backend, "read_files", files)
        monkeypatch.setattr(backend, "read_many", many)
        s.drop_page_cache()
        got = s.get_many(keys)
        assert [bytes(v) for v in got if v is not None] == [model[k] for k in keys]
        blocks = len({loc.block_id for loc in s.locate_many(keys) if loc is not None})
        if s.backend.name == "native":
            assert calls == [("read_files", blocks)]
        else:  # the pure-Python twin: its read_files is one read_many a block
            assert calls[0] == ("read_files", blocks)
    finally:
        s.close()


def test_a_corrupt_payload_in_one_block_of_a_request_is_refused(tmp_path: Path) -> None:
    s, keys, _model = _three_blocks(tmp_path)
    loc = s.locate_many([keys[4]])[0]
    assert loc is not None
    path = s.blocks.path(loc.block_id)
    s.close()
    with open(path, "r+b") as f:  # flip a byte inside the fifth record's payload
        f.seek(loc.payload_offset + 100)
        b = f.read(1)
        f.seek(loc.payload_offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    with blockstore.open(tmp_path) as s2:
        s2.drop_page_cache()
        with pytest.raises(ChecksumMismatch):
            s2.get_many(keys)
        with blockstore.open(tmp_path, on_corrupt="miss", read_only=True) as s3:
            got = s3.get_many(keys)
            assert got[4] is None and all(v is not None for i, v in enumerate(got) if i != 4)
