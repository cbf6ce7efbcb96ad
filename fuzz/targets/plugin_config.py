"""In-process LMCache plugin settings: `connector.plugin_config.BlockstorePluginConfig.from_extra_config`,
fed LMCache's `extra_config` (YAML or the LMCACHE_EXTRA_CONFIG environment variable's JSON).

Input: one control byte, then JSON text for extra_config (an object or null; other JSON and non-JSON
are skipped). Control bits: 0 = the plugin is "blockstore.b" (else "blockstore"); 1 = keys without
the `remote_storage_plugin.` prefix get this plugin's prefix (so the fuzzer works on values, not on
spelling the prefix); 2-3 = worker_id 0..3.

Contract: a config or BlockstorePluginConfigError (README: "bad values raise BlockstorePluginConfigError
(a ValueError naming the key)") -- a bare ValueError, TypeError, ... is a finding. A config holds a
non-empty path with its placeholders filled in, durability cache|sync, block_size None or an int in
64 KiB..1 TiB, and a compaction spec that `resolve` accepts.
"""

from __future__ import annotations

import json
import sys

from fuzz import harness

with harness.instrumented(__name__):
    from blockstore.compaction import resolve
    from blockstore.connector.plugin_config import BlockstorePluginConfig, BlockstorePluginConfigError

PLUGIN_B, ADD_PREFIX = 1, 2


def test_one_input(data: bytes) -> None:
    ctl, body = harness.split_control(data)
    try:
        extra = json.loads(body)
    except (ValueError, RecursionError):
        return
    if extra is not None and not isinstance(extra, dict):
        return
    name = "blockstore.b" if ctl & PLUGIN_B else "blockstore"
    if extra and ctl & ADD_PREFIX:
        extra = {k if k.startswith("remote_storage_plugin.") else f"remote_storage_plugin.{name}.{k}": v
                 for k, v in extra.items()}
    worker = (ctl >> 2) & 3
    try:
        cfg = BlockstorePluginConfig.from_extra_config(extra, name, worker_id=worker, world_size=4)
    except BlockstorePluginConfigError:
        return
    assert isinstance(cfg.path, str) and cfg.path.strip()
    assert cfg.durability in ("cache", "sync")
    bs = cfg.block_size
    assert bs is None or (isinstance(bs, int) and not isinstance(bs, bool) and (64 << 10) <= bs <= (1 << 40))
    if cfg.compaction is not None:
        spec = cfg.compaction
        if isinstance(spec, dict):
            spec = {k: v for k, v in spec.items() if k != "background"}
        resolve(spec)


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
