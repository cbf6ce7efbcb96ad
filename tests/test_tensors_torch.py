"""Tensor records with torch (CPU): dtype (bfloat16 included, which numpy lacks) and shape survive,
and reads land straight in a caller-given tensor."""

from __future__ import annotations

from pathlib import Path

import pytest

import blockstore
from blockstore import InvalidArgument

torch = pytest.importorskip("torch", reason="torch is in the dev extra; this only runs where it is installed")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int8", "uint8"])
def test_torch_round_trip(tmp_path: Path, backend: str, dtype: str) -> None:
    t = (torch.randn(2, 4, 16, 8) * 10).to(getattr(torch, dtype))
    with blockstore.open(tmp_path, backend=backend) as s:
        s.put_tensor(b"kv", t, ns="model-a")
    with blockstore.open(tmp_path, backend=backend) as s:
        got = s.get_tensor(b"kv", ns="model-a")
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        out = torch.zeros_like(t)
        ptr = out.data_ptr()
        assert s.get_tensor(b"kv", ns="model-a", out=out) is out
        assert out.data_ptr() == ptr and torch.equal(out, t)


def test_torch_out_mismatch_is_invalid(tmp_path: Path) -> None:
    with blockstore.open(tmp_path) as s:
        s.put_tensor(b"kv", torch.ones(4, 4, dtype=torch.bfloat16))
        with pytest.raises(InvalidArgument):
            s.get_tensor(b"kv", out=torch.empty(4, 5, dtype=torch.bfloat16))
        with pytest.raises(InvalidArgument):
            s.get_tensor(b"kv", out=torch.empty(4, 4, dtype=torch.float32))


def test_non_contiguous_tensor_is_stored_in_c_order(tmp_path: Path) -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    with blockstore.open(tmp_path) as s:
        s.put_tensor(b"t", t)
        assert torch.equal(s.get_tensor(b"t"), t)


def test_cross_library_reads_check_dtype(tmp_path: Path) -> None:
    import numpy as np

    with blockstore.open(tmp_path) as s:
        s.put_tensor(b"np", np.arange(8, dtype=np.float32))
        out = torch.empty(8, dtype=torch.float32)
        s.get_tensor(b"np", out=out)
        assert out.tolist() == list(range(8))
        with pytest.raises(InvalidArgument):
            s.get_tensor(b"np", out=torch.empty(8, dtype=torch.int32))  # same size, other dtype
