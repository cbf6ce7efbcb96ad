"""Shared fixtures. Every engine test that takes `backend` runs against both I/O backends (the C
core and its pure-Python twin), so the two cannot drift apart."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=15, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci", max_examples=60, stateful_step_count=35, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "nightly", max_examples=1000, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(params=["native", "python"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def faults() -> Iterator[object]:
    """The C core's fault-injecting file layer, installed for one test and removed after."""
    from blockstore.native import FaultInjector

    f = FaultInjector()
    f.install()
    try:
        yield f
    finally:
        f.arm(0, 0, 0)
        f.uninstall()


# --- the LMCache L2 adapter's tests (lmcache is optional: imported only by the tests that ask for these)

@pytest.fixture
def arena() -> Iterator[object]:
    """LMCache memory objects over one CPU tensor (test_connector_adapter.Arena), released after the test."""
    from test_connector_adapter import Arena

    a = Arena()
    yield a
    a.release()


@pytest.fixture
def adapter_block_size() -> int | None:
    """The block size `make` gives adapters (None: the adapter's default); a module overrides it."""
    return None


@pytest.fixture
def make(tmp_path: object, adapter_block_size: int | None) -> Iterator[object]:
    """make(**adapter_params) -> an L2 adapter on tmp_path/"kv" (compaction off unless asked for), closed
    after the test."""
    from blockstore.connector.l2_adapter import BlockstoreL2Adapter, BlockstoreL2AdapterConfig

    made: list[BlockstoreL2Adapter] = []

    def _make(**params: object) -> BlockstoreL2Adapter:
        params.setdefault("path", os.path.join(str(tmp_path), "kv"))
        params.setdefault("compaction", None)
        if adapter_block_size is not None:
            params.setdefault("block_size", adapter_block_size)
        a = BlockstoreL2Adapter(BlockstoreL2AdapterConfig.from_dict(params))
        made.append(a)
        return a

    yield _make
    for a in made:
        a.close()


@pytest.fixture
def capped_adapter(make: Callable[..., object]) -> object:
    """An L2 adapter with capacity eviction on: CAPACITY of tests/test_review_session23.py (8 blocks of BLOCK),
    compaction off (the review tests of eviction's races)."""
    from test_review_session23 import BLOCK, CAPACITY

    return make(capacity_bytes=CAPACITY, block_size=BLOCK)
