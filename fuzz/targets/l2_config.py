"""LMCache L2 adapter parameters: `BlockstoreL2AdapterConfig.from_dict`, fed the `adapter_params` JSON of
`lmcache server --l2-adapter '...'` (operator input, parsed by json before it reaches the adapter).

Input: JSON text (inputs that are not JSON are skipped: json's own parser is not under test).

Contract: a config or ValueError naming the bad key (README: "Unknown keys and bad values stop the
server at start with a message naming the key"); a config holds only values the adapter can use:
a non-empty path, durability cache|sync, block_size None or an int in 64 KiB..1 TiB, capacity an
int >= 0, a compaction spec that `resolve` accepts, workers an int in 1..256, lock_ttl_s a float >= 0.
"""

from __future__ import annotations

import json
import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.compaction import resolve
    from blockstore.connector.l2_adapter import BlockstoreL2AdapterConfig


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def test_one_input(data: bytes) -> None:
    try:
        params = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        cfg = BlockstoreL2AdapterConfig.from_dict(params)
    except ValueError as exc:
        assert "blockstore adapter_params" in str(exc), f"error without the key's context: {exc}"
        return
    assert isinstance(cfg.path, str) and cfg.path.strip()
    assert cfg.durability in ("cache", "sync")
    assert cfg.block_size is None or (_int(cfg.block_size) and (64 << 10) <= cfg.block_size <= (1 << 40))
    assert _int(cfg.capacity_bytes) and cfg.capacity_bytes >= 0
    assert _int(cfg.workers) and 1 <= cfg.workers <= 256
    assert isinstance(cfg.lock_ttl_s, float) and cfg.lock_ttl_s >= 0
    if cfg.compaction is not None:
        spec = cfg.compaction
        if isinstance(spec, dict):
            spec = {k: v for k, v in spec.items() if k != "background"}
        resolve(spec)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
