"""Sizes the L2 adapter's eviction tests share: 64 KiB blocks of 8 KiB records, a capacity of six blocks.

A test module that imports `adapter_block_size` from here gets adapters with 64 KiB blocks from conftest's
`make` (the fixture overrides conftest's default for that module). Import it after the module's
`pytest.importorskip("torch")`.
"""

from __future__ import annotations

import pytest
import torch

BLOCK = 65536
SMALL = torch.Size([2, 2, 16, 32])  # float32: 8 KiB, ~7 records per 64 KiB block
SMALL_SIZE = 8192
CAPACITY = 6 * BLOCK


@pytest.fixture
def adapter_block_size() -> int:
    """`make` (conftest.py) gives the importing module's adapters 64 KiB blocks."""
    return BLOCK
