"""Shared fixtures. Every engine test that takes `backend` runs against both I/O backends (the C
core and its pure-Python twin), so the two cannot drift apart."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
