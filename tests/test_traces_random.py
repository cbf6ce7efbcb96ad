"""The `random` trace family (bench/traces.py): each seed draws its own shape, the same on any run, and
every trace it makes is valid (every requested key live, no delete of a missing key)."""

from __future__ import annotations

from bench.compaction import block_size_of
from bench.traces import Put, Request, check, generate


def test_random_family_is_seeded_valid_and_varied() -> None:
    shapes = set()
    for seed in range(6):
        t = generate("random", seed, 0.25)
        check(t)
        again = generate("random", seed, 0.25)
        assert again.ops == t.ops and again.params == t.params
        p = t.params
        assert 256 << 10 <= p["block_size"] <= 16 << 20 and block_size_of(t, None) == p["block_size"]
        assert 1 <= p["concurrent_effective"] <= p["concurrent"] <= 2000
        assert max(max(o.sizes) for o in t.ops if isinstance(o, Put)) <= min(2 << 20, p["block_size"] // 2)
        assert any(isinstance(o, Request) for o in t.ops)
        shapes.add((p["block_size"], p["ns_mode"], p["tenants"]))
    assert len(shapes) == 6


def test_random_family_override_replaces_one_draw() -> None:
    t = generate("random", 3, 0.25, block_size=1 << 20, ns_mode="one")
    check(t)
    assert t.params["block_size"] == 1 << 20 and {o.ns for o in t.ops} == {"bench"}
