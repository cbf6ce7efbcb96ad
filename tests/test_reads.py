"""Batched-read edge cases."""

from __future__ import annotations

from pathlib import Path

import blockstore


def test_a_request_may_name_a_key_twice(tmp_path: Path, backend: str) -> None:
    with blockstore.open(tmp_path, backend=backend) as s:
        s.put(b"a", b"x" * 5000)
        s.put(b"b", b"y")
        got = s.get_many([b"a", b"b", b"a", b"missing", b"b"])
        assert [None if v is None else bytes(v) for v in got] == [b"x" * 5000, b"y", b"x" * 5000, None, b"y"]
        out = [bytearray(6000) for _ in range(3)]
        assert s.get_many([b"a", b"a", b"b"], out=out) == [5000, 5000, 1]
        assert bytes(out[1][:5000]) == b"x" * 5000
